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
    steps fit ``budget_seconds``, with its measured step time.

    The candidates are predicted from a small reference step; the one chosen is measured, and that
    measurement corrects the prediction once: the largest earlier candidate it says would fit is measured
    too and taken if it does, or, if the chosen one is too slow, the shrinking goes on and the result is
    measured again.
    """
    dims = len(net["patch_size"])
    reference = REFERENCE[dims]
    ref_seconds = measure_step(reference, 8, 3, in_channels, out_channels, 2, device)
    rate = ref_seconds / (2 * unet_cost(reference, 8, 3, in_channels, out_channels, True).macs)

    def work(candidate: tuple[dict, int]) -> float:
        shape_net, per_volume = candidate
        cost = unet_cost(shape_net["patch_size"], shape_net["features"], shape_net["depth"], in_channels,
                         out_channels, shape_net["depth"] > 2)
        return float(cost.macs) * batch_size * per_volume

    def measure(candidate: tuple[dict, int]) -> float:
        shape_net, per_volume = candidate
        return measure_step(shape_net["patch_size"], shape_net["features"], shape_net["depth"], in_channels,
                            out_channels, batch_size * per_volume, device)

    history = [(dict(net), samples_per_volume)]
    _shrink_until(history, rate, work, budget_seconds, shape, spacing)
    chosen, seconds = history[-1], measure(history[-1])
    if rules.fits_minimum(seconds, budget_seconds):
        rate = seconds / work(chosen)
        larger = next((c for c in history[:-1] if rules.fits_minimum(rate * work(c), budget_seconds)), None)
        if larger is not None:
            larger_seconds = measure(larger)
            if rules.fits_minimum(larger_seconds, budget_seconds):
                chosen, seconds = larger, larger_seconds
    else:
        rate = seconds / work(chosen)
        if _shrink_until(history, rate, work, budget_seconds, shape, spacing):
            chosen, seconds = history[-1], measure(history[-1])
    net, samples_per_volume = chosen
    measured = seconds <= MAX_MEASURED_STEP_S
    log.info("reference step %.3f s; planned step %.3f s (%s)", ref_seconds, seconds,
             "median of 3" if measured else "one step")
    shrunk = _changes(history[0][0], net, history[0][1], samples_per_volume)
    hours = budget_seconds / 3600
    reason = (f"shrunk to fit {rules.MIN_STEPS} steps in {hours:.2f} h (timed): " + ", ".join(shrunk)
              if shrunk else f"{rules.MIN_STEPS} steps fit {hours:.2f} h as planned (timed)")
    if not rules.fits_minimum(seconds, budget_seconds):
        reason += f"; even the smallest network takes {seconds:.2f} s/step: fewer than {rules.MIN_STEPS} steps fit"
    return TimedNetwork(net, samples_per_volume, seconds, measured, reason)


def _shrink_until(history: list, rate: float, work, budget_seconds: float, shape, spacing) -> bool:
    """Append smaller candidates to ``history`` until the last is predicted (``rate`` s per MAC) to fit;
    whether any was appended."""
    grew = False
    while not rules.fits_minimum(rate * work(history[-1]), budget_seconds):
        smaller = rules.shrink_for_time(history[-1][0], history[-1][1], shape, spacing)
        if smaller is None:
            break
        history.append((smaller[0], smaller[1]))
        grew = True
    return grew


def _changes(before: dict, after: dict, per_volume_before: int, per_volume_after: int) -> list[str]:
    out = [f"{key} {before[key]} -> {after[key]}" for key in ("features", "patch_size", "depth")
           if before[key] != after[key]]
    if per_volume_before != per_volume_after:
        out.append(f"samples_per_volume {per_volume_before} -> {per_volume_after}")
    return out

