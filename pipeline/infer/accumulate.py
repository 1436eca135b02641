"""What happens to each finished slab of logits: probabilities (and, for many classes, the labels) on the
preprocessed grid, taken in place so memory does not grow with the classes."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SlabAccumulator"]


class SlabAccumulator:
    """Called with each finished slab ``(z0, z1, logits (C, ..., z1 - z0))``; fills :attr:`probs`.

    ``keep_all=False``: binary models keep P(lesion), float16; many-class models keep P(any class but
    background), float16, and the argmax in :attr:`labels` (uint8). ``keep_all=True``: every class's
    probability, float32.

    ``probabilities=True``: the slabs already hold class probabilities (an ensemble's or TTA's average,
    :mod:`pipeline.infer.ensemble`), not logits: no softmax is taken. ``keep_classes=True`` (many-class
    models, ``keep_all=False``): every class's probability is also kept, float16, in :attr:`class_probs`
    (for ``--save-probabilities``).
    """

    def __init__(self, spatial: tuple, keep_all: bool, probabilities: bool = False, keep_classes: bool = False):
        self.spatial, self.keep_all = tuple(spatial), keep_all
        self.probabilities, self.keep_classes = probabilities, keep_classes
        self.probs: Optional[torch.Tensor] = None
        self.binary: Optional[bool] = None
        self.labels: Optional[torch.Tensor] = None
        self.class_probs: Optional[torch.Tensor] = None

    def __call__(self, z0: int, z1: int, logits: torch.Tensor) -> None:
        keep_all = self.keep_all
        binary = logits.shape[0] == 2 and not keep_all
        if self.probs is None:
            channels = logits.shape[0] if keep_all else 1
            self.probs = torch.zeros((channels,) + self.spatial, dtype=torch.float32 if keep_all else torch.float16)
            self.binary = binary
            if not (binary or keep_all):
                self.labels = torch.zeros((1,) + self.spatial, dtype=torch.uint8)
                if self.keep_classes:
                    self.class_probs = torch.zeros((logits.shape[0],) + self.spatial, dtype=torch.float16)
        # In place on the handed-over slab: no class-sized temporaries (memory must not grow with classes).
        if binary:
            lesion = logits[1] if self.probabilities else logits[1].sub_(logits[0]).sigmoid_()
            self.probs[0, ..., z0:z1].copy_(lesion)
            return
        if self.probabilities:
            probs = logits
        else:
            logits.sub_(logits.amax(dim=0, keepdim=True)).exp_()
            probs = logits.div_(logits.sum(dim=0, keepdim=True))
        if keep_all:
            self.probs[..., z0:z1].copy_(probs)
            return
        if self.class_probs is not None:
            self.class_probs[..., z0:z1].copy_(probs)
        self.labels[0, ..., z0:z1].copy_(_argmax_classes(probs))
        self.probs[0, ..., z0:z1].copy_(probs[1:].sum(dim=0))


def _argmax_classes(values: torch.Tensor) -> torch.Tensor:
    """``values.argmax(0)`` as uint8 by a running maximum over the classes (ties: the lower class, as
    argmax). Much faster than torch's argmax over the first axis of a permuted slab."""
    labels = torch.zeros(values.shape[1:], dtype=torch.uint8, device=values.device)
    best = values[0].clone()
    for c in range(1, values.shape[0]):
        higher = values[c] > best
        labels[higher] = c
        torch.maximum(best, values[c], out=best)
    return labels
