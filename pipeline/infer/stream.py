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

    windows: int = 0
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
) -> StreamStats:
    """Run ``forward`` over windows of ``image`` (channels, X, Y, Z) and stream the blended logits.

    ``forward`` maps (B, channels, *roi) on ``device`` to logits (B, C, *roi). ``on_slab(z0, z1, logits)``
    receives the final logits (C, X, Y, z1 - z0) of slices ``z0:z1`` of the unpadded volume, in order,
    each slice exactly once, as a view into the band that it may overwrite (no copy is made for it).
    ``progress`` is called after every network call.
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
    batches = [starts[i:i + batch] for i in range(0, len(starts), batch)]
    band = roi[-1] + max(b[-1][-1] - b[0][-1] for b in batches)  # slices one batch can reach
    stats = StreamStats(windows=len(starts))
    accumulator = _Band(grid.padded_shape, band, weights, device, padding, on_slab)
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


class _Band:
    """The blended-logit sums and weight sums of the slices ``base .. base + depth`` (padded coordinates)."""

    def __init__(self, padded_shape, depth, weights, device, padding, on_slab):
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
        """Hand over slices ``base .. z_end`` (final: no later window reaches them) and move the band on."""
        done = min(z_end, self.z_size) - self.base
        if done <= 0 or self.sums is None:
            return
        logits = self.sums[..., :done].div_(self.counts[..., :done])  # in place: this part is handed over
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
