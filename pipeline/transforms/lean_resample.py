"""Resampling (``Spacingd``) without a full sampling grid: the same voxels, a few slabs of grid at a time.

MONAI's ``Spacingd`` (torch backend) ends in ``AffineTransform``: ``affine_grid`` builds the sampling
grid of the whole output (3 float32 per output voxel, after a 4-float base grid), then ``grid_sample``
reads it. For a 0.8 mm CT resampled to 1.6×1.6×2.5 mm that grid is ~3 bytes per *source* voxel at its
peak, as much as a float16 copy of the scan. :class:`SlabAffineTransform` is MONAI's
``AffineTransform`` with the last step done slab by slab along the output's first spatial axis: each
slab's grid is the base grid's rows times theta, exactly as ``affine_grid`` computes them (the same
linspace, the same ``bmm``), and ``grid_sample`` maps every output voxel from its own grid point, so the
result is bit-identical (tested against MONAI's for several shapes, both ``align_corners``).

:class:`LeanSpacingd` is ``Spacingd`` running with it (inference's lean preprocessing).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from monai.networks.layers.spatial_transforms import AffineTransform
from monai.networks.utils import to_norm_affine
from monai.transforms import Spacingd
from monai.utils import ensure_tuple

__all__ = ["LeanSpacingd", "SlabAffineTransform", "slab_affine"]

SLAB_VOXELS = 1 << 18  # output voxels per slab: ~7 MB of base grid + grid (small enough for the heap to reuse)


def _linspace(steps: int, align_corners: bool) -> torch.Tensor:
    """``affine_grid``'s coordinates along one axis (``linspace_from_neg_one``)."""
    r = torch.linspace(-1, 1, steps, dtype=torch.float32)
    return r if align_corners else r * (steps - 1) / steps


def _grid_rows(theta: torch.Tensor, size, align_corners: bool, d0: int, d1: int) -> torch.Tensor:
    """Rows ``d0:d1`` of ``F.affine_grid(theta, size, align_corners)`` (5D sizes), computed alone."""
    n, _, d, h, w = size
    base = torch.empty((n, d1 - d0, h, w, 4), dtype=theta.dtype, device=theta.device)
    base[..., 0].copy_(_linspace(w, align_corners))
    base[..., 1].copy_(_linspace(h, align_corners).unsqueeze(-1))
    base[..., 2].copy_(_linspace(d, align_corners)[d0:d1].unsqueeze(-1).unsqueeze(-1))
    base[..., 3].fill_(1)
    return base.view(n, -1, 4).bmm(theta.transpose(1, 2)).view(n, d1 - d0, h, w, 3)


def slab_affine(src: torch.Tensor, theta: torch.Tensor, dst_size, mode: str, padding_mode: str,
                align_corners: bool, slab_voxels: int = SLAB_VOXELS) -> torch.Tensor:
    """``grid_sample(src, affine_grid(theta, dst_size))`` for 3D images, a slab of output rows at a time."""
    n, c, d, h, w = dst_size
    out = torch.empty((n, c, d, h, w), dtype=src.dtype, device=src.device)
    step = max(1, slab_voxels // max(1, h * w))
    src = src.contiguous()
    for d0 in range(0, d, step):
        d1 = min(d, d0 + step)
        grid = _grid_rows(theta, dst_size, align_corners, d0, d1)
        out[:, :, d0:d1] = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode,
                                         align_corners=align_corners)
        del grid
    return out


class SlabAffineTransform(AffineTransform):
    """MONAI's ``AffineTransform`` (as ``spatial_resample`` uses it) with the grid built slab by slab
    for 3D images; 2D images go to MONAI's own."""

    def forward(self, src, theta, spatial_size=None):
        if not isinstance(src, torch.Tensor) or src.dim() != 5 or not isinstance(theta, torch.Tensor):
            return super().forward(src, theta, spatial_size)
        # as AffineTransform.forward (MONAI 1.x) up to the grid
        if theta.dim() == 2:
            theta = theta[None]
        theta = theta.clone()
        if tuple(theta.shape[1:]) == (3, 4):
            pad = torch.tensor([0, 0, 0, 1]).repeat(theta.shape[0], 1, 1).to(theta)
            theta = torch.cat([theta, pad], dim=1)
        if tuple(theta.shape[1:]) != (4, 4) or not torch.is_floating_point(theta):
            return super().forward(src, theta, spatial_size)
        sr = 3
        src_size = tuple(src.shape)
        dst_size = src_size
        if self.spatial_size is not None:
            dst_size = src_size[:2] + self.spatial_size
        if spatial_size is not None:
            dst_size = src_size[:2] + ensure_tuple(spatial_size)
        dst_size = tuple(int(s) for s in dst_size)
        if not self.normalized:
            theta = to_norm_affine(affine=theta, src_size=src_size[2:], dst_size=dst_size[2:],
                                   align_corners=self.align_corners, zero_centered=self.zero_centered)
        if self.reverse_indexing:
            rev_idx = torch.as_tensor(range(sr - 1, -1, -1), device=src.device)
            theta[:, :sr] = theta[:, rev_idx]
            theta[:, :, :sr] = theta[:, :, rev_idx]
        if theta.shape[0] == 1 and src_size[0] > 1:
            theta = theta.repeat(src_size[0], 1, 1)
        if theta.shape[0] != src_size[0]:
            raise ValueError(f"affine and image batch dimension must match, got affine={theta.shape[0]} "
                             f"image={src_size[0]}.")
        return slab_affine(src, theta[:, :sr], dst_size, self.mode, self.padding_mode, self.align_corners,
                           slab_voxels=SLAB_VOXELS)


_lock = threading.RLock()


@contextmanager
def _slab_resampling():
    """``spatial_resample`` uses :class:`SlabAffineTransform` inside the block. The name is module-wide:
    a lock keeps two blocks from interleaving their restores; another thread resampling meanwhile gets
    the slab version too, which gives the same voxels."""
    from monai.transforms.spatial import functional

    with _lock:
        before = functional.AffineTransform
        functional.AffineTransform = SlabAffineTransform
        try:
            yield
        finally:
            functional.AffineTransform = before


class LeanSpacingd(Spacingd):
    """``Spacingd`` whose resampling builds its grid slab by slab (:class:`SlabAffineTransform`)."""

    def __call__(self, data, lazy=None):
        with _slab_resampling():
            return super().__call__(data, lazy=lazy)
