"""Shards, the output-folder lock, temporary-file clean-up, QC pictures and the index page."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from pipeline.batch.report.html import write_index_html
from pipeline.batch.report.lock import OutputLock, OutputLockedError
from pipeline.batch.report.outputs import RunFiles, Shard, prepare_output_dir, remove_temporaries
from pipeline.batch.report.qc import display_window, write_qc_png
from pipeline.errors import InputError
from tests.conftest import make_affine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- shards ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_cover_every_case_exactly_once(count):
    cases = [f"case_{n:02d}" for n in range(10)]
    parts = [Shard.parse(f"{i}/{count}").select(cases) for i in range(1, count + 1)]
    assert sorted(c for part in parts for c in part) == cases
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/b", "2", "-1/2"])
def test_bad_shard_is_refused_with_the_expected_form(text):
    with pytest.raises(InputError, match="I/N"):
        Shard.parse(text)


def test_shard_file_names(tmp_path):
    files = RunFiles(tmp_path, Shard.parse((2, 3)))
    assert files.manifest_csv.name == "manifest.shard-2-of-3.csv"
    assert files.lesions_csv.name == "lesions.shard-2-of-3.csv"
    assert files.log.name == "segment.shard-2-of-3.log"
    assert files.lock.name == ".medseg.shard-2-of-3.lock"
    assert files.index_html is None
    assert RunFiles(tmp_path).lock.name == ".medseg.lock"


# --- lock ------------------------------------------------------------------------------------------


def test_second_lock_is_refused_with_owner(tmp_path):
    with OutputLock(tmp_path / ".medseg.lock"):
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on host") as info:
            OutputLock(tmp_path / ".medseg.lock").acquire()
        assert "is in use by another medseg run" in str(info.value)
    assert not (tmp_path / ".medseg.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".medseg.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x"}))
    with OutputLock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_lock_from_another_host_is_respected(tmp_path):
    lock = tmp_path / ".medseg.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(OutputLockedError, match="elsewhere.example"):
        OutputLock(lock).acquire()
    assert lock.exists()


# --- output folder -----------------------------------------------------------------------------------


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        prepare_output_dir(tmp_path / "out")
    with pytest.raises(InputError, match="cannot write to output folder"):
        prepare_output_dir(tmp_path / "out" / "below")


def test_only_temporaries_of_the_given_targets_are_removed(tmp_path):
    mine = tmp_path / ".a_seg.nii.gz.ab12cd_3.tmp.nii.gz"
    other = tmp_path / ".b_seg.nii.gz.ab12cd_3.tmp.nii.gz"
    lookalike = tmp_path / ".a_seg.nii.gz.notes"
    for path in (mine, other, lookalike):
        path.write_text("")
    removed = remove_temporaries([tmp_path / "a_seg.nii.gz"])
    assert removed == [mine]
    assert other.exists() and lookalike.exists()


# --- QC picture and index --------------------------------------------------------------------------


def test_qc_png_is_written(tmp_path):
    image = np.random.default_rng(0).normal(40, 10, (20, 18, 8)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:9, 6:10, 2:5] = 1
    labels[12:14, 3:5, 5:7] = 2
    path = write_qc_png(tmp_path / "qc" / "c.png", image, labels, make_affine("oblique"),
                        centre_mm=make_affine("oblique")[:3] @ [7, 8, 3, 1], title="c")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["c.png"]  # no temporary left


def test_display_window():
    assert display_window(np.zeros(3), "ct_window", [-150, 250]) == (-150.0, 250.0)
    image = np.arange(1000, dtype=np.float32)
    low, high = display_window(image, "zscore")
    assert low == pytest.approx(9.99) and high == pytest.approx(989.01)


def test_index_html_escapes_and_links(tmp_path):
    (tmp_path / "qc").mkdir()
    (tmp_path / "qc" / "a.png").write_bytes(PNG_MAGIC)
    rows = [
        {"case_id": "a", "status": "done", "lesion_count": 2, "lesion_volume_ml": 1.5, "source": "/x/a.nii.gz",
         "qc_png": str(tmp_path / "qc" / "a.png")},
        {"case_id": "b", "status": "failed", "error": "<script>alert(1)</script> & more", "source": "/x/b"},
        {"case_id": "", "status": "skipped", "error": "not a scan", "source": "/x/notes.txt"},
    ]
    page = write_index_html(rows, tmp_path).read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert '<img src="qc/a.png"' in page and 'href="qc/a.png"' in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "1.50" in page and "/x/notes.txt" in page
    assert "3 cases: 1 done, 1 skipped, 1 failed" in page


def test_lock_debris_of_dead_processes_is_removed(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    debris = [tmp_path / f".medseg.lock.{dead}.123.tmp", tmp_path / f".medseg.lock.stale.{dead}",
              tmp_path / f".medseg-write-test.{dead}"]
    alive = tmp_path / f".medseg.lock.{os.getpid()}.5.tmp"
    for path in debris + [alive]:
        path.write_text("")
    prepare_output_dir(tmp_path)
    with OutputLock(tmp_path / ".medseg.lock"):
        assert not any(p.exists() for p in debris)
        assert alive.exists()


def test_whole_folder_runs_and_shards_exclude_each_other(tmp_path):
    whole, shard_1, shard_2 = RunFiles(tmp_path), RunFiles(tmp_path, Shard(1, 2)), RunFiles(tmp_path, Shard(2, 2))
    with OutputLock(shard_1.lock, conflicts=shard_1.conflicting_locks()):
        with OutputLock(shard_2.lock, conflicts=shard_2.conflicting_locks()):  # siblings share the folder
            pass
        with pytest.raises(OutputLockedError, match="shard-1-of-2"):
            OutputLock(whole.lock, conflicts=whole.conflicting_locks()).acquire()
        other_split = RunFiles(tmp_path, Shard(1, 3))
        with pytest.raises(OutputLockedError):
            OutputLock(other_split.lock, conflicts=other_split.conflicting_locks()).acquire()
    assert sorted(p.name for p in tmp_path.glob(".medseg*")) == []
