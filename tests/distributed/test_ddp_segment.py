"""``torchrun --nproc_per_node 2 -m pipeline segment IN OUT --model M``: every case once, one merged
manifest, resume, and the worst rank's exit code; and the Slurm-array way (``--shard I/N`` processes
sharing one output folder, then ``medseg manifest``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.batch.report.lock import OutputLock
from pipeline.batch.report.outputs import RunFiles, Shard
from pipeline.cli import main
from tests.batch.test_batch_cli import manifest_rows, write_scans
from tests.distributed.launch import ROOT, child_env, tail, torchrun
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")


def segment_job(scans: Path, out: Path, checkpoint: Path, rendezvous: bool = False):
    return torchrun("-m", "pipeline", "segment", "-q", str(scans), str(out), "--model", str(checkpoint),
                    "--device", "cpu", "--no-qc", rendezvous=rendezvous)


@pytest.mark.slow
def test_two_rank_segment_writes_every_case_once_and_merges_the_manifest(tmp_path, checkpoint):
    cases = write_scans(tmp_path / "in", 5)
    out = tmp_path / "out"
    done, _ = segment_job(tmp_path / "in", out, checkpoint, rendezvous=True)  # the multi-node launch form
    assert done.returncode == 0, tail(done)
    assert done.stdout.count(f"merged manifest of 2 ranks: {out}/manifest.csv (exit code 0)") == 1

    parts = [manifest_rows(out / f"manifest.shard-{i}-of-2.csv") for i in (1, 2)]
    assert [[r["case_id"] for r in part] for part in parts] == [cases[0::2], cases[1::2]]  # rank r: shard r+1
    rows = manifest_rows(out / "manifest.csv")
    assert [(r["case_id"], r["status"]) for r in rows] == [(c, "done") for c in cases]  # each case once
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == [f"{c}_seg.nii.gz" for c in cases]
    assert (out / "lesions.csv").is_file() and (out / "index.html").is_file()
    assert [p.name for p in out.rglob(".*")] == []  # no lock, no temporaries left

    # Resume: a second job keeps the 5 cases; a corrupt scan fails in its rank, and the job's exit code is 1.
    (tmp_path / "in" / "scan_9_0000.nii.gz").write_bytes(b"not a nifti file")
    done, _ = segment_job(tmp_path / "in", out, checkpoint)
    assert done.returncode == 1 and "(exit code 1)" in done.stdout, tail(done)
    rows = {r["case_id"]: r for r in manifest_rows(out / "manifest.csv")}
    assert sorted(rows) == sorted(cases + ["scan_9"])
    assert {c: rows[c]["status"] for c in cases} == {c: "done" for c in cases}
    assert rows["scan_9"]["status"] == "failed"
    parts = {r["case_id"]: r for i in (1, 2) for r in manifest_rows(out / f"manifest.shard-{i}-of-2.csv")}
    assert {c: parts[c]["resumed"] for c in cases} == {c: "true" for c in cases}  # kept, not redone


@pytest.mark.slow
def test_two_rank_segment_exits_with_the_worst_rank_s_code(tmp_path, checkpoint):
    """Shard 2/2's lock is held by another live process: rank 1 cannot start (2), rank 0 segments its cases
    (0), and every rank exits 2, the worst. torchrun itself exits 1 for any failed rank, naming each
    rank's exit code. The lock keeps its meaning: rank 0 does not merge while that other run holds it."""
    cases = write_scans(tmp_path / "in", 4)
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(RunFiles(out, Shard(2, 2)).lock):
        done, _ = segment_job(tmp_path / "in", out, checkpoint)
    assert done.returncode == 1, tail(done)
    assert "merged manifest of 2 ranks" in done.stdout and "(exit code 2)" in done.stdout, tail(done)
    assert "error: rank 1 of 2: output folder" in done.stderr and "is in use by another medseg run" in done.stderr
    assert "error: merging the shard manifests: output folder" in done.stderr
    assert done.stderr.count("exitcode: 2") >= 1 and "exitcode: 0" not in done.stderr  # both ranks exit 2
    assert [r["case_id"] for r in manifest_rows(out / "manifest.shard-1-of-2.csv")] == cases[0::2]
    assert not (out / "manifest.csv").exists() and not (out / "manifest.shard-2-of-2.csv").exists()


def test_shard_option_under_torchrun_is_a_usage_error(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    write_scans(tmp_path / "in", 1)
    code = main(["segment", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(checkpoint),
                 "--shard", "1/2"])
    assert code == 2
    assert "--shard 1/2 under torchrun: each rank takes shard RANK+1/WORLD_SIZE itself" in capsys.readouterr().err


@pytest.mark.slow
def test_concurrent_shard_processes_share_one_output_folder(tmp_path, checkpoint, capsys):
    """The Slurm array recipe: ``medseg segment --shard I/2`` twice at the same time into one OUT, then
    ``medseg manifest OUT``: every case once, done, and nothing of either process left behind."""
    cases = write_scans(tmp_path / "in", 6)
    out = tmp_path / "out"
    processes = [subprocess.Popen([sys.executable, "-m", "pipeline", "segment", "-q", str(tmp_path / "in"), str(out),
                                   "--model", str(checkpoint), "--device", "cpu", "--shard", f"{i}/2"],
                                  cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in (1, 2)]
    for process in processes:
        stdout, stderr = process.communicate(timeout=400)
        assert process.returncode == 0, stderr[-2000:]
        assert f"medseg manifest {out}" in stdout

    assert main(["manifest", str(out)]) == 0
    assert "6 cases: 6 done, 0 skipped, 0 failed" in capsys.readouterr().out
    assert [(r["case_id"], r["status"]) for r in manifest_rows(out / "manifest.csv")] == [(c, "done") for c in cases]
    assert sorted(p.name for p in (out / "qc").iterdir()) == [f"{c}.png" for c in cases]
    assert sorted(p.name for p in out.glob("segment.shard-*.log")) == ["segment.shard-1-of-2.log",
                                                                       "segment.shard-2-of-2.log"]
    assert [p.name for p in out.rglob(".*")] == []
