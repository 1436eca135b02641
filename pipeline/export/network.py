"""The network of a checkpoint as an export sees it: CPU, eval mode, full-resolution logits only, and
the example windows every export is verified on (:func:`verify_outputs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.infer.backend import _MainOutput
from pipeline.model import build_model
from pipeline.model.checkpoint import Checkpoint

TOLERANCE = 1e-3  # largest |logit difference| an export may show against the checkpoint's torch network
VERIFY_SEED = 0


@dataclass
class Exportable:
    """The checkpoint's network ready to export: ``module`` maps (B, C, *roi) to logits (B, K, *roi')."""

    network: nn.Module  # the U-Net itself, CPU, eval mode
    module: nn.Module  # the same, returning only the full-resolution logits
    window: tuple[int, ...]  # (channels, *roi): the shape segment feeds it
    dynamic_spatial: bool  # whether other window sizes work (same padding: multiples of 2^(depth-1))
    step: int  # the spatial size multiple the network needs


def exportable(ckpt: Checkpoint) -> Exportable:
    config = ckpt.config
    network = build_model(config.model, in_channels=config.in_channels, out_channels=config.num_classes)
    network.load_state_dict(ckpt.state_dict)
    network = network.to("cpu", dtype=torch.float32).eval()
    window = (config.in_channels, *(int(r) for r in config.inference.roi_size))
    return Exportable(network=network, module=_MainOutput(network).eval(), window=window, dynamic_spatial=config.model.padding == "same",
                      step=2 ** (config.model.depth - 1))


def example_inputs(target: Exportable) -> list[torch.Tensor]:
    """Seeded random windows covering the dynamic axes: without dynamic spatial axes, a batch of 2 at
    the roi; with them, a batch of 1 at the roi and a batch of 2 one step smaller on every axis (one step
    larger where the roi is a single step), so the graph has baked in neither the batch nor the roi, and
    the check stays cheap for large networks (the second batch is the smaller window)."""
    generator = torch.Generator().manual_seed(VERIFY_SEED)
    if not target.dynamic_spatial:
        return [torch.randn((2, *target.window), generator=generator)]
    channels, *roi = target.window
    step = target.step
    other = tuple(r - step if r - step >= step else r + step for r in roi)
    return [torch.randn((1, *target.window), generator=generator),
            torch.randn((2, channels, *other), generator=generator)]


def reference_outputs(target: Exportable, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        return [target.module(x).numpy() for x in inputs]


def verify_outputs(name: str, run: Callable[[torch.Tensor], np.ndarray], target: Exportable,
                   tolerance: float | None = None) -> float:
    """Run the export (``run``) and the checkpoint's torch network on :func:`example_inputs`; the largest
    absolute logit difference. Raises :class:`ConfigError` (the caller removes the output) beyond
    ``tolerance`` (default :data:`TOLERANCE`) or on a shape mismatch."""
    tolerance = TOLERANCE if tolerance is None else tolerance
    inputs = example_inputs(target)
    worst = 0.0
    for x, expected in zip(inputs, reference_outputs(target, inputs)):
        got = np.asarray(run(x))
        if got.shape != expected.shape:
            raise ConfigError(
                f"export verification ({name}): expected logits of shape {expected.shape} for a window batch "
                f"{tuple(x.shape)}, found {got.shape}. The export is removed; report this with the checkpoint's "
                "model settings"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
        if not worst <= tolerance:
            raise ConfigError(
                f"export verification ({name}): expected the exported network to match the checkpoint's torch "
                f"network within {tolerance:g} (largest logit difference), found {worst:.3g} on a window batch "
                f"{tuple(x.shape)}. The export is removed; this exporter cannot represent the network faithfully"
            )
    return worst
