"""Several networks (an ensemble) and test-time mirroring, averaged as nnU-Net does: softmax probabilities.

* :func:`checkpoint_paths`: what ``--model`` names (checkpoint files, or a training folder: its
  ``fold_*/best.pt``, sorted, or its own ``best.pt``) as the list of checkpoints, in order.
* :func:`check_compatible`: models are averaged only when their probabilities mean the same thing on the
  same grid: same preprocessing (spacing, orientation, intensity, CT statistics included), labels, input
  channels, spatial dims and window (``inference.roi_size``). Otherwise a :class:`ConfigError` names the key.
* :func:`mirror_flips`: the flips ``inference.tta: mirror`` averages over (every subset of the allowed axes).
* :func:`averaged_probabilities`: one callable over a batch of windows that runs every network on every
  flip of it, flips each output back and returns the mean of their softmax probabilities. The sliding
  window then blends those probabilities: memory is that of one batch of windows more, whatever the
  number of models and flips (no probability volume is ever held per model).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from pipeline.errors import ConfigError, InputError

__all__ = ["averaged_probabilities", "check_compatible", "checkpoint_paths", "ensemble_identity", "mirror_flips",
           "tta_label"]

PathLike = Union[str, Path]


def checkpoint_paths(model: Union[PathLike, Sequence[PathLike]]) -> list[Path]:
    """The checkpoints ``model`` names: one file, several files, or a training folder.

    A folder holding ``fold_*/best.pt`` gives all of them, sorted by name; a folder with ``best.pt`` and
    no folds is that one model.
    """
    items = [model] if isinstance(model, (str, Path)) else list(model)
    if not items:
        raise InputError("no model given: expected one or more checkpoints (best.pt) or a training folder")
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if not path.is_dir():
            out.append(path)  # a missing file is reported by the checkpoint loader, with its own advice
            continue
        folds = sorted(p for p in path.glob("fold_*/best.pt") if p.is_file())
        if folds:
            out += folds
        elif (path / "best.pt").is_file():
            out.append(path / "best.pt")
        else:
            raise InputError(f"model folder '{path}' holds no checkpoint: expected fold_*/best.pt (one model per "
                             "cross-validation fold) or best.pt. Pass the folder `medseg train` wrote, or the "
                             "checkpoint files themselves")
    return out


def _averaging_identity(config) -> dict:
    """What must agree between two models for their probabilities to be averaged, by dotted key."""
    return {
        "preprocess": asdict(config.preprocess),
        "data.labels": dict(config.data.labels),
        "data.channels": list(config.data.channels),
        "model.spatial_dims": config.model.spatial_dims,
        "inference.roi_size": list(config.inference.roi_size),
    }


def _first_difference(a, b, key: str):
    """The dotted key (and both values) where ``a`` and ``b`` first differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for name in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(name), b.get(name), f"{key}.{name}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(v, dict) for v in a):
        for n, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{key}[{n}]")
            if found is not None:
                return found
        return None
    return None if a == b else (key, a, b)


def check_compatible(configs: Sequence, names: Sequence[str]) -> None:
    """Raise a :class:`ConfigError` naming the first key on which a model differs from the first one."""
    reference = _averaging_identity(configs[0])
    for config, name in zip(configs[1:], names[1:]):
        found = _first_difference(reference, _averaging_identity(config), "")
        if found is not None:
            key, first, other = found
            raise ConfigError(
                f"models cannot be ensembled: '{key.lstrip('.')}' is {first!r} in '{names[0]}' but {other!r} in "
                f"'{name}'. Their probabilities are averaged, so every model must share the preprocessing, "
                "labels, channels, spatial dims and inference.roi_size: ensemble models trained with the same "
                "config (e.g. the folds of one cross-validation)")


def mirror_flips(mode: str, axes, spatial_dims: int) -> list[tuple[int, ...]]:
    """Tensor dims to flip for each pass over a (B, C, *spatial) window: ``[()]`` without TTA; with
    ``mirror``, every subset of the allowed spatial axes (all of them when ``axes`` is None)."""
    if mode == "none":
        return [()]
    allowed = list(range(spatial_dims)) if axes is None else sorted(int(a) for a in axes)
    dims = [2 + a for a in allowed]
    return [combo for n in range(len(dims) + 1) for combo in itertools.combinations(dims, n)]


def tta_label(mode: str, axes) -> str:
    """How the manifest writes the TTA: ``none``, ``mirror`` or ``mirror:0,2`` (restricted axes)."""
    if mode == "none" or axes is None:
        return mode
    return "mirror:" + ",".join(str(a) for a in sorted(axes))


def averaged_probabilities(forwards: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                           flips: Sequence[tuple[int, ...]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward (B, C, *roi) -> probabilities (B, K, *roi): the mean over ``forwards`` x ``flips`` of
    ``flip_back(softmax(f(flip(x))))``. Each flip is its own inverse, so the flip back is exact."""
    passes = len(forwards) * len(flips)

    def forward(x: torch.Tensor) -> torch.Tensor:
        total = None
        for run in forwards:
            for dims in flips:
                logits = run(x.flip(dims) if dims else x).float()
                probs = torch.softmax(logits, dim=1)
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total.add_(probs)
        return total.div_(passes)

    return forward


def ensemble_identity(sha256s: Sequence[str]) -> str:
    """One model's sha256 as it is; an ensemble's: the sha256 of its members' sha256s, in order."""
    if len(sha256s) == 1:
        return sha256s[0]
    return hashlib.sha256(";".join(sha256s).encode()).hexdigest()
