"""Learning-rate schedules: linear warm-up, then poly decay or cosine, stepped per optimiser step."""

from __future__ import annotations

import math

import torch


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int):
    """A ``LambdaLR``; its ``horizon["total"]`` (the step at which the decay ends) may be moved while training
    (``train.max_minutes`` shortens a run): the next steps decay towards the new end."""
    horizon = {"total": max(1, total_steps)}
    warmup_steps = min(max(0, warmup_steps), horizon["total"] - 1)

    def factor(step: int) -> float:
        total = horizon["total"]
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** 0.9

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scheduler.horizon = horizon
    return scheduler
