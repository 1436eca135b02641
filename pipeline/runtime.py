"""Where computation runs: device choice and seeding."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from pipeline.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU. An explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a valid torch device: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here: use device=auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seeds(seed: int, epoch: int, n: int = 3) -> list[int]:
    """``n`` independent 32-bit seeds for epoch ``epoch`` of a run seeded with ``seed``.

    They depend on nothing else, so an epoch can be re-seeded identically in an uninterrupted and in a
    resumed run (numpy ``SeedSequence``: distinct streams for distinct (seed, epoch) pairs).
    """
    entropy = [int(seed) % 2**63, int(epoch)]
    return [int(s) for s in np.random.SeedSequence(entropy).generate_state(n)]


def _cpuinfo_text() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags(cpuinfo: Optional[str] = None) -> list[str]:
    """The vector extensions of :data:`VECTOR_FLAGS` that the CPU's ``flags`` line in ``/proc/cpuinfo``
    lists (``cpuinfo``: that file's text, for tests); empty where it cannot be read."""
    text = cpuinfo if cpuinfo is not None else _cpuinfo_text()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in VECTOR_FLAGS if flag in present]
    return []
