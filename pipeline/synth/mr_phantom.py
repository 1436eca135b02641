"""One synthetic multi-sequence MR case: FLAIR and T1c of one :class:`~pipeline.synth.mr_head.MRHead`.

The FLAIR grid is anisotropic (default 96x96x32 at 1x1x3 mm, slices along the last axis) in RAS, LPS
or an oblique orientation, as the CT phantom's. T1c is sampled either on the same grid (what nnU-Net
needs of a NIfTI case) or on another one (:func:`other_grid`: thinner slices, a larger in-plane matrix
and a small shift), as a second DICOM series of a study would be: the head is analytic in world mm, so
both grids show the same anatomy at the same world positions. The label is on the FLAIR grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError
from pipeline.synth.grid import ORIENTATIONS, grid_centre, make_affine
from pipeline.synth.mr_head import MRHead, draw_head

logger = logging.getLogger(__name__)

MAX_LESIONS = 3
NO_LESION_PROBABILITY = 1 / 6
OTHER_SLICE_MM = 2.0  # T1c slice spacing on the other grid (or 2/3 of FLAIR's when that is 2 mm)
OTHER_MARGIN = 4  # extra in-plane voxels on each side of the other grid


@dataclass
class MRCase:
    """A synthetic MR case. Arrays are ``[i, j, k]``; affines map voxels to RAS millimetres."""

    flair: np.ndarray  # int16, scanner units, on ``affine``'s grid
    t1c: np.ndarray  # int16, on ``t1c_affine``'s grid
    label: np.ndarray  # uint8 on ``affine``'s grid: 0 background, 1 oedema, 2 core
    affine: np.ndarray  # 4x4 float64, the FLAIR (channel 0) grid
    t1c_affine: np.ndarray  # 4x4 float64, equal to ``affine`` when T1c shares the grid
    head: MRHead
    orientation: str = "RAS"

    @property
    def lesions(self) -> list[dict]:
        return [lesion.summary() for lesion in self.head.lesions]

    @property
    def same_grid(self) -> bool:
        return self.t1c.shape == self.flair.shape and np.array_equal(self.t1c_affine, self.affine)


def make_mr_case(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int, int] = (96, 96, 32),
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
    orientation: str = "RAS",
    n_lesions: int | None = None,
    t1c_grid: str = "same",
) -> MRCase:
    """Draw one case from ``rng``. ``n_lesions=None`` draws 0 (one case in six) or 1-3 lesions;
    ``t1c_grid`` is ``"same"`` (T1c on the FLAIR grid) or ``"other"`` (:func:`other_grid`). The grid
    choice draws nothing from ``rng`` before the noise, so a case's anatomy is the same either way."""
    shape, spacing = _check_args(shape, spacing, orientation, n_lesions, t1c_grid)
    affine = make_affine(rng, shape, spacing, orientation)
    if n_lesions is None:
        n_lesions = 0 if rng.random() < NO_LESION_PROBABILITY else int(rng.integers(1, MAX_LESIONS + 1))
    head = draw_head(rng, affine, shape, n_lesions)
    t1c_shape, t1c_affine = (shape, affine) if t1c_grid == "same" else other_grid(shape, affine)
    flair, t1c_same, label = head.render(shape, affine, rng)
    t1c = t1c_same if t1c_grid == "same" else head.render(t1c_shape, t1c_affine, rng)[1]
    case = MRCase(flair, t1c, label, affine, np.asarray(t1c_affine), head, orientation)
    logger.debug("synthetic MR case: %s, %d lesions, T1c grid %s", orientation, len(head.lesions), t1c_grid)
    return case


def other_grid(shape, affine) -> tuple[tuple[int, int, int], np.ndarray]:
    """A second grid over the same anatomy: same axis directions, 2 mm slices (2/3 of FLAIR's when that
    is already 2 mm), ``OTHER_MARGIN`` more voxels on each side in-plane, slices covering FLAIR's extent
    plus one on each side, and its centre shifted by half a voxel in-plane and a quarter slice."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    slice_mm = OTHER_SLICE_MM if not np.isclose(spacing[2], OTHER_SLICE_MM) else spacing[2] * 2 / 3
    new_spacing = np.array([spacing[0], spacing[1], slice_mm])
    extent = (shape[2] - 1) * spacing[2]
    new_shape = (shape[0] + 2 * OTHER_MARGIN, shape[1] + 2 * OTHER_MARGIN,
                 int(np.ceil(extent / slice_mm)) + 3)
    directions = affine[:3, :3] / spacing
    centre = affine[:3, :3] @ grid_centre(shape) + affine[:3, 3]
    centre = centre + directions @ (new_spacing * [0.5, -0.5, 0.25])
    new = np.eye(4)
    new[:3, :3] = directions * new_spacing
    new[:3, 3] = centre - new[:3, :3] @ grid_centre(new_shape)
    return new_shape, new


def _check_args(shape, spacing, orientation, n_lesions, t1c_grid):
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"synthetic MR shape: expected 3 sizes >= 8, found {shape}. Example: (96, 96, 32).")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ConfigError(f"synthetic MR spacing: expected 3 positive mm values, found {spacing}.")
    if orientation not in ORIENTATIONS:
        raise ConfigError(f"synthetic MR orientation: expected one of {ORIENTATIONS}, found {orientation!r}.")
    if n_lesions is not None and not 0 <= n_lesions <= 10:
        raise ConfigError(f"n_lesions: expected None or 0-10, found {n_lesions}.")
    if t1c_grid not in ("same", "other"):
        raise ConfigError(f"t1c_grid: expected 'same' or 'other', found {t1c_grid!r}.")
    return shape, spacing
