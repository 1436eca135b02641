"""Dice + focal loss for imbalanced lesions (MONAI ``DiceFocalLoss``), with deep supervision."""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss, DiceFocalLoss

from pipeline.config import LossConfig


def build_loss(cfg: LossConfig, deep_supervision: bool) -> torch.nn.Module:
    base = DiceFocalLoss(
        include_background=cfg.include_background,
        to_onehot_y=True,
        softmax=True,
        gamma=cfg.gamma,
        lambda_dice=cfg.dice_weight,
        lambda_focal=cfg.focal_weight,
        batch=True,  # Dice over the whole batch: stable when most patches hold no lesion
        smooth_nr=1e-5,
        smooth_dr=1e-5,
    )
    if not deep_supervision:
        return base
    return _FloatTarget(DeepSupervisionLoss(base, weight_mode="exp", weights=cfg.deep_supervision_weights))


class _FloatTarget(torch.nn.Module):
    """Class-index targets as float: DeepSupervisionLoss resizes them with F.interpolate (no integers)."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        return self.loss(output, target.float())


def centre_crop_to(label: torch.Tensor, spatial: torch.Size) -> torch.Tensor:
    """Crop ``label`` (B, 1, *S) to the spatial size of a smaller valid-padding output."""
    if tuple(label.shape[2:]) == tuple(spatial):
        return label
    slices = [slice(None), slice(None)]
    for have, want in zip(label.shape[2:], spatial):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return label[tuple(slices)]
