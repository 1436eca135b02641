"""Writing a synthetic dataset folder once: cached by its recipe, built aside and renamed into place.

A dataset folder made here holds a ``dataset.json`` whose ``marker`` key (``"synthesis"`` for CT,
``"medseg"`` for MR) holds the recipe it was made with. :func:`write_dataset_once` leaves a complete
folder made with the same recipe as it is, refuses to replace a folder that is neither empty nor one of
ours, and otherwise builds the dataset in a temporary sibling folder and renames it into place, so an
interrupted run never leaves half a dataset behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import InputError

logger = logging.getLogger(__name__)

RECIPE_KEYS = ("synthesis", "medseg")  # dataset.json keys that mark a dataset made by pipeline.synth


def write_dataset_once(
    out_dir: str | Path,
    params: dict,
    *,
    marker: str,
    write: Callable[[Path], None],
    files: Callable[[dict], Iterable[str]],
) -> Path:
    """Make ``out_dir`` hold the dataset ``write(folder)`` writes for ``params``; returns ``out_dir``.

    ``write`` must leave a ``dataset.json`` whose ``marker`` key equals ``params``; ``files(meta)``
    lists the paths (relative to the folder) a complete dataset holds, from that ``dataset.json``.
    """
    out_dir = Path(out_dir)
    if _is_complete(out_dir, params, marker, files):
        logger.info("synthetic dataset already in %s (seed %s, %s cases)", out_dir, params.get("seed"),
                    params.get("cases"))
        return out_dir
    _check_replaceable(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        started = time.perf_counter()
        write(tmp_dir)
        _move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("wrote %s synthetic cases to %s in %.1f s", params.get("cases"), out_dir,
                time.perf_counter() - started)
    return out_dir


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """``array`` as NIfTI with ``affine`` in both the sform and the qform (code 1, scanner), in mm."""
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, params: dict, marker: str, files) -> bool:
    meta = _read_json(out_dir / "dataset.json")
    if not meta or meta.get(marker) != params:
        return False
    return all((out_dir / name).exists() for name in files(meta))


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or one of our own synthetic datasets may be replaced."""
    if not out_dir.exists():
        return
    meta = _read_json(out_dir / "dataset.json") if out_dir.is_dir() else None
    ours = isinstance(meta, dict) and any(key in meta for key in RECIPE_KEYS)
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not ours):
        raise InputError(
            f"synthesize: expected {out_dir} to be missing, empty, or a synthetic dataset made by this "
            "tool, found other content. Choose another output folder or move that one away."
        )
    logger.info("replacing the synthetic dataset in %s (different arguments)", out_dir)


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp_dir.rename(out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
