"""Dice + focal loss for imbalanced lesions (MONAI ``DiceFocalLoss``; under torchrun its batch Dice spans
every rank's batch), with deep supervision.

The loss takes the network's output (one tensor, or the deep-supervision list) and the label of the
network's *input*: each output head is scored against the label at its own voxels (:func:`head_targets`),
which with valid padding is a centre crop for the full-resolution head and a wider region, downsampled,
for the deeper ones.
"""

from __future__ import annotations

from typing import Optional

import torch
from monai.losses import DeepSupervisionLoss, DiceFocalLoss

from pipeline.config import LossConfig


class SoftmaxFocalLoss(torch.nn.Module):
    """Focal loss on the softmax over every class: ``mean(-(1 - p_t) ** gamma * log p_t)`` over the voxels, with
    ``p_t`` the softmax probability of the voxel's true class (``target`` one-hot, (B, C, *S)). ``gamma = 0``
    is the cross-entropy. Every class takes part, background included: the softmax the network is judged by
    at inference is what it learns, not one sigmoid per foreground logit."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = (torch.log_softmax(input.float(), dim=1) * target.float()).sum(dim=1)
        if self.gamma == 0:
            return -log_pt.mean()
        return -(((1 - log_pt.exp()).clamp(min=0) ** self.gamma) * log_pt).mean()


class WorldDiceFocalLoss(DiceFocalLoss):
    """MONAI's ``DiceFocalLoss`` whose batch Dice spans every rank's batch under torchrun.

    The Dice term (``batch=True``) is one Dice over the whole batch. With DDP each rank holds a share of
    the batch, so its logits and one-hot labels are gathered from every rank (``all_gather`` with
    autograd) and the Dice is taken over the global batch; the focal term, a voxel mean, stays local. The
    gradient then equals one process's on the whole batch: the gather's backward sums each rank's share of
    the (identical) Dice loss's gradient over the N ranks, and DDP's average divides by N again. One
    process: exactly ``DiceFocalLoss``.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input, target)
        from monai.networks import one_hot
        from torch.distributed.nn.functional import all_gather

        if self.to_onehot_y and input.shape[1] > 1:
            target = one_hot(target, num_classes=input.shape[1])
        targets = [torch.empty_like(target) for _ in range(dist.get_world_size())]
        dist.all_gather(targets, target.contiguous())
        dice = self.dice(torch.cat(all_gather(input.contiguous()), 0), torch.cat(targets, 0))
        return self.lambda_dice * dice + self.lambda_focal * self.focal(input, target)


def build_loss(cfg: LossConfig, deep_supervision: bool) -> torch.nn.Module:
    base = WorldDiceFocalLoss(
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
    if cfg.focal_softmax:  # DiceFocalLoss.forward one-hot encodes the target and calls self.focal with it
        base.focal = SoftmaxFocalLoss(cfg.gamma)
    weights = DeepSupervisionLoss(base, weight_mode="exp", weights=cfg.deep_supervision_weights)
    return HeadLoss(base, weights if deep_supervision else None)


class HeadLoss(torch.nn.Module):
    """``loss(output, label)``: ``base`` of each output head against :func:`head_targets` of ``label``.

    ``output`` is one tensor or, with deep supervision, the list of heads (full resolution first), summed
    with MONAI ``DeepSupervisionLoss``'s weights (``weights.get_weights``). ``label`` (B, 1, *S) is the label
    of the network's input (class indices, integer or float).
    """

    def __init__(self, base: torch.nn.Module, weights: Optional[DeepSupervisionLoss] = None):
        super().__init__()
        self.base = base
        self.weights = weights

    def forward(self, output, label: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, (list, tuple)):
            return self.base(output, head_targets(label, [output.shape[2:]])[0])
        targets = head_targets(label, [head.shape[2:] for head in output])
        if self.weights is None or len(output) == 1:
            return self.base(output[0].float(), targets[0])
        loss = torch.zeros((), dtype=torch.float32, device=label.device)
        for weight, head, target in zip(self.weights.get_weights(len(output)), output, targets):
            loss = loss + weight * self.base(head.float(), target)
        return loss


def head_targets(label: torch.Tensor, output_sizes) -> list[torch.Tensor]:
    """The label each output head learns from: ``label`` (B, 1, *S) of the network input, at its voxels.

    Head ``k`` (``output_sizes[k]``, the U-Net's output at index ``k``: ``1/2**k`` resolution) has ``n``
    voxels per axis, each covering ``2**k`` input voxels, centred in the input (valid convolutions, even
    pooling sizes and centred skip crops are symmetric; with "same" padding ``n * 2**k`` is the input
    size). Its target is the label on the ``n * 2**k`` input voxels it covers, sampled once per voxel at
    the input voxel just past its centre (index ``2**(k-1)`` of its block): the nearest-exact downsampling
    MONAI's ``DeepSupervisionLoss`` gives same-padding heads, now also right for valid padding, where a
    deeper head covers a wider region than the full-resolution output. Head 0 is a centre crop.
    """
    targets = []
    for k, size in enumerate(output_sizes):
        step = 2**k
        index = [slice(None), slice(None)]
        for axis, (have, n) in enumerate(zip(label.shape[2:], size)):
            spare = have - n * step
            if spare < 0 or (k > 0 and spare % 2):
                raise ValueError(
                    f"head {k} ({tuple(size)} voxels of {step} input voxels each) does not fit centred in "
                    f"a label of spatial size {tuple(label.shape[2:])} on axis {axis}: give the label of the "
                    "network's input"
                )
            start = spare // 2
            index.append(slice(start + step // 2, start + n * step, step))
        targets.append(label[tuple(index)])
    return targets
