"""Learning-rate schedules: linear warm-up, then poly decay or cosine, stepped per optimiser step."""

from __future__ import annotations

import math

import torch


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int):
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** 0.9

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
