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

from pipeline.errors import ConfigError, InputError
from pipeline.io.atomic import make_partial_dir

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

    ``write`` must leave a ``dataset.json`` whose ``marker`` key equals ``params`` (a dotted marker,
    ``"medseg.recipe"``, names a nested key); ``files(meta)`` lists the paths (relative to the folder) a
    complete dataset holds, from that ``dataset.json``.
    """
    out_dir = Path(out_dir)
    if _is_complete(out_dir, params, marker, files):
        logger.info("synthetic dataset already in %s (seed %s, %s cases)", out_dir, params.get("seed"),
                    params.get("cases"))
        return out_dir
    _check_replaceable(out_dir)

    tmp_dir = make_partial_dir(out_dir)  # a normal folder mode, not mkdtemp's 0700
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


def split_params(cases, seed, test_fraction, dicom_test_cases, shape, spacing, recipe_version: int) -> dict:
    """The validated recipe of a dataset: ``cases`` cases, the last ``round(cases * test_fraction)`` of
    them the test split, whose first ``dicom_test_cases`` are written as DICOM."""
    shape = [int(n) for n in shape]
    spacing = [float(s) for s in spacing]
    if int(cases) < 1:
        raise ConfigError(f"synthesize: expected cases >= 1, found {cases}.")
    if not 0 <= float(test_fraction) < 1:
        raise ConfigError(f"synthesize: expected 0 <= test_fraction < 1, found {test_fraction}.")
    if int(dicom_test_cases) < 0:
        raise ConfigError(f"synthesize: expected dicom_test_cases >= 0, found {dicom_test_cases}.")
    if len(shape) != 3 or len(spacing) != 3:
        raise ConfigError(f"synthesize: expected 3D shape and spacing, found {shape} and {spacing}.")
    n_test = int(round(int(cases) * float(test_fraction)))
    return {
        "seed": int(seed),
        "cases": int(cases),
        "test_fraction": float(test_fraction),
        "num_test": n_test,
        "dicom_test_cases": min(int(dicom_test_cases), n_test),
        "shape": shape,
        "spacing": spacing,
        "recipe_version": int(recipe_version),
    }


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
    recipe = meta
    for key in marker.split("."):
        recipe = recipe.get(key) if isinstance(recipe, dict) else None
    if recipe != params:
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
