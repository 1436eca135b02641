"""Measured training steps: how long one optimiser step of a planned network takes on this machine, and
the network shrunk until the least sensible training (:data:`~pipeline.plan.rules.MIN_STEPS`) fits a
time budget.

A step is what ``medseg train`` does per batch: the U-Net, a random batch of the planned patch and batch
size, forward, the Dice + focal loss (with deep supervision when planned), backward, an AdamW step. The
figure is the median of :data:`REPEATS` steps after one warm-up step. Large networks are not run to find
out they are too slow: a small reference network is timed first, and each candidate's step predicted from
its arithmetic (:func:`~pipeline.plan.cost.unet_cost` multiply-accumulates; a small network uses a CPU less
efficiently, so the prediction errs long); only the chosen candidate is then measured.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

from pipeline.plan import rules
from pipeline.plan.cost import unet_cost

log = logging.getLogger(__name__)

REPEATS = 3
REFERENCE = {3: [32, 32, 32], 2: [64, 64]}  # the reference patch (features 8, depth 3, 2 patches)
MAX_MEASURED_STEP_S = 8.0  # a warm-up step longer than this is not repeated (keeps planning quick)


@dataclass
class TimedNetwork:
    net: dict  # patch_size, depth, features
    samples_per_volume: int
    step_seconds: float
    measured: bool  # False: predicted from the reference (the chosen step was too long to repeat)
    reason: str


def measure_step(patch: Sequence[int], features: int, depth: int, in_channels: int, out_channels: int,
                 patches: int, device: str = "cpu", repeats: int = REPEATS) -> float:
    """Median seconds of a training step (after a warm-up step) of the planned U-Net on ``patches`` patches."""
    import torch

    from pipeline.config import LossConfig, ModelConfig
    from pipeline.model import build_model
    from pipeline.training.loss import build_loss

    deep = depth > 2
    cfg = ModelConfig(spatial_dims=len(patch), features=features, depth=depth, deep_supervision=deep)
    target = torch.device(device)
    model = build_model(cfg, in_channels, out_channels).to(target).train()
    loss_fn = build_loss(LossConfig(), deep)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((patches, in_channels, *patch), generator=generator).to(target)
    label = torch.randint(0, out_channels, (patches, 1, *patch), generator=generator).to(target)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        return time.perf_counter() - start

    first = step()
    if first > MAX_MEASURED_STEP_S:
        return first
    return statistics.median(step() for _ in range(repeats))


def fit_time_budget(net: dict, samples_per_volume: int, batch_size: int, shape: Sequence[int],
                    spacing: Sequence[float], in_channels: int, out_channels: int, budget_seconds: float,
                    device: str = "cpu") -> TimedNetwork:
    """``net`` shrunk (:func:`~pipeline.plan.rules.shrink_for_time`) until :data:`~pipeline.plan.rules.MIN_STEPS`
    steps fit ``budget_seconds``, with its measured step time."""
    dims = len(net["patch_size"])
    reference = REFERENCE[dims]
    ref_seconds = measure_step(reference, 8, 3, in_channels, out_channels, 2, device)
    seconds_per_mac = ref_seconds / (2 * unet_cost(reference, 8, 3, in_channels, out_channels, True).macs)

    def predict(candidate: dict, per_volume: int) -> float:
        cost = unet_cost(candidate["patch_size"], candidate["features"], candidate["depth"], in_channels,
                         out_channels, candidate["depth"] > 2)
        return seconds_per_mac * cost.macs * batch_size * per_volume

    start, start_per_volume = dict(net), samples_per_volume
    while not rules.fits_minimum(predict(net, samples_per_volume), budget_seconds):
        smaller = rules.shrink_for_time(net, samples_per_volume, shape, spacing)
        if smaller is None:
            break
        net, samples_per_volume, _ = smaller
    shrunk = _changes(start, net, start_per_volume, samples_per_volume)
    seconds = measure_step(net["patch_size"], net["features"], net["depth"], in_channels, out_channels,
                           batch_size * samples_per_volume, device)
    measured = seconds <= MAX_MEASURED_STEP_S
    log.info("reference step %.3f s; planned step %.3f s (%s)", ref_seconds, seconds,
             "measured" if measured else "one step")
    fits = rules.fits_minimum(seconds, budget_seconds)
    reason = (f"shrunk to fit {rules.MIN_STEPS} steps in {budget_seconds / 3600:.2f} h (predicted from a "
              f"{ref_seconds:.3f} s reference step): " + ", ".join(shrunk) if shrunk else f"{rules.MIN_STEPS} steps fit {budget_seconds / 3600:.2f} h as planned")
    if not fits:
        reason += f"; even the smallest network takes {seconds:.2f} s/step: fewer than {rules.MIN_STEPS} steps fit"
    return TimedNetwork(net, samples_per_volume, seconds, measured, reason)


def _changes(before: dict, after: dict, per_volume_before: int, per_volume_after: int) -> list[str]:
    out = [f"{key} {before[key]} -> {after[key]}" for key in ("features", "patch_size", "depth")
           if before[key] != after[key]]
    if per_volume_before != per_volume_after:
        out.append(f"samples_per_volume {per_volume_before} -> {per_volume_after}")
    return out

