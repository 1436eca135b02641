"""Probabilities from the preprocessed grid back onto the source grid, a few source slices at a time.

Preprocessing only reorients (a permutation and flips of the axes), rescales each axis and crops to a
box, so every source axis maps onto one preprocessed axis by ``p = scale * i + offset``. Linear
interpolation then separates into three 1D interpolations, and the source volume can be produced slab by
slab: the memory is a few source slices of probabilities, not ``classes x`` the whole source volume.

The rules are those of inverting the preprocessing with MONAI (``Invertd``): outside the foreground box
the probabilities are zero (the crop is undone by zero padding), and beyond the first or last voxel of
the full resampled grid the edge value is used (MONAI's ``border`` padding). When the mapping is not
axis-aligned (a preprocessing step this module does not know), :func:`axis_map` returns ``None`` and the
caller falls back to ``Invertd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class AxisMap:
    """Source axis ``i`` samples preprocessed axis ``target`` at ``scale * i + offset`` (voxel units)."""

    target: int
    scale: float
    offset: float


@dataclass(frozen=True)
class Box:
    """Where the stored probabilities sit in the full preprocessed grid (the foreground crop)."""

    start: tuple[int, ...]
    full_shape: tuple[int, ...]


def axis_map(source_affine: np.ndarray, target_affine: np.ndarray, tol: float = 1e-4) -> Optional[list[AxisMap]]:
    """Per source axis, the preprocessed axis and linear map, or ``None`` if the grids are not axis-aligned."""
    m = np.linalg.inv(np.asarray(target_affine, dtype=np.float64)) @ np.asarray(source_affine, dtype=np.float64)
    linear = m[:3, :3]
    maps, used = [], set()
    for s in range(3):
        column = np.abs(linear[:, s])
        target = int(np.argmax(column))
        if column[target] == 0 or np.any(np.delete(column, target) > tol * column[target]) or target in used:
            return None
        used.add(target)
        maps.append(AxisMap(target=target, scale=float(linear[target, s]), offset=float(m[target, 3])))
    return maps


def crop_box(image, spatial_shape: Sequence[int]) -> Box:
    """The foreground box of a preprocessed MetaTensor, from its recorded crop (none: the whole grid)."""
    for op in reversed(getattr(image, "applied_operations", []) or []):
        info = op.get("extra_info") or {}
        if "cropped" in info and op.get("orig_size") is not None:
            cropped = [int(c) for c in info["cropped"]]
            return Box(start=tuple(cropped[0::2]), full_shape=tuple(int(s) for s in op["orig_size"]))
    return Box(start=(0,) * len(spatial_shape), full_shape=tuple(int(s) for s in spatial_shape))


def _axis_matrix(count_from: int, count: int, amap: AxisMap, box_start: int, box_size: int, full: int,
                 low_limit: int = 0, nearest: bool = False) -> torch.Tensor:
    """Linear interpolation along one axis as a (count x box_size - low_limit) matrix, two weights per row
    (``nearest``: one weight of 1, at the nearest voxel: labels stay exact through the matrix product).

    ``amap`` gives positions in box coordinates; the full grid spans ``-box_start .. full - box_start - 1``:
    beyond it the edge value is used (MONAI's border padding), inside it but outside the box the values
    are zero (the crop undone by zero padding).
    """
    i = np.arange(count_from, count_from + count, dtype=np.float64)
    p = np.round(amap.scale * i + amap.offset, 6)  # exact grid positions stay exact (frac 0)
    p = np.clip(p, -box_start, full - 1 - box_start)
    low = np.floor(p + 0.5) if nearest else np.floor(p)
    frac = np.zeros_like(p) if nearest else p - low
    low = low.astype(np.int64)
    high = np.minimum(low + 1, full - 1 - box_start)
    matrix = np.zeros((count, box_size - low_limit), dtype=np.float32)
    rows = np.arange(count)
    for index, w in ((low, 1 - frac), (high, frac)):
        inside = (index >= low_limit) & (index < box_size)
        np.add.at(matrix, (rows[inside], index[inside] - low_limit), w[inside])
    return torch.from_numpy(matrix)


def _needed(count_from: int, count: int, amap: AxisMap, box_start: int, box_size: int, full: int) -> tuple[int, int]:
    """The range of box indices the interpolation of source voxels ``count_from ..`` reads."""
    i = np.array([count_from, count_from + count - 1], dtype=np.float64)
    p = np.clip(np.round(amap.scale * i + amap.offset, 6), -box_start, full - 1 - box_start)
    lo = int(np.clip(np.floor(p.min()), 0, box_size - 1))
    hi = int(np.clip(np.floor(p.max()) + 1, 0, box_size - 1))
    return lo, hi


def _interpolate(values: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """Apply an interpolation matrix (out x in) along ``dim`` (a matrix product: fast and exact enough)."""
    return torch.movedim(torch.matmul(torch.movedim(values, dim, -1), matrix.T), -1, dim)


def to_source_slabs(
    probs: torch.Tensor,
    box: Box,
    maps: list[AxisMap],
    source_shape: Sequence[int],
    on_slab: Callable[[int, int, torch.Tensor], None],
    max_elements: int = 1 << 24,
    nearest: bool = False,
) -> None:
    """Interpolate ``probs`` (K, *box) onto the source grid and hand it over in slabs of the last source axis.

    ``on_slab(k0, k1, values)`` receives float32 (K, I, J, k1 - k0) for source slices ``k0:k1``.
    ``nearest``: nearest-voxel sampling (label maps).
    """
    channels = probs.shape[0]
    ni, nj, nk = (int(s) for s in source_shape)
    step = max(1, min(nk, max_elements // max(1, channels * ni * nj)))
    in_plane = [
        _axis_matrix(0, n, amap, box.start[amap.target], probs.shape[1 + amap.target], box.full_shape[amap.target],
                     nearest=nearest)
        for n, amap in zip((ni, nj), maps[:2])
    ]
    slab_map = maps[2]
    dim = 1 + slab_map.target
    size, start, full = probs.shape[dim], box.start[slab_map.target], box.full_shape[slab_map.target]
    for k0 in range(0, nk, step):
        k1 = min(nk, k0 + step)
        lo, hi = _needed(k0, k1 - k0, slab_map, start, size, full)
        values = probs.narrow(dim, lo, hi - lo + 1).float()
        slab_matrix = _axis_matrix(k0, k1 - k0, slab_map, start, hi + 1, full, low_limit=lo, nearest=nearest)
        values = _interpolate(values, dim, slab_matrix)
        for amap, matrix in zip(maps[:2], in_plane):
            values = _interpolate(values, 1 + amap.target, matrix)
        order = [0] + [1 + amap.target for amap in maps]
        values = values.permute(*order)
        on_slab(k0, k1, values)
