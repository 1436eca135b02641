"""What one training step of our U-Net (:mod:`pipeline.model.unet`) costs: memory and arithmetic, analytically.

The network is walked level by level (level ``k``: ``features * 2**k`` channels at ``1/2**k`` of the patch
on every axis). Per patch, training keeps for the backward pass (float32, 4 bytes each):

* every :class:`~pipeline.model.blocks.ConvNormAct`: the convolution's output (the normalisation's input)
  and the activation's output (LeakyReLU in place, over the normalisation's output): 2 tensors, so 4
  per DoubleConv;
* every ``Down``: the max-pool's output and its int64 indices (3 float32-sized tensors of the level above's
  channels);
* every ``Up``: the transposed convolution's output and the concatenation (3 tensors of the level's channels);
* the input, and the logits with the loss's softmax and one-hot copies (4 tensors of ``out_channels``).

:data:`MEMORY_OVERHEAD` covers what that count leaves out (gradient buffers alive during the backward
pass, cuDNN workspaces, the allocator's fragmentation); the parameters are counted 4 times (weights,
gradients, AdamW's two moments). The figure is an estimate for planning (nnU-Net plans with a similar
one, its VRAM "reference value"), not a measurement; the README says how it compares with one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

BYTES = 4  # float32
MEMORY_OVERHEAD = 1.5  # x the counted activations: gradient buffers, workspaces, fragmentation
PARAMETER_COPIES = 4  # weights, gradients, AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True)
class StepCost:
    activation_elements: int  # float32 elements kept for backward, one patch
    parameters: int
    macs: int  # multiply-accumulates of one forward pass, one patch

    def bytes(self, patches: int) -> int:
        """Estimated peak memory of a training step on ``patches`` patches."""
        activations = self.activation_elements * patches * BYTES * MEMORY_OVERHEAD
        return int(activations + self.parameters * BYTES * PARAMETER_COPIES)


def unet_cost(patch: Sequence[int], features: int, depth: int, in_channels: int = 1, out_channels: int = 2,
              deep_supervision: bool = False) -> StepCost:
    """The :class:`StepCost` of :class:`~pipeline.model.unet.UNet` (``padding="same"``, transposed-conv
    upsampling) on one patch of spatial size ``patch`` (2 or 3 axes)."""
    dims = len(patch)
    kernel = 3 ** dims
    voxels0 = 1
    for size in patch:
        voxels0 *= int(size)
    channels = [features * 2**k for k in range(depth)]
    voxels = [voxels0 / (2**dims) ** k for k in range(depth)]
    elements = (in_channels + 4 * out_channels) * voxels0
    macs = params = 0.0
    for k in range(depth):  # the encoder, level k
        c_in = in_channels if k == 0 else channels[k - 1]
        c = channels[k]
        elements += 4 * c * voxels[k] + (3 * c_in * voxels[k] if k > 0 else 0)
        macs += kernel * (c_in * c + c * c) * voxels[k]
        params += kernel * (c_in * c + c * c) + 4 * c
    for k in range(depth - 1):  # the decoder, level k: up from level k+1, concatenate, DoubleConv
        c, c_below = channels[k], channels[k + 1]
        elements += (3 + 4) * c * voxels[k]
        macs += 2**dims * c_below * c * voxels[k] + kernel * (2 * c * c + c * c) * voxels[k]
        params += 2**dims * c_below * c + c + kernel * (2 * c * c + c * c) + 4 * c
    macs += channels[0] * out_channels * voxels0
    params += channels[0] * out_channels + out_channels
    if deep_supervision:
        for k in range(1, depth - 1):
            elements += 4 * out_channels * voxels[k]
            params += channels[k] * out_channels + out_channels
    return StepCost(int(elements), int(params), int(macs))
