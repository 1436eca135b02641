"""Coarse-to-fine inference (``inference.cascade``): where the full-resolution windows need to run.

The same network runs first over the preprocessed scan resampled (trilinear) to the coarser
``inference.cascade.spacing`` (default: twice the preprocessed grid's spacing, so about 1/8 of the
windows). Its probability of any lesion class is interpolated back onto the full grid; the voxels above
``inference.cascade.threshold`` are the candidates. The candidate region is kept on the coarse block grid
of :mod:`pipeline.infer.skip` (blocks of 4 voxels holding a candidate), dilated by
``inference.cascade.margin_mm`` (a box, rounded up to whole blocks), and the fine pass runs only the
windows touching it: every candidate voxel and every voxel within the margin of it lies in a window that
runs. A lesion the coarse pass misses entirely is a missed lesion: ``medseg bench --levers`` measures the
lesion recall against the full pass.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.infer.accumulate import SlabAccumulator
from pipeline.infer.skip import BODY_BLOCK, CoarseRegion, block_any, dilate_box, margin_voxels
from pipeline.infer.stream import StreamStats, stream_windows


def coarse_shape(shape: Sequence[int], spacing: Sequence[float], coarse_spacing: Sequence[float]) -> tuple[int, ...]:
    """The grid of the coarse pass: ``shape`` at ``spacing`` resampled to ``coarse_spacing`` (at least 1 voxel)."""
    return tuple(max(1, int(round(n * s / c))) for n, s, c in zip(shape, spacing, coarse_spacing))


def candidate_region(image: torch.Tensor, forward: Callable, cascade, spacing: Sequence[float], roi: Sequence[int],
                     overlap: float, blend: str, batch: int, device: torch.device, probabilities: bool = False,
                     block: int = BODY_BLOCK) -> tuple[CoarseRegion, StreamStats, torch.Tensor]:
    """The coarse pass over ``image`` (channels, *spatial) at ``spacing`` mm; returns the candidate region
    (dilated by the margin) on the block grid, the coarse pass's cost, and the candidates (boolean, the
    full grid, before the margin).

    ``cascade``: the :class:`~pipeline.config.schema.CascadeConfig`; ``forward``, ``roi`` and the rest as
    :func:`~pipeline.infer.stream.stream_windows` takes them (``probabilities``: ``forward`` returns
    probabilities, an ensemble's or TTA's average).
    """
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = x.to(torch.float32)
    fine = tuple(int(n) for n in x.shape[1:])
    coarse_spacing = cascade.spacing or [2.0 * float(s) for s in spacing]
    size = coarse_shape(fine, spacing, coarse_spacing)
    coarse = F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]
    accumulate = SlabAccumulator(size, keep_all=False, probabilities=probabilities)
    stats = stream_windows(coarse, forward, roi, overlap, blend, batch, accumulate, device=device)
    del coarse
    lesion = F.interpolate(accumulate.probs[None].float(), size=fine, mode="trilinear", align_corners=False)[0, 0]
    candidates = lesion > cascade.threshold
    del lesion
    blocks = (int(block),) * len(fine)
    mask = block_any(candidates.numpy(), blocks)
    mask = dilate_box(mask, margin_voxels(cascade.margin_mm, spacing, blocks))
    return CoarseRegion(mask=mask, block=blocks, shape=fine), stats, candidates
