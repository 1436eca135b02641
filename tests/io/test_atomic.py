"""Atomic writes: outputs get the umask's normal mode (not mkstemp's 0600) and are synced to disk."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from pipeline.io import atomic
from pipeline.io.atomic import atomic_path, write_json


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


def _write_mask(path: Path) -> None:
    from pipeline.io.write import write_mask

    write_mask(np.zeros((4, 5, 3), np.uint8), np.eye(4), path)


def _write_json(path: Path) -> None:
    write_json({"a": 1}, path)


def _write_checkpoint(path: Path) -> None:
    from pipeline.config.load import load_config
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    save_checkpoint(path, Checkpoint(config=load_config(), state_dict={}))


def _write_png(path: Path) -> None:
    from pipeline.batch.report.qc import write_qc_png

    write_qc_png(path, np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 4), np.uint8), np.eye(4), dpi=20)


def _write_csv(path: Path) -> None:
    from pipeline.batch.report.manifest import write_manifest

    write_manifest([], path, path.with_suffix(".json"))


def _write_onnx_cache_json(path: Path) -> None:
    from pipeline.infer.backend import _write_json_atomic

    _write_json_atomic(path, {"choice": "torch"})


WRITERS = {
    "mask.nii.gz": _write_mask,
    "sidecar.json": _write_json,
    "best.pt": _write_checkpoint,
    "qc.png": _write_png,
    "manifest.csv": _write_csv,
    "calibration.json": _write_onnx_cache_json,
}


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
@pytest.mark.parametrize("name", list(WRITERS))
def test_outputs_get_the_umask_mode(tmp_path, umask, name, mask, expected):
    umask(mask)
    path = tmp_path / name
    WRITERS[name](path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == expected
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_umask_is_read_without_changing_it(umask):
    umask(0o027)
    assert atomic.current_umask() == 0o027
    assert atomic.default_file_mode() == 0o640
    assert os.umask(0o027) == 0o027


def test_file_synced_before_rename_and_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out" / "mask.nii.gz"
    _write_mask(target)
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    tmp_name = events[1][1]
    assert events[0][1] == tmp_name  # the temporary file, with its content, before the rename
    assert events[1][2] == str(target)
    assert events[2][1] == str(target.parent)  # the folder holding the new name, after


def test_failed_write_leaves_nothing_and_syncs_nothing(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
    assert synced == []


@pytest.mark.parametrize("mask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_folders_built_aside_get_the_umask_mode(tmp_path, umask, mask, folder_mode, file_mode):
    """DICOM series and synthetic datasets are built in a temporary folder (mkdtemp: 0700) and renamed."""
    from pipeline.io.dicom_write import write_dicom_series
    from pipeline.synth import synthesize

    umask(mask)
    paths = write_dicom_series(np.zeros((4, 4, 2), np.int16), np.eye(4), tmp_path / "series")
    assert stat.S_IMODE((tmp_path / "series").stat().st_mode) == folder_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths} == {file_mode}

    root = synthesize(tmp_path / "synth", cases=2, seed=0, test_fraction=0.5, dicom_test_cases=1,
                      shape=(40, 40, 12), spacing=(0.8, 0.8, 2.5))
    assert {stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")] if p.is_dir()} == {folder_mode}
    assert {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()} == {file_mode}


def test_a_umask_without_owner_write_does_not_stop_the_writer(tmp_path, umask):
    umask(0o277)
    write_json({"a": 1}, tmp_path / "x.json")
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o400


@pytest.mark.parametrize("error, problem", [(errno.ENOSPC, "no space left on device"),
                                            (errno.EDQUOT, "disk quota exceeded"),
                                            (errno.EROFS, "read-only file system"),
                                            (errno.EACCES, "permission denied")])
def test_a_full_disk_inside_the_block_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, error, problem):
    from pipeline.errors import MedsegError, OutputWriteError

    target = tmp_path / "mask.nii.gz"
    with pytest.raises(OutputWriteError) as raised:
        with atomic_path(target, suffix=".tmp.nii.gz") as tmp:
            tmp.write_bytes(b"half a file")
            raise OSError(error, os.strerror(error))
    assert str(raised.value).startswith(f"{problem} while writing '{target}': ")
    assert isinstance(raised.value, OSError) and raised.value.errno == error  # `except OSError` still works
    assert isinstance(raised.value, MedsegError) and "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_inside_the_block_pass_unchanged(tmp_path):
    with pytest.raises(OSError) as raised:
        with atomic_path(tmp_path / "x.json"):
            raise OSError(errno.EIO, "I/O error")
    assert type(raised.value) is OSError and raised.value.errno == errno.EIO
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x.json"):
            raise KeyError("not an OSError")
    assert list(tmp_path.iterdir()) == []
