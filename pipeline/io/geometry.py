"""The geometry rules every reader and writer in the package share.

Conventions
-----------
* Arrays are indexed ``[i, j, k]`` (x fastest in the file), affines map ``(i, j, k, 1)`` to world
  millimetres in **RAS** (the NIfTI and MONAI convention). DICOM and ITK speak LPS; the conversion is
  a flip of the first two world axes (:data:`LPS_TO_RAS`).
* A DICOM series' *source geometry* is the one dcm2niix gives it: the slices stacked along their
  normal (sorted by the projection of ImagePositionPatient on it), then re-oriented losslessly (axis
  flips and permutations only, no resampling) to the closest canonical RAS frame. This was checked
  against dcm2niix's output for axial (LPS) and sagittal (PIR) series.
"""

from __future__ import annotations

import nibabel.orientations as nio
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Two grids are the same when their shapes are equal and every entry of their affines' first three rows
# (voxel axes, i.e. direction x spacing, and origin, all in mm) differs by at most this: far above the
# float32 rounding of NIfTI headers (~1e-5 mm at 500 mm from the origin), far below any real
# misregistration or resampling.
AFFINE_TOLERANCE_MM = 1e-3


def affine_from_sitk(image) -> np.ndarray:
    """RAS affine of a SimpleITK image, for its array transposed to ``[i, j, k]``."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return LPS_TO_RAS @ affine


def set_sitk_geometry(image, affine: np.ndarray) -> None:
    """Give a SimpleITK image (made from an ``[i, j, k]`` array transposed to ``[k, j, i]``) the RAS
    ``affine``: the inverse of :func:`affine_from_sitk`."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = voxel_spacing(lps)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing[None, :]).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])


def closest_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute ``array`` (spatial axes first) and ``affine`` to the closest RAS frame, losslessly.

    The world position of every voxel is unchanged: ``new_affine @ new_index == affine @ old_index``.
    The array returned is a view (flips and transposes, no copy); copy it if you need C order.
    """
    ornt = nio.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    shape = array.shape[:3]
    new_array = nio.apply_orientation(array, ornt)
    new_affine = affine @ nio.inv_ornt_aff(ornt, shape)
    return new_array, new_affine


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm³ (absolute determinant of the linear part)."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def grid_difference(shape_a, affine_a: np.ndarray, shape_b, affine_b: np.ndarray,
                    tolerance_mm: float = AFFINE_TOLERANCE_MM) -> str | None:
    """How grid b differs from grid a (shape, else affine beyond ``tolerance_mm``), or None if they match."""
    if tuple(shape_a) != tuple(shape_b):
        return f"shape {tuple(int(s) for s in shape_b)} vs {tuple(int(s) for s in shape_a)}"
    a, b = np.asarray(affine_a, dtype=np.float64)[:3], np.asarray(affine_b, dtype=np.float64)[:3]
    delta = float(np.abs(a - b).max())
    if delta <= tolerance_mm:
        return None
    origin = float(np.abs(a[:, 3] - b[:, 3]).max())
    axes = float(np.abs(a[:, :3] - b[:, :3]).max())
    return (f"affine differs by up to {delta:.4g} mm (tolerance {tolerance_mm:g} mm; origin by {origin:.4g} mm, "
            f"voxel axes by {axes:.4g} mm): origin {_mm(b[:, 3])} vs {_mm(a[:, 3])}, spacing "
            f"{_mm(voxel_spacing(b))} vs {_mm(voxel_spacing(a))}")


def _mm(vector) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in vector) + ")"
