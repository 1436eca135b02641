"""``medseg segment`` on a full disk and into a folder it may not write.

A stand-in for a filling disk (every atomic write of a chosen file leaves a partial temporary and
raises ``OSError(ENOSPC)``, as a real write does when the disk fills) tests the guarantee everywhere:
the case fails with a one-line reason naming the problem and the file, nothing of it is left (no
temporary, no mask without sidecar, no older mask), the other cases and the reports are right, and a
later run with space finishes the rest. Where this process may mount a tmpfs (root with
``CAP_SYS_ADMIN``), the same is checked on a real size-limited file system, and on a read-only one.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import pytest

from pipeline.cli import main
from pipeline.io import atomic
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, tiny_checkpoint, torch_threads

CASES = ["scan_0", "scan_1", "scan_2", "scan_3"]
NO_SPACE = "no space left on device while writing"


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def batch(tmp_path):
    """(input folder, checkpoint): 4 tiny CT-like scans and a tiny random U-Net."""
    affine = make_affine("LPS", spacing=(1.0, 1.0, 2.5))
    for k, case in enumerate(CASES):
        save_nifti(ct_case((24, 24, 12), seed=k)[0], affine, tmp_path / "in" / f"{case}_0000.nii.gz")
    return tmp_path / "in", tiny_checkpoint(tmp_path / "model" / "best.pt", "inference.min_component_mm3=0")


def segment(capsys, batch, out: Path, *extra):
    input_dir, checkpoint = batch
    code = main(["segment", "-q", str(input_dir), str(out), "--device", "cpu", "--model", str(checkpoint), *extra])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


class FillingDisk:
    """Stand-in for a disk that fills up, in :func:`pipeline.io.atomic.atomic_path` (every output goes
    through it): when the temporary of an atomic write, the ``n``-th of this run, has been written and
    ``fails(temporary, n)``, it is cut to 100 bytes (a write that ran out of space half-way) and
    ``OSError(ENOSPC)`` (or ``error``) is raised where the writer would meet it, inside the block."""

    def __init__(self, monkeypatch, fails, error: int = errno.ENOSPC):
        self.fails, self.error, self.count, self.failed = fails, error, 0, []
        real = atomic.fsync_file

        def fsync_or_fail(path):
            path = Path(path)
            self.count += 1
            if self.fails(path, self.count):
                self.failed.append(path)
                with open(path, "r+b") as handle:
                    handle.truncate(min(100, path.stat().st_size))
                raise OSError(self.error, os.strerror(self.error))
            real(path)

        monkeypatch.setattr(atomic, "fsync_file", fsync_or_fail)


def temporary_of(name: str):
    """``fails`` for the temporary of the file ``name``."""
    return lambda path, n: path.name.startswith(f".{name}.")


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


def manifest(out: Path) -> tuple[list[dict], list[dict]]:
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, json.loads((out / "manifest.json").read_text())["cases"]


def assert_complete_cases_only(out: Path) -> set[str]:
    """Every mask has its sidecar and QC picture and reads fully; returns the cases present."""
    from PIL import Image

    masks = {p.name[: -len("_seg.nii.gz")] for p in out.glob("*_seg.nii.gz")}
    assert masks == {p.name[: -len("_seg.json")] for p in out.glob("*_seg.json")}
    assert masks == {p.stem for p in (out / "qc").glob("*.png")}
    for case in masks:
        assert nib.load(str(out / f"{case}_seg.nii.gz")).get_fdata().shape == (24, 24, 12)
        json.loads((out / f"{case}_seg.json").read_text())
        with Image.open(out / "qc" / f"{case}.png") as picture:
            picture.load()
    assert leftovers(out) == []
    return masks


# --- one case meets a full disk ----------------------------------------------------------------------


@pytest.mark.parametrize("which, error, problem", [
    ("scan_1_seg.nii.gz", errno.ENOSPC, NO_SPACE),
    ("scan_1.png", errno.ENOSPC, NO_SPACE),
    ("scan_1_seg.json", errno.ENOSPC, NO_SPACE),
    ("scan_1_seg.nii.gz", errno.EDQUOT, "disk quota exceeded while writing"),
    ("scan_1_seg.nii.gz", errno.EACCES, "permission denied while writing"),
])
def test_a_case_that_meets_a_full_disk_fails_cleanly_and_resumes(tmp_path, capsys, batch, monkeypatch,
                                                                  which, error, problem):
    out = tmp_path / "out"
    assert segment(capsys, batch, out)[0] == 0  # an earlier run: scan_1's older mask is there to go
    disk = FillingDisk(monkeypatch, temporary_of(which), error)

    code, stdout, stderr = segment(capsys, batch, out, "--overwrite")

    assert code == 1 and len(disk.failed) == 1 and disk.failed[0].name.startswith(f".{which}.")
    failed_lines = [line for line in stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed_lines) == 1 and failed_lines[0].startswith(f"failed: scan_1 (in/scan_1_0000.nii.gz): {problem} '")
    assert which in failed_lines[0] and "Traceback" not in stderr
    assert f"segmented 3/4 cases into {out}; 1 failed" in stdout
    assert not list(out.glob("scan_1*")) and not (out / "qc" / "scan_1.png").exists()  # nor the older mask
    assert assert_complete_cases_only(out) == {"scan_0", "scan_2", "scan_3"}
    for rows in manifest(out):
        assert [(r["case_id"], r["status"]) for r in rows] == [
            ("scan_0", "done"), ("scan_1", "failed"), ("scan_2", "done"), ("scan_3", "done")]
        assert rows[1]["error"].startswith(problem) and which in rows[1]["error"]
    with open(out / "lesions.csv", newline="") as handle:
        lesion_cases = {r["case_id"] for r in csv.DictReader(handle)}
    assert "scan_1" not in lesion_cases and lesion_cases <= {"scan_0", "scan_2", "scan_3"}
    assert problem in (out / "index.html").read_text()

    monkeypatch.undo()  # space again: the same command finishes the rest
    code, stdout, stderr = segment(capsys, batch, out)
    assert code == 0, stderr
    assert "done 4 (3 from an earlier run)" in stdout
    assert assert_complete_cases_only(out) == set(CASES)
    assert all(r["status"] == "done" for r in manifest(out)[0])


def test_a_disk_full_for_the_reports_too_stops_the_run_with_one_error_line(tmp_path, capsys, batch, monkeypatch):
    """From the 8th atomic write of the run on, every write fails: the disk is full. Cases whose
    sidecar was written are complete; the rest has nothing on disk; the next run with space finishes."""
    out = tmp_path / "out"
    FillingDisk(monkeypatch, lambda path, n: n >= 8)

    code, stdout, stderr = segment(capsys, batch, out)

    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {NO_SPACE} '") and "Traceback" not in stderr, stderr
    done = assert_complete_cases_only(out)
    assert len(done) < len(CASES)

    monkeypatch.undo()
    code, stdout, stderr = segment(capsys, batch, out)
    assert code == 0, stderr
    assert f"done 4 ({len(done)} from an earlier run)" in stdout
    assert assert_complete_cases_only(out) == set(CASES)
    assert [(r["case_id"], r["status"]) for r in manifest(out)[1]] == [(c, "done") for c in CASES]
    assert not (out / ".medseg.lock").exists()


# --- a folder that cannot be written -------------------------------------------------------------------


@pytest.mark.parametrize("error, says", [
    (errno.EACCES, "Permission denied. Choose a folder you can write to"),
    (errno.EROFS, "Read-only file system. Choose a folder you can write to"),
    (errno.ENOSPC, "No space left on device. Free space on that disk or choose another folder"),
])
def test_unwritable_output_folder_is_exit_2_before_any_work(tmp_path, capsys, batch, monkeypatch, error, says):
    """Root ignores permission bits, so the refusal is a stand-in: the write probe raises."""
    real = Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".medseg-write-test."):
            raise OSError(error, os.strerror(error), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    out = tmp_path / "out"
    code, stdout, stderr = segment(capsys, batch, out)
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == [f"error: cannot write to output folder '{out}': {says}"]
    assert sorted(p.name for p in out.rglob("*")) == ["qc"]  # no lock, no manifest, no probe


# --- a real size-limited (and a read-only) file system ---------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the FillingDisk stand-in tests cover the guarantee")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip() or done.returncode}); "
                    "the FillingDisk stand-in tests cover the guarantee")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_real_full_tmpfs_fails_cases_cleanly_and_resumes_with_space(tmp_path, capsys, batch):
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        out = disk / "out"
        stats = os.statvfs(disk)
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 120 * 1024))  # ~120 KiB left

        code, stdout, stderr = segment(capsys, batch, out)

        assert code in (1, 2), stderr  # some case failed; 2 if none fitted or the reports no longer did
        assert NO_SPACE in stderr and "Traceback" not in stderr
        done = assert_complete_cases_only(out)
        assert len(done) < len(CASES)
        if (out / "manifest.csv").exists():
            for row in manifest(out)[0]:
                assert row["status"] == "done" or row["error"].startswith(NO_SPACE), row

        ballast.unlink()  # space again
        code, stdout, stderr = segment(capsys, batch, out)
        assert code == 0, stderr
        assert f"done 4 ({len(done)} from an earlier run)" in stdout
        assert assert_complete_cases_only(out) == set(CASES)
        assert not (out / ".medseg.lock").exists()


def test_a_read_only_file_system_is_exit_2_before_any_work(tmp_path, capsys, batch):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        code, stdout, stderr = segment(capsys, batch, folder)
        assert code == 2
        assert stderr.splitlines() == [f"error: cannot write to output folder '{folder}': "
                                       "Read-only file system. Choose a folder you can write to"]


def test_a_run_log_that_cannot_be_written_is_one_warning_not_a_traceback_per_line(tmp_path, capsys, caplog,
                                                                                  batch, monkeypatch):
    from pipeline.batch import runlog as batch_module

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(batch_module._RunLogHandler, "_open", lambda self: FullDisk())
    code, stdout, stderr = segment(capsys, batch, tmp_path / "out")
    assert code == 0, stderr
    warnings = [r.getMessage() for r in caplog.records if "cannot write to the run's log" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], caplog.text
    assert "Logging error" not in stderr and "Traceback" not in stderr
    assert "done 4 (0 from an earlier run)" in stdout
