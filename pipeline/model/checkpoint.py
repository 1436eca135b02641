"""Self-describing checkpoints: weights + full config (labels, preprocessing) + versions, in one ``.pt`` file.

Everything stored is a tensor or a plain Python container, so ``torch.load(path, weights_only=True)``
reads it: loading a checkpoint never executes pickled code.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.errors import CheckpointError, ConfigError, first_line
from pipeline.io.atomic import atomic_path

FORMAT = "medseg-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    config: Config
    state_dict: dict
    epoch: int = 0
    best_metric: float = float("nan")
    extra: Optional[dict] = None  # optimiser/scheduler state etc., for resuming training
    sha256: str = ""

    @property
    def label_names(self) -> list[str]:
        return self.config.label_names


def versions() -> dict[str, str]:
    import monai
    import numpy

    from pipeline import __version__

    found = {
        "medseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
    # Plain str: torch's TorchVersion is a str subclass that weights_only loading refuses.
    return {name: str.__str__(value) for name, value in found.items()}


def save_checkpoint(path: Union[str, Path], ckpt: Checkpoint) -> Path:
    """Write atomically (temporary file + rename), so a killed run never leaves a broken file."""
    path = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(ckpt.config),
        "versions": versions(),
        "epoch": ckpt.epoch,
        "best_metric": float(ckpt.best_metric),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
    }
    if ckpt.extra:
        payload["extra"] = ckpt.extra
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Union[str, Path], map_location: str = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"model checkpoint not found: '{path}'. Train one with `medseg train CONFIG` "
            "(it writes best.pt and last.pt) and pass it with --model"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint '{path}': {first_line(exc, type(exc).__name__)}. "
            "Expected a .pt file written by `medseg train`; the file may be truncated"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not a medseg checkpoint (no '{FORMAT}' marker): expected a .pt file written by "
            "`medseg train`"
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {payload['format_version']}, newer than this "
            f"medseg understands ({FORMAT_VERSION}): upgrade medseg"
        )
    try:
        config = config_from_dict(payload["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint '{path}' carries an invalid config: {exc}") from None
    return Checkpoint(
        config=config,
        state_dict=payload["state_dict"],
        epoch=int(payload.get("epoch", 0)),
        best_metric=float(payload.get("best_metric", float("nan"))),
        extra=payload.get("extra"),
        sha256=file_sha256(path),
    )


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
