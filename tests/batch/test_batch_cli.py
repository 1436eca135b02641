"""``medseg segment`` / ``medseg manifest`` for pipelines: exit codes 0/1/2, errors before any work,
the lock, shards merged by ``medseg manifest``, and a run killed with ``kill -9`` that the next run
finishes without redoing anything or leaving partial files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.batch.report.lock import OutputLock
from pipeline.cli import main
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, tiny_checkpoint, torch_threads

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "model" / "best.pt")


def write_scans(folder: Path, n: int, shape=(24, 24, 12)) -> list[str]:
    affine = make_affine("LPS", spacing=(1.0, 1.0, 2.5))
    for k in range(n):
        save_nifti(ct_case(shape, seed=k)[0], affine, folder / f"scan_{k}_0000.nii.gz")
    return [f"scan_{k}" for k in range(n)]


def segment(capsys, tmp_path, *extra, model=None, out="out"):
    code = main(["segment", "-q", str(tmp_path / "in"), str(tmp_path / out), "--device", "cpu",
                 "--model", str(model), *extra])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def manifest_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# --- exit codes --------------------------------------------------------------------------------------


def test_exit_0_1_2(tmp_path, capsys, checkpoint):
    write_scans(tmp_path / "in", 2)
    code, out, err = segment(capsys, tmp_path, model=checkpoint)
    assert code == 0, err
    assert "segmented 2/2 cases" in out and "done 2 (0 from an earlier run), skipped 0, failed 0" in out
    assert f"manifest: {tmp_path / 'out' / 'manifest.csv'}" in out

    code, out, err = segment(capsys, tmp_path, model=checkpoint)  # again: everything resumed
    assert code == 0 and "done 2 (2 from an earlier run)" in out

    (tmp_path / "in" / "bad.nii.gz").write_bytes(b"\x1f\x8b truncated")
    code, out, err = segment(capsys, tmp_path, model=checkpoint)
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("failed:")] == [
        line for line in err.splitlines() if line.startswith("failed: bad (")]

    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.nii.gz").write_bytes(b"junk")
    code = main(["segment", "-q", str(tmp_path / "only_bad"), str(tmp_path / "out2"), "--model", str(checkpoint),
                 "--device", "cpu"])
    assert code == 2
    assert [r["status"] for r in manifest_rows(tmp_path / "out2" / "manifest.csv")] == ["failed"]


@pytest.mark.parametrize("problem", ["missing_model", "not_a_checkpoint", "output_is_a_file", "locked"])
def test_errors_before_any_work_exit_2(tmp_path, capsys, checkpoint, problem):
    write_scans(tmp_path / "in", 1)
    model, out = checkpoint, "out"
    if problem == "missing_model":
        model = tmp_path / "nope.pt"
    elif problem == "not_a_checkpoint":
        model = tmp_path / "notes.pt"
        model.write_text("hello")
    elif problem == "output_is_a_file":
        (tmp_path / "out").write_text("a file")
    else:
        (tmp_path / "out").mkdir()
    if problem == "locked":
        with OutputLock(tmp_path / "out" / ".medseg.lock"):
            code, _, err = segment(capsys, tmp_path, model=model, out=out)
        assert "is in use by another medseg run" in error_line(err)
    else:
        code, _, err = segment(capsys, tmp_path, model=model, out=out)
        error_line(err)
    assert code == 2
    if (tmp_path / "out").is_dir():  # nothing was segmented or reported
        assert not list((tmp_path / "out").glob("*_seg.*"))
        assert not (tmp_path / "out" / "manifest.csv").exists()


def test_bad_shard_is_a_usage_error(tmp_path, capsys, checkpoint):
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path), str(tmp_path / "out"), "--model", str(checkpoint), "--shard", "0/2"])
    assert info.value.code == 2
    assert "1 <= I <= N" in capsys.readouterr().err


# --- shards + medseg manifest ----------------------------------------------------------------------


def test_shards_then_manifest(tmp_path, capsys, checkpoint):
    cases = write_scans(tmp_path / "in", 5)
    for shard in ("1/2", "2/2"):
        code, out, err = segment(capsys, tmp_path, "--shard", shard, "--no-qc", model=checkpoint)
        assert code == 0, err
        assert f"medseg manifest {tmp_path / 'out'}" in out
    parts = [manifest_rows(tmp_path / "out" / f"manifest.shard-{i}-of-2.csv") for i in (1, 2)]
    assert sorted(r["case_id"] for part in parts for r in part) == cases  # each case once

    assert main(["manifest", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "5 cases: 5 done, 0 skipped, 0 failed" in out
    assert [r["case_id"] for r in manifest_rows(tmp_path / "out" / "manifest.csv")] == cases
    assert (tmp_path / "out" / "index.html").is_file() and (tmp_path / "out" / "lesions.csv").is_file()


def test_manifest_of_an_empty_folder_is_an_error(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["manifest", str(tmp_path / "out")]) == 2
    assert "nothing to report" in error_line(capsys.readouterr().err)


# --- kill -9 and resume ------------------------------------------------------------------------------


def test_killed_run_is_finished_by_the_next_without_redoing(tmp_path, capsys, checkpoint):
    cases = write_scans(tmp_path / "in", 10, shape=(32, 32, 16))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "segment", "-q", str(tmp_path / "in"), str(out), "--model",
         str(checkpoint), "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("*_seg.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]

    first = {json.loads(p.read_text())["case_id"]: json.loads(p.read_text())["started"]
             for p in out.glob("*_seg.json")}
    assert 1 <= len(first) < len(cases)
    assert (out / ".medseg.lock").exists()  # left behind by the killed run: stale

    code, stdout, err = segment(capsys, tmp_path, model=checkpoint)
    assert code == 0, err
    assert f"done {len(cases)} ({len(first)} from an earlier run)" in stdout

    rows = manifest_rows(out / "manifest.csv")
    assert [(r["case_id"], r["status"]) for r in rows] == [(c, "done") for c in cases]
    sidecars = {c: json.loads((out / f"{c}_seg.json").read_text()) for c in cases}
    assert {c: sidecars[c]["started"] for c in first} == first  # finished cases were not redone
    assert {r["case_id"] for r in rows if r["resumed"] == "true"} == set(first)
    # Only complete files: every mask has its sidecar and picture, no temporaries, no lock.
    names = {p.name for p in out.iterdir()}
    assert {f"{c}_seg.nii.gz" for c in cases} | {f"{c}_seg.json" for c in cases} <= names
    assert sorted(p.name for p in (out / "qc").iterdir()) == [f"{c}.png" for c in cases]
    assert [p.name for p in out.rglob(".*")] == []


def test_segment_dicom_seg_reads_back_onto_its_series(tmp_path):
    """--dicom-seg: the SEG references the series and reads back equal to the NIfTI mask (Dice 1)."""
    import nibabel as nib
    import pydicom

    from pipeline.batch import segment_folder
    from pipeline.infer import Segmenter
    from pipeline.io.dicom_seg import read_dicom_seg
    from pipeline.io.dicom_write import write_dicom_series
    from tests.conftest import blob_label, make_affine
    from tests.infer.test_geometry import LabelEcho, echo_config

    label = blob_label()
    paths = write_dicom_series(label.astype(np.int16), make_affine("oblique"), tmp_path / "in" / "series")
    segment_folder(tmp_path / "in", tmp_path / "out", Segmenter(LabelEcho(), echo_config("null"), "cpu"),
                   dicom_seg=True, qc=False)

    mask_image = nib.load(str(tmp_path / "out" / "series_seg.nii.gz"))
    mask = np.asarray(mask_image.dataobj)
    assert mask.sum() > 0
    seg_path = tmp_path / "out" / "series_seg.dcm"
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    back = read_dicom_seg(seg_path, [str(p) for p in paths], mask_image.affine, mask.shape)
    np.testing.assert_array_equal(back, mask)
    from tests.dicom_validate import assert_valid

    assert_valid(seg_path)


def test_segment_input_overrides_select_and_repair(tmp_path, checkpoint):
    from pipeline.cli import main
    from pipeline.io.dicom_write import write_dicom_series
    from tests.conftest import make_affine
    from tests.helpers import hu_volume

    paths = write_dicom_series(hu_volume((24, 20, 12)), make_affine("RAS"), tmp_path / "in" / "gappy")
    paths[5].unlink()
    model = checkpoint
    assert main(["segment", str(tmp_path / "in"), str(tmp_path / "a"), "--model", str(model), "-q", "--no-qc"]) == 2
    assert main(["segment", str(tmp_path / "in"), str(tmp_path / "b"), "--model", str(model), "-q", "--no-qc",
                 "input.on_missing_slices=resample"]) == 0
    assert (tmp_path / "b" / "gappy_seg.nii.gz").is_file()
    assert main(["segment", str(tmp_path / "in"), str(tmp_path / "c"), "--model", str(model), "-q",
                 "train.epochs=3"]) == 2  # only input.* may change here


def test_progress_bars_do_not_change_the_masks(tmp_path, checkpoint):
    """With progress on (the default without -q), the tile counter must not touch the network's output."""
    import nibabel as nib

    from pipeline.batch import segment_folder

    write_scans(tmp_path / "in", 1)
    quiet = segment_folder(tmp_path / "in", tmp_path / "quiet", checkpoint, device="cpu", qc=False)
    shown = segment_folder(tmp_path / "in", tmp_path / "shown", checkpoint, device="cpu", qc=False, progress=True)
    assert [r.status for r in quiet] == [r.status for r in shown] == ["done"]
    a = nib.load(str(tmp_path / "quiet" / "scan_0_seg.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "shown" / "scan_0_seg.nii.gz")).get_fdata()
    np.testing.assert_array_equal(a, b)


def test_progress_callback_return_value_is_ignored(checkpoint):
    """tqdm's update() returns True when it redraws; a forward hook returning it replaced the output."""
    import torch

    from pipeline.infer import Segmenter

    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    image = torch.rand(1, 24, 24, 12)
    calls = []
    with_progress = segmenter.probabilities(image, progress=lambda: calls.append(1) or True)
    np.testing.assert_allclose(with_progress.numpy(), segmenter.probabilities(image).numpy(), atol=1e-6)
    assert calls
