"""Where the sliding windows go, and how much each voxel of a window counts: MONAI's rules, exactly.

The window grid and the blending weights are those of MONAI's ``sliding_window_inference`` (scan
interval ``int(roi * (1 - overlap))``, the last window flush with the end of the axis, a volume smaller
than the window padded symmetrically with zeros, Gaussian weights with sigma = roi / 8 clamped below at
1e-3), so our streaming inference and a plain MONAI run blend the same windows with the same weights.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from monai.data.utils import compute_importance_map


def axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of ``size`` voxels (``size >= roi``)."""
    if roi >= size:
        return [0]
    step = max(int(roi * (1 - overlap)), 1)
    count = next(n for n in range(size) if n * step + roi >= size) + 1
    return [min(n * step, size - roi) for n in range(count)]


@dataclass(frozen=True)
class WindowGrid:
    """Windows of size ``roi`` over a volume of spatial ``shape`` (after padding to at least ``roi``)."""

    shape: tuple[int, ...]  # the volume as given
    roi: tuple[int, ...]
    overlap: float

    @property
    def padding(self) -> list[tuple[int, int]]:
        """(before, after) zero padding per axis that makes every axis at least the window."""
        out = []
        for size, roi in zip(self.shape, self.roi):
            diff = max(roi - size, 0)
            out.append((diff // 2, diff - diff // 2))
        return out

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(max(s, r) for s, r in zip(self.shape, self.roi))

    def starts(self) -> list[tuple[int, ...]]:
        """Window starts in the padded volume, ordered by the last axis first (then the others).

        Ordered so that the windows of one position along the last axis come together: everything
        before the next position's start is final once they are done (the streaming order).
        """
        per_axis = [axis_starts(s, r, self.overlap) for s, r in zip(self.padded_shape, self.roi)]
        grid = itertools.product(*per_axis)
        return sorted(grid, key=lambda start: (start[-1],) + start[:-1])

    def __len__(self) -> int:
        n = 1
        for s, r in zip(self.padded_shape, self.roi):
            n *= len(axis_starts(s, r, self.overlap))
        return n


def blend_weights(roi: Sequence[int], blend: str, device="cpu") -> torch.Tensor:
    """Per-voxel weights of one window (float32, shape ``roi``), as MONAI blends them."""
    weights = compute_importance_map(tuple(int(r) for r in roi), mode=blend, sigma_scale=0.125, device=device,
                                     dtype=torch.float32)
    return weights.to(torch.float32)
