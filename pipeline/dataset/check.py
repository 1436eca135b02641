"""``check_dataset``: read every file of a dataset and report every problem at once.

What is checked, per case (one case in memory at a time):

* the layout problems of :func:`~pipeline.dataset.layout.read_dataset` (missing channel or label,
  duplicate case id, misnamed or unlisted files, ``numTraining`` mismatch);
* each file: empty (0 bytes, or no voxel), unreadable (the reader's reason), an image with NaN or Inf
  voxels (float NIfTI files are read again by nibabel for this: SimpleITK reads NaN and Inf as 0), a
  channel or label that is not a 3D volume, an MSD 4D image whose 4th axis does not hold one volume per
  modality;
* grids: every channel on the grid of the first, the label on the grid of the image
  (:func:`pipeline.io.geometry.grid_difference`: equal shapes, and affine entries within
  ``affine_tolerance_mm``, default :data:`~pipeline.io.geometry.AFFINE_TOLERANCE_MM` = 1e-3 mm, the rule
  ``medseg evaluate`` applies to masks);
* label values: integers only, and only values of ``labels`` (the argument, else the dataset's own; a
  plain folder declares none, so only integrality is checked there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional, Union

import numpy as np

from pipeline.dataset.layout import Dataset, DatasetCase, list_dataset
from pipeline.dataset.problem import Problem
from pipeline.errors import InputError, describe_error
from pipeline.io.geometry import AFFINE_TOLERANCE_MM, grid_difference

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    root: Path
    layout: str
    cases: int  # cases listed (a case missing an image file is a problem, not a case)
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One ``<case>: <message>`` line per problem: the layout problems, then each case's files in case order
        (``(dataset)`` for a problem of the whole dataset, e.g. numTraining)."""
        return [f"{p.case_id}: {p.message}" for p in self.problems]


def check_dataset(root: Union[str, Path], labels: Optional[dict[str, int]] = None,
                  affine_tolerance_mm: float = AFFINE_TOLERANCE_MM, split: str = "Tr",
                  progress: bool = False, case_ids: Optional[Collection[str]] = None) -> CheckReport:
    """Every problem of the dataset in ``root``; ``labels`` (name -> value) replaces the dataset's own.
    ``case_ids``: read only these cases' files (the layout is still checked whole)."""
    dataset, problems = list_dataset(root, split)
    allowed = dict(labels) if labels is not None else dict(dataset.labels)
    checker = _CaseChecker(dataset, allowed, float(affine_tolerance_mm))
    wanted = None if case_ids is None else set(case_ids)
    cases = dataset.cases if wanted is None else [c for c in dataset.cases if c.case_id in wanted]
    if progress:
        from tqdm import tqdm

        cases = tqdm(cases, desc="check", unit="case")
    for case in cases:
        problems.extend(checker.check(case))
    return CheckReport(dataset.root, dataset.layout, len(cases), problems)


class _CaseChecker:
    """Reads one case's files and lists what is wrong with them."""

    def __init__(self, dataset: Dataset, labels: dict[str, int], tolerance_mm: float):
        from pipeline.io.reader import ScanReader  # MONAI: imported only when a check runs

        self.dataset, self.labels, self.tolerance_mm = dataset, labels, tolerance_mm
        self.reader = ScanReader(validate=False)  # NaN/Inf and empty images are reported here, with more detail

    def check(self, case: DatasetCase) -> list[Problem]:
        found: list[str] = []
        grid = self._check_four_d(case, found) if case.four_d else self._check_channels(case, found)
        if case.label is not None:
            self._check_label(case.label, grid, found)
        log.debug("checked %s: %d problem(s)", case.case_id, len(found))
        return [Problem(case.case_id, message) for message in found]

    def _check_channels(self, case: DatasetCase, found: list[str]):
        grid = None
        names = self.dataset.channel_names
        for c, path in enumerate(case.images):
            name = f"channel {c} ({names[c] if c < len(names) else c})"
            what = f"{name} {self._rel(path)}"
            volume = self._read(path, what, found)
            if volume is None:
                continue
            array = _squeeze_channel(volume.array)
            if array.ndim != 3:
                found.append(f"{what} has shape {array.shape}: expected a 3D volume per channel")
                continue
            found.extend(f"{what} {message}" for message in _non_finite(path, array))
            if grid is None:
                grid = (array.shape, volume.affine, name)
                continue
            difference = grid_difference(grid[0], grid[1], array.shape, volume.affine, self.tolerance_mm)
            if difference:
                found.append(f"{what}: grid differs from {grid[2]}'s: {difference}")
        return grid

    def _check_four_d(self, case: DatasetCase, found: list[str]):
        path = case.images[0]
        what = f"image {self._rel(path)}"
        volume = self._read(path, what, found)
        if volume is None:
            return None
        array, names = volume.array, self.dataset.channel_names
        if array.ndim != 4 or array.shape[3] != len(names):
            axis = f"{array.shape[3]} volume(s) on its 4th axis" if array.ndim == 4 else f"{array.ndim}D"
            found.append(f"{what} has shape {array.shape} ({axis}): expected a 4D image with one volume per "
                         f"modality on the 4th axis, {len(names)} ({', '.join(names)})")
        found.extend(f"{what} {message}" for message in _non_finite(path, array))
        return (array.shape[:3], volume.affine, "the image")

    def _check_label(self, path: str, grid, found: list[str]) -> None:
        what = f"label {self._rel(path)}"
        volume = self._read(path, what, found)
        if volume is None:
            return
        array = _squeeze_channel(volume.array)
        if array.ndim != 3:
            found.append(f"{what} has shape {array.shape}: expected a 3D volume")
            return
        if grid is not None:
            difference = grid_difference(grid[0], grid[1], array.shape, volume.affine, self.tolerance_mm)
            if difference:
                found.append(f"{what}: grid differs from the image's: {difference}")
        array = _squeeze_channel(_as_stored(path, array))
        found.extend(f"{what} {message}" for message in _label_value_problems(array, self.labels))

    def _read(self, path: str, what: str, found: list[str]):
        file = Path(path)
        if file.is_file() and file.stat().st_size == 0:
            found.append(f"{what} is empty (0 bytes): re-export it")
            return None
        try:
            volume = self.reader.read(file)
        except InputError as exc:
            found.append(f"{what} is unreadable: {' '.join(str(exc).split())}")
            return None
        except Exception as exc:  # a library's own error on a corrupt file: still one problem among others
            found.append(f"{what} is unreadable: {describe_error(exc)}")
            return None
        if volume.array.size == 0:
            found.append(f"{what} is empty: shape {volume.array.shape}, no voxel")
            return None
        return volume

    def _rel(self, path: str) -> str:
        try:
            return Path(path).relative_to(self.dataset.root).as_posix()
        except ValueError:
            return str(path)


def _squeeze_channel(array: np.ndarray) -> np.ndarray:
    """A 3D volume stored as [i, j, k, 1] is a 3D volume."""
    return array[..., 0] if array.ndim == 4 and array.shape[3] == 1 else array


def _as_stored(path: str, array: np.ndarray) -> np.ndarray:
    """The voxels with their NaN and Inf: SimpleITK, which reads NIfTI voxels for the scan reader, reads
    them as 0, so a float NIfTI file is read again by nibabel, which keeps them (one more volume in memory)."""
    from pipeline.io.reader import is_nifti

    if not is_nifti(path):
        return array
    import nibabel as nib

    image = nib.load(str(path))
    return np.asanyarray(image.dataobj) if image.get_data_dtype().kind in "fc" else array


def _non_finite(path: str, array: np.ndarray) -> list[str]:
    array = _as_stored(path, array)
    if array.dtype.kind not in "fc" or np.isfinite(array).all():
        return []
    out = []
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    if nan:
        out.append(f"holds {nan} NaN voxel(s): expected finite intensities")
    if inf:
        out.append(f"holds {inf} Inf voxel(s): expected finite intensities")
    return out


def _label_value_problems(array: np.ndarray, labels: dict[str, int]) -> list[str]:
    out = []
    if array.dtype.kind in "fc":
        fractional = array[np.isfinite(array) & (array != np.round(array))] if np.isfinite(array).all() else None
        if fractional is None:
            out.append("holds NaN or Inf values: expected integer class values")
            return out
        if fractional.size:
            examples = ", ".join(f"{v:g}" for v in np.unique(fractional)[:3])
            out.append(f"holds non-integer values ({examples}; {fractional.size} voxel(s)): expected integer class "
                       "values; a resampled label must use nearest-neighbour interpolation")
    values = _values(array)
    if labels:
        allowed = set(labels.values())
        outside = [v for v in values if isinstance(v, int) and v not in allowed]
        if outside:
            declared = ", ".join(f"{name}: {value}" for name, value in sorted(labels.items(), key=lambda kv: kv[1]))
            out.append(f"holds values {_list(outside)} outside the labels {{{declared}}}: fix the label, or pass "
                       "the dataset's labels (--labels)")
    return out


def _values(array: np.ndarray) -> list:
    """The distinct values of a label (bincount for small non-negative integers: no sort of the volume)."""
    if array.dtype.kind in "iub":
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high < 1 << 16:
            counts = np.bincount(array.ravel(), minlength=high + 1)
            return [int(v) for v in np.flatnonzero(counts)]
        return [int(v) for v in np.unique(array)]
    return [int(v) if float(v).is_integer() else float(v) for v in np.unique(array)]


def _list(values: list) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:8])
    return f"[{shown}{', ...' if len(values) > 8 else ''}]"
