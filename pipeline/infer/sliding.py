"""Sliding-window inference over a whole preprocessed volume, for every network variant.

* 3D networks slide 3D windows (MONAI ``sliding_window_inference``, Gaussian or constant blending).
* 2D networks run over axial slices: the same call with a window of depth 1, the slice axis squeezed
  before the network and restored after.
* ``padding: valid`` networks return less than they are given. The volume is padded by the network's
  margin, each window's output is put back at its centre, and the blending weights are zero (a tiny
  epsilon) on the margin band, so every voxel is predicted only from windows that saw its full context.
  The overlap is raised if needed so that window centres tile the volume.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from pipeline.config import InferenceConfig


def predict_logits(
    network: torch.nn.Module,
    image: torch.Tensor,
    cfg: InferenceConfig,
    spatial_dims: int,
    progress: bool = False,
    forward: Callable | None = None,
) -> torch.Tensor:
    """Logits ``(C, *spatial)`` for a preprocessed image ``(channels, *spatial)`` (3D volume).

    ``forward``: what runs a batch of windows (default ``network``; e.g. an ONNX Runtime session).
    ``network`` still gives the device and the margin of valid-padding networks.
    """
    device = next(network.parameters()).device
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = x[None].to(device=device, dtype=torch.float32)
    roi = list(cfg.roi_size) + ([1] if spatial_dims == 2 else [])
    margin = network_margin(network, cfg.roi_size, spatial_dims)
    forward = forward if forward is not None else network
    predictor: Callable = window_forward(forward, spatial_dims)
    weight_map = None
    overlap = cfg.overlap
    if any(margin):
        pad = [m for m in margin] + ([0] if spatial_dims == 2 else [])
        x = F.pad(x, _torch_pad(pad), mode="replicate")
        predictor = _RestoreMargin(predictor, pad)
        weight_map = _centre_weights(roi, pad, cfg.blend, device)
        overlap = max(overlap, _min_overlap(roi, pad))
    with torch.no_grad():
        logits = sliding_window_inference(
            x,
            roi_size=roi,
            sw_batch_size=cfg.sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode=cfg.blend,
            roi_weight_map=weight_map,
            progress=progress,
        )
    if any(margin):
        crop = tuple(slice(p, logits.shape[2 + i] - p) for i, p in enumerate(pad))
        logits = logits[(slice(None), slice(None)) + crop]
    return logits[0]


def network_margin(network: torch.nn.Module, roi: Sequence[int], spatial_dims: int) -> list[int]:
    margin_fn = getattr(network, "margin", None)
    if margin_fn is None:
        return [0] * spatial_dims
    return [int(m) for m in margin_fn(tuple(roi))]


def window_forward(forward: Callable, spatial_dims: int) -> Callable:
    """``forward`` for 3D windows as it is; a 2D network's for windows of depth 1 (:class:`SliceWise`)."""
    return forward if spatial_dims == 3 else SliceWise(forward)


class SliceWise(torch.nn.Module):
    """Run a 2D network on windows of depth 1: (B, C, X, Y, 1) → (B, K, X', Y', 1).

    A batch of 2D windows (B, C, X, Y) passes through unchanged (backend timing feeds those).
    """

    def __init__(self, network: Callable):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.network(x)
        return self.network(x[..., 0])[..., None]


class _RestoreMargin(torch.nn.Module):
    """Zero-pad a valid network's smaller output back to the window size (weights ignore the band)."""

    def __init__(self, predictor: Callable, pad: Sequence[int]):
        super().__init__()
        self.predictor, self.pad = predictor, list(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(self.predictor(x), _torch_pad(self.pad))


def _torch_pad(per_axis: Sequence[int]) -> list[int]:
    """Symmetric per-axis padding in F.pad's order (last axis first)."""
    out: list[int] = []
    for p in reversed(per_axis):
        out += [p, p]
    return out


def _centre_weights(roi: Sequence[int], pad: Sequence[int], blend: str, device) -> torch.Tensor:
    inner = [r - 2 * p for r, p in zip(roi, pad)]
    weights = compute_importance_map(inner, mode=blend, device=device)
    weights = F.pad(weights[None, None], _torch_pad(pad))[0, 0]
    # Not zero, so voxels no window centre reaches (the padded border) stay finite; far below any
    # centre weight (MONAI's Gaussian bottoms out near 1e-3), so the band never leaks into the result.
    return weights.clamp_min(1e-20)


def _min_overlap(roi: Sequence[int], pad: Sequence[int]) -> float:
    """Smallest overlap whose window step leaves no gap between window centres."""
    need = 0.0
    for r, p in zip(roi, pad):
        if p:
            need = max(need, 2 * p / r)
    return min(0.95, math.ceil(need * 1000) / 1000 + 1e-3)
