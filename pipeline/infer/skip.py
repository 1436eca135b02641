"""Which sliding windows need the network: those holding something the model could label.

``inference.skip_empty: body`` skips every window that holds no voxel of the body (dilated by
``inference.skip_margin_mm``). The body is found on a coarse grid (blocks of :data:`BODY_BLOCK` voxels of
the preprocessed grid, a block counting as body when any of its voxels is), by the rule preprocessing's
``crop_foreground`` and ``postprocess.restrict_to_body`` use: the voxels above preprocessing's intensity
floor (for ``ct_window``, above the window's low end, -150 HU in ``lesion3d.yaml``), then the largest
26-connected component, its holes filled (lungs and bowel gas are inside the body), then dilated by the
margin (a box: ``ceil(margin / (spacing × block))`` coarse voxels per axis).

A skipped window contributes nothing; voxels that no window that ran covers are background (what
:func:`~pipeline.infer.stream.stream_windows` fills them with). A voxel inside the dilated body lies only
in windows that run, so it is blended from exactly the windows of the full pass: skipping changes
nothing there, only (false) labels far outside the body can go.

:class:`CoarseRegion` is also what the coarse-to-fine cascade (``inference.cascade``) hands to the fine
pass: the candidate region of the coarse pass on a coarse grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

BODY_BLOCK = 4  # preprocessed voxels per coarse voxel along each axis


@dataclass(frozen=True)
class CoarseRegion:
    """A boolean mask on a grid ``block`` times coarser (per axis) than the volume of shape ``shape``.

    Coarse voxel ``c`` covers the volume's voxels ``c * block .. (c + 1) * block - 1`` on each axis.
    """

    mask: np.ndarray
    block: tuple[int, ...]
    shape: tuple[int, ...]

    def touches(self, box: Sequence[slice]) -> bool:
        """Whether any coarse voxel of the region overlaps the volume's voxels ``box`` (one slice per axis)."""
        index = tuple(slice(s.start // b, -(-s.stop // b)) for s, b in zip(box, self.block))
        return bool(self.mask[index].any())

    def fine(self) -> np.ndarray:
        """The region on the volume's own grid (boolean, ``shape``): what the fine pass must cover."""
        out = self.mask
        for axis, b in enumerate(self.block):
            out = np.repeat(out, b, axis=axis)
        return out[tuple(slice(0, s) for s in self.shape)]


def block_any(mask: np.ndarray, block: Sequence[int]) -> np.ndarray:
    """``mask`` on a grid ``block`` times coarser: a coarse voxel is True when any of its voxels is."""
    block = tuple(int(b) for b in block)
    coarse_shape = tuple(-(-s // b) for s, b in zip(mask.shape, block))
    padded = np.zeros(tuple(c * b for c, b in zip(coarse_shape, block)), dtype=bool)
    padded[tuple(slice(0, s) for s in mask.shape)] = mask
    shape = [n for c, b in zip(coarse_shape, block) for n in (c, b)]
    return padded.reshape(shape).any(axis=tuple(range(1, 2 * len(block), 2)))


def dilate_box(mask: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """``mask`` dilated by a box of half-widths ``radius`` (coarse voxels per axis)."""
    size = tuple(2 * int(r) + 1 for r in radius)
    if all(s == 1 for s in size):
        return mask.copy()
    return ndimage.maximum_filter(mask.astype(np.uint8), size=size, mode="constant", cval=0) > 0


def margin_voxels(margin_mm: float, spacing: Sequence[float], block: Sequence[int]) -> tuple[int, ...]:
    """Coarse voxels per axis that cover ``margin_mm`` (rounded up) on a grid of ``spacing`` × ``block``."""
    return tuple(int(math.ceil(margin_mm / (float(s) * int(b)) - 1e-9)) if margin_mm > 0 else 0
                 for s, b in zip(spacing, block))


def body_region(image: torch.Tensor, preprocess, spacing: Sequence[float], margin_mm: float,
                block: int = BODY_BLOCK) -> CoarseRegion:
    """The body of a preprocessed ``image`` (channels, *spatial) on a coarse grid, dilated by ``margin_mm``.

    ``preprocess``: the config's preprocessing (its intensity mode gives the floor); ``spacing``: the
    preprocessed grid's spacing in mm.
    """
    from pipeline.postprocess.rules import largest_component
    from pipeline.transforms.preprocess import _foreground_fn

    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    above = _foreground_fn(preprocess)(x[:1].float())[0].cpu().numpy()
    blocks = (int(block),) * above.ndim
    coarse = block_any(above, blocks)
    body = largest_component(coarse)
    body = ndimage.binary_fill_holes(body)
    body = dilate_box(body, margin_voxels(margin_mm, spacing, blocks))
    return CoarseRegion(mask=body, block=blocks, shape=tuple(above.shape))


def grid_spacing(image, fallback: Sequence[float] | None) -> tuple[float, ...]:
    """The spacing (mm) of a preprocessed MetaTensor's grid (its affine), else ``fallback``, else 1 mm."""
    affine = getattr(image, "affine", None)
    dims = image.ndim - 1
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        return tuple(float(np.linalg.norm(a[:dims, axis])) for axis in range(dims))
    if fallback:
        return tuple(float(s) for s in fallback)
    return (1.0,) * dims
