"""Sliding-window inference that streams: memory for one band of windows, not for the whole volume.

The windows (:class:`~pipeline.infer.windows.WindowGrid`, MONAI's grid and weights) are visited in
order of their position along the last axis. Their blended logits are summed into a band buffer that
covers only the slices the current windows reach; as soon as no later window can touch a slice, the
slice is final: it is divided by its summed weights and handed to ``on_slab`` (which turns it into
probabilities, or labels, and keeps only what it needs). Memory for the logits is therefore
``classes x X x Y x (window depth + one step)`` instead of ``classes x X x Y x Z``, whatever the number
of classes.

Windows go to the network ``batch`` at a time (batch 1 sends small 3D convolutions to PyTorch's slow
single-threaded path). The band buffer lives on the network's device; slabs are handed over there too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from pipeline.infer.windows import WindowGrid, blend_weights


@dataclass
class StreamStats:
    """What one streamed inference cost."""

    windows: int = 0  # windows that ran
    skipped: int = 0  # windows ``keep`` left out
    forwards: int = 0  # network calls (batches of windows)
    network_seconds: float = 0.0  # time inside the network, synchronised on accelerators


def stream_windows(
    image: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    roi: Sequence[int],
    overlap: float,
    blend: str,
    batch: int,
    on_slab: Callable[[int, int, torch.Tensor], None],
    device: torch.device = torch.device("cpu"),
    progress: Optional[Callable[[], None]] = None,
    keep: Optional[Callable[[tuple[slice, ...]], bool]] = None,
    empty_value: tuple[float, float] = (0.0, -30.0),
    channels: Optional[int] = None,
) -> StreamStats:
    """Run ``forward`` over windows of ``image`` (channels, X, Y, Z) and stream the blended logits.

    ``forward`` maps (B, channels, *roi) on ``device`` to logits (B, C, *roi). ``on_slab(z0, z1, logits)``
    receives the final logits (C, X, Y, z1 - z0) of slices ``z0:z1`` of the unpadded volume, in order,
    each slice exactly once, as a view into the band that it may overwrite (no copy is made for it).
    ``progress`` is called after every network call.

    ``keep(box)``: whether the window over ``box`` (one slice per axis, the unpadded volume's voxels it
    holds) runs; a skipped window contributes nothing. A voxel no window that ran covers gets
    ``empty_value``: (background channel, every other channel), by default logits that make it background
    (pass ``(1.0, 0.0)`` where ``forward`` returns probabilities). With ``keep``, a batch never spans more
    than two neighbouring window positions along the last axis, so the band stays as deep as without it;
    ``channels`` (the network's output channels) is then needed, for slabs that no window reached.
    """
    spatial = tuple(int(s) for s in image.shape[1:])
    roi = tuple(int(r) for r in roi)
    if len(roi) != len(spatial) or len(spatial) != 3:
        raise ValueError(f"expected a (channels, X, Y, Z) image and a 3-axis window, found {tuple(image.shape)} "
                         f"and {roi}")
    grid = WindowGrid(spatial, roi, overlap)
    padding = grid.padding
    if any(before or after for before, after in padding):
        pad = [p for before_after in reversed(padding) for p in before_after]
        image = F.pad(image, pad, mode="constant", value=0.0)
    weights = blend_weights(roi, blend, device=device)
    starts = grid.starts()
    total = len(starts)
    if keep is not None and not channels:
        raise ValueError("stream_windows: keep needs channels (the network's output channels)")
    if keep is None:
        batches = [starts[i:i + batch] for i in range(0, len(starts), batch)]
    else:
        starts = [start for start in starts if keep(_box(start, roi, padding, spatial))]
        batches = _batches_by_position(starts, batch)
    band = roi[-1] + max((b[-1][-1] - b[0][-1] for b in batches), default=0)  # slices one batch can reach
    stats = StreamStats(windows=len(starts), skipped=total - len(starts))
    accumulator = _Band(grid.padded_shape, band, weights, device, padding, on_slab, empty_value,
                        channels if keep is not None else None)
    for windows in batches:
        accumulator.flush_before(windows[0][-1])
        tiles = torch.stack([image[(slice(None),) + tuple(slice(s, s + r) for s, r in zip(start, roi))]
                             for start in windows]).to(device, non_blocking=True)
        began = time.perf_counter()
        logits = forward(tiles)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.network_seconds += time.perf_counter() - began
        stats.forwards += 1
        for start, window_logits in zip(windows, logits):
            accumulator.add(start, window_logits.float())
        if progress is not None:
            progress()
    accumulator.flush_before(grid.padded_shape[-1])
    return stats


def _box(start, roi, padding, spatial) -> tuple[slice, ...]:
    """The unpadded volume's voxels a window at ``start`` (padded coordinates) holds."""
    out = []
    for s, r, (before, _), size in zip(start, roi, padding, spatial):
        out.append(slice(max(s - before, 0), min(s - before + r, size)))
    return tuple(out)


def _batches_by_position(starts: list, batch: int) -> list[list]:
    """``starts`` (in streaming order) in batches of up to ``batch`` that span at most two neighbouring
    positions along the last axis (the band then holds what it holds without skipping)."""
    order = {z: i for i, z in enumerate(sorted({start[-1] for start in starts}))}
    batches: list[list] = []
    for start in starts:
        if batches and len(batches[-1]) < batch and order[start[-1]] - order[batches[-1][0][-1]] <= 1:
            batches[-1].append(start)
        else:
            batches.append([start])
    return batches


class _Band:
    """The blended-logit sums and weight sums of the slices ``base .. base + depth`` (padded coordinates)."""

    def __init__(self, padded_shape, depth, weights, device, padding, on_slab, empty_value=(0.0, -30.0),
                 channels: Optional[int] = None):
        self.empty_value, self.channels = empty_value, channels
        self.shape_xy, self.z_size = tuple(padded_shape[:2]), padded_shape[2]
        self.depth, self.weights, self.device = min(depth, self.z_size), weights, device
        self.padding, self.on_slab = padding, on_slab
        self.base = 0
        self.sums: Optional[torch.Tensor] = None  # (C, X, Y, depth), allocated at the first window
        self.counts = torch.zeros(self.shape_xy + (self.depth,), dtype=torch.float32, device=device)

    def add(self, start, logits: torch.Tensor) -> None:
        if self.sums is None:
            self.sums = torch.zeros((logits.shape[0],) + self.shape_xy + (self.depth,), dtype=torch.float32,
                                    device=self.device)
        z = start[-1] - self.base
        where = tuple(slice(s, s + r) for s, r in zip(start[:2], logits.shape[1:3])) + (slice(z, z + logits.shape[3]),)
        self.sums[(slice(None),) + where].addcmul_(logits, self.weights)
        self.counts[where].add_(self.weights)

    def flush_before(self, z_end: int) -> None:
        """Hand over slices ``base .. z_end`` (final: no later window reaches them) and move the band on
        (a band at a time: with skipped windows, ``z_end`` can lie more than a band ahead)."""
        while True:
            done = min(z_end, self.z_size, self.base + self.depth) - self.base
            if done <= 0 or (self.sums is None and self.channels is None):
                return
            self._flush(done)

    def _flush(self, done: int) -> None:
        if self.sums is None:  # no window ran yet: nothing to hand over, unless they were skipped
            if self.channels is None:
                return
            self.sums = torch.zeros((self.channels,) + self.shape_xy + (self.depth,), dtype=torch.float32,
                                    device=self.device)
        counts = self.counts[..., :done]
        empty = counts == 0  # voxels no window that ran covers (skipped windows): background
        if bool(empty.any()):
            counts[empty] = 1.0
            sums = self.sums[..., :done]
            sums[0][empty] = self.empty_value[0]
            sums[1:, empty] = self.empty_value[1]
        logits = self.sums[..., :done].div_(counts)  # in place: this part is handed over
        (x0, _), (y0, _), (z0, z_after) = self.padding
        x_end, y_end = self.shape_xy[0] - self.padding[0][1], self.shape_xy[1] - self.padding[1][1]
        first, last = max(self.base, z0), min(self.base + done, self.z_size - z_after)
        if last > first:
            slab = logits[:, x0:x_end, y0:y_end, first - self.base:last - self.base]
            self.on_slab(first - z0, last - z0, slab)
        del logits
        keep = self.depth - done
        for z in range(max(keep, 0)):  # slice by slice, lowest first: no temporary copy of the band
            self.sums[..., z].copy_(self.sums[..., done + z])
            self.counts[..., z].copy_(self.counts[..., done + z])
        self.sums[..., max(keep, 0):] = 0
        self.counts[..., max(keep, 0):] = 0
        self.base += done
