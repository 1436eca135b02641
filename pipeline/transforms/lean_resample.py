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

import mmap
import threading
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.layers.spatial_transforms import AffineTransform
from monai.networks.utils import to_norm_affine
from monai.transforms import InvertibleTransform, MapTransform, Spacingd
from monai.utils import ensure_tuple
from scipy import ndimage

from pipeline.transforms.antialias import lowpass_sigma

__all__ = ["LeanSpacingd", "LowpassSpacingd", "PlaneSource", "SlabAffineTransform", "slab_affine"]

SLAB_VOXELS = 1 << 18  # output voxels per slab: ~7 MB of base grid + grid (small enough for the heap to reuse)
CHUNK_VOXELS = 1 << 23  # source voxels made at a time by PlaneSource (32 MB of float32; at most 1/16 of the scan)
_lazy_sources: dict[int, PlaneSource] = {}  # data pointer -> the planes made on demand
_PRIVATE_MAPS = all(hasattr(mmap, name) for name in ("MAP_PRIVATE", "MAP_ANONYMOUS", "MADV_DONTNEED"))


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
                align_corners: bool, slab_voxels: int = SLAB_VOXELS,
                before_slab: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """``grid_sample(src, affine_grid(theta, dst_size))`` for 3D images, a slab of output rows at a time.

    ``before_slab(p0, p1)``: called before each slab with the planes ``p0:p1`` of ``src``'s first spatial
    axis that the slab's grid reads (with a plane of margin each side)."""
    n, c, d, h, w = dst_size
    out = torch.empty((n, c, d, h, w), dtype=src.dtype, device=src.device)
    step = max(1, slab_voxels // max(1, h * w))
    src = src.contiguous()
    for d0 in range(0, d, step):
        d1 = min(d, d0 + step)
        grid = _grid_rows(theta, dst_size, align_corners, d0, d1)
        if before_slab is not None:
            before_slab(*_planes_read(grid[..., 2], src.shape[2], align_corners))
        out[:, :, d0:d1] = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode,
                                         align_corners=align_corners)
        del grid
    return out


def _planes_read(coordinates: torch.Tensor, size: int, align_corners: bool) -> tuple[int, int]:
    """The planes ``p0:p1`` that ``grid_sample`` reads along an axis of ``size`` voxels for normalised
    ``coordinates``: its unnormalisation in float64, one plane of margin for its float32 rounding."""
    if coordinates.numel() == 0:
        return 0, 0
    ends = torch.stack([coordinates.min(), coordinates.max()]).double()
    ends = (ends + 1) / 2 * (size - 1) if align_corners else ((ends + 1) * size - 1) / 2
    if not torch.isfinite(ends).all():
        return 0, size
    return max(0, int(np.floor(float(ends[0]))) - 1), min(size, int(np.floor(float(ends[1]))) + 3)


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
        planes = _lazy_sources.get(src.data_ptr())
        return slab_affine(src, theta[:, :sr], dst_size, self.mode, self.padding_mode, self.align_corners,
                           slab_voxels=SLAB_VOXELS, before_slab=None if planes is None else planes.ensure)


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


# --- the low-passed float32 copy of the scan, a few planes at a time ----------------------------------


class PlaneSource:
    """What ``EnsureTyped(float32)`` then ``AntiAliasd`` would make of ``source`` (C, X, Y, Z), made
    plane by plane (planes of X) as the resampling asks for them (:meth:`ensure`) and dropped when it has
    gone past them: :attr:`tensor` spans the whole volume in address space (an anonymous private map,
    whose pages take memory only once written, and give it back with ``MADV_DONTNEED``), but only the
    planes being read are resident.

    The values are those of the whole-volume filter, bit for bit: scipy's Gaussian is separable, each
    1D pass computes a line alone, and the planes beyond a chunk that the pass along X reads (its radius,
    ``int(4 * sigma + 0.5)``) are filtered with it; the passes along Y and Z stay inside a plane.
    """

    def __init__(self, source: np.ndarray, sigma: Optional[np.ndarray], chunk_voxels: Optional[int] = None):
        self.source = source
        self.sigma = sigma
        self.shape = tuple(int(n) for n in source.shape)
        self.plane = int(np.prod(self.shape[2:], dtype=np.int64))
        chunk_voxels = CHUNK_VOXELS if chunk_voxels is None else chunk_voxels
        # planes made at a time: about chunk_voxels, and no more than a sixteenth of the scan
        self.chunk = max(1, min(int(chunk_voxels) // max(1, self.plane * self.shape[0]), self.shape[1] // 16))
        self.radius = int(4.0 * float(sigma[0]) + 0.5) if sigma is not None and sigma[0] > 1e-15 else 0
        count = int(np.prod(self.shape, dtype=np.int64))
        if _PRIVATE_MAPS:
            self._map = mmap.mmap(-1, max(1, 4 * count), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.tensor = torch.from_numpy(np.frombuffer(self._map, dtype=np.float32, count=count).reshape(self.shape))
        else:  # no anonymous private maps (Windows): an ordinary buffer, its pages kept once written
            self._map = None
            self.tensor = torch.empty(self.shape, dtype=torch.float32)
        self.window = (0, 0)  # the planes made and kept
        self.used = False

    def ensure(self, p0: int, p1: int) -> None:
        """Make planes ``p0:p1`` (and up to a chunk beyond, in the direction of travel); drop the others."""
        self.used = True
        w0, w1 = self.window
        if p0 >= p1 or (w0 <= p0 and p1 <= w1):
            return
        if w0 < p1 <= w1 and p0 < w0:  # going down
            n0, n1 = max(0, min(p0, p1 - self.chunk)), p1
        else:
            n0, n1 = p0, min(self.shape[1], max(p1, p0 + self.chunk))
        for a, b in _minus((n0, n1), (w0, w1)):
            self._make(a, b)
        for a, b in _minus((w0, w1), (n0, n1)):
            self._drop(a, b)
        self.window = (n0, n1)

    def make_all(self) -> None:
        """Every plane (the resampling did not go through :meth:`ensure`)."""
        for a, b in _minus((0, self.shape[1]), self.window):
            self._make(a, b)
        self.window = (0, self.shape[1])

    def _make(self, a: int, b: int) -> None:
        lo, hi = max(0, a - self.radius), min(self.shape[1], b + self.radius)
        for channel in range(self.shape[0]):
            block = self.source[channel, lo:hi].astype(np.float32)  # EnsureTyped's float32 conversion
            if self.sigma is not None:
                ndimage.gaussian_filter(block, self.sigma, mode="nearest", output=block)
            self.tensor[channel, a:b].copy_(torch.from_numpy(block[a - lo:b - lo]))
            del block

    def _drop(self, a: int, b: int) -> None:
        if self._map is None:
            return
        page = mmap.PAGESIZE
        for channel in range(self.shape[0]):
            start = 4 * (channel * self.shape[1] + a) * self.plane
            stop = 4 * (channel * self.shape[1] + b) * self.plane
            start, stop = -(-start // page) * page, stop // page * page  # whole pages inside the planes only
            if stop > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _minus(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[int, int]]:
    """The ranges of ``a`` outside ``b``."""
    out = [(a[0], min(a[1], b[0])), (max(a[0], b[1]), a[1])] if b[1] > b[0] else [a]
    return [(x, y) for x, y in out if y > x]


class LowpassSpacingd(MapTransform, InvertibleTransform):
    """``EnsureTyped(float32)``, ``AntiAliasd`` and ``Spacingd`` (bilinear, border) in one step, the same
    voxels and metadata, without a whole float32 copy of the scan: the resampling (:class:`LeanSpacingd`)
    reads a :class:`PlaneSource`, whose planes are made just before the slab of output that reads them.
    Inference's lean preprocessing, for images only (no label key)."""

    def __init__(self, keys, pixdim: Sequence[float], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.pixdim = [float(p) for p in pixdim]
        self.spacing = LeanSpacingd(keys, pixdim=self.pixdim, mode="bilinear", padding_mode="border",
                                    dtype=torch.float32, allow_missing_keys=allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._resample(key, d[key])
        return d

    def inverse(self, data):
        """The resampling's inverse (``Invertd`` of the whole preprocessing passes through here): the
        record is the inner ``Spacingd``'s."""
        return self.spacing.inverse(data)

    def _resample(self, key, image: MetaTensor) -> MetaTensor:
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        planes = PlaneSource(array, lowpass_sigma(image.affine, self.pixdim))
        lazy = _like(planes.tensor, image)
        pointer = planes.tensor.data_ptr()
        with _lock:
            _lazy_sources[pointer] = planes
            try:
                out = self.spacing({key: lazy})[key]
            finally:
                _lazy_sources.pop(pointer, None)
        if out.data_ptr() == pointer:  # no resampling (the grid already is the target): the copy itself
            planes.make_all()
        elif not planes.used:  # resampled by a path that never asked for planes: again, from every plane
            planes.make_all()
            out = self.spacing({key: _like(planes.tensor, image)})[key]
        return out


def _like(tensor: torch.Tensor, image) -> MetaTensor:
    """``tensor`` with ``image``'s metadata and transform records, as ``EnsureTyped`` passes them on."""
    out = MetaTensor(tensor)
    if isinstance(image, MetaTensor):
        out.copy_meta_from(image)
    return out
