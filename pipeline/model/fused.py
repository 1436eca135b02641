"""An inference-only copy of a 3D :class:`~pipeline.model.unet.UNet` that runs faster on a CPU.

What eager PyTorch does with our U-Net on a CPU, and what this copy does instead (measured on a 2-core
AVX-512 machine, ``lesion3d.yaml``'s network, windows 2 x 128 x 128 x 32; see ``medseg bench``):

* The full-resolution levels hold most of the FLOPs. oneDNN convolutions run ~1.3x faster there on
  ``channels_last_3d`` tensors, but 1.5-2x *slower* at the deep, small levels; so the first
  :data:`CHANNELS_LAST_LEVELS` levels run channels-last and the rest channels-first.
* PyTorch's instance norm on a channels-last tensor copies it to channels-first and back (3x slower
  than on channels-first). :func:`instance_norm_act` computes the per-channel statistics with two
  matrix products on the (voxels x channels) view instead, then scales, shifts and applies the
  activation in place: one read for the statistics, one read-write for the rest. The sums of squares are
  one batched matrix product over the slices along the first spatial axis, then summed
  (:func:`sum_of_squares`): one product over a whole window's voxels accumulates each sum in one long
  fp32 run, measured at 3e-5 relative error with 8 channels (131,072 voxels), which moved the demo
  model's probabilities by 3e-3 from float64; per slice (2,048-4,096 voxels), 2-4e-7
  (``F.instance_norm``: ~1e-7). (Chunks taken with ``torch.split``, one product each, were as accurate but
  cost 30-40 % of the lesion3d-sized network's time.)
* Batch norm (eval) is folded into the convolution's weights and bias.

The copy computes the same function as the original (up to float32 rounding, ~1e-5) and has no training
mode. Networks other than our U-Net are returned unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.blocks import ConvNormAct, Up
from pipeline.model.unet import UNet

CHANNELS_LAST = torch.channels_last_3d
CHANNELS_FIRST = torch.contiguous_format
CHANNELS_LAST_LEVELS = 2  # measured: levels 1-2 gain ~1.3x channels-last, deeper levels lose
NUMERICS = "squares-per-slice"  # in auto's decision key: the reference's rounding changed, measure again


def fuse_for_inference(network: nn.Module, device: torch.device) -> nn.Module:
    """A fast eval-only copy of ``network`` for ``device`` (the network itself when nothing applies)."""
    if not isinstance(network, UNet) or network.spatial_dims != 3 or torch.device(device).type != "cpu":
        return network
    return _FusedUNet(network)


def instance_norm_act(x: torch.Tensor, weight, bias, eps: float, slope: float) -> torch.Tensor:
    """``leaky_relu(instance_norm(x))`` in place on a conv output ``x`` (B, C, X, Y, Z), any layout."""
    if not (x.is_contiguous(memory_format=CHANNELS_LAST) and not x.is_contiguous()):
        return F.leaky_relu_(F.instance_norm(x, weight=weight, bias=bias, eps=eps), slope)
    batch, channels = x.shape[:2]
    n = x[0, 0].numel()
    flat = x.permute(0, 2, 3, 4, 1).reshape(batch, n, channels)  # a view of the channels-last memory
    total = flat.sum(1)
    squares = sum_of_squares(flat, x.shape[2])
    mean = total / n
    var = squares / n - mean * mean
    if bool((var < 1e-3 * mean * mean).any()):  # E[x^2] - mean^2 cancels: recompute around the mean
        var = (flat - mean[:, None, :]).square().mean(1)
    scale = torch.rsqrt(var.clamp_min(0) + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale + (bias if bias is not None else 0)
    flat.mul_(scale[:, None, :]).add_(shift[:, None, :])
    return F.leaky_relu_(x, slope) if slope != 0 else F.relu_(x)


def sum_of_squares(flat: torch.Tensor, slabs: int) -> torch.Tensor:
    """Per-channel sums of squares (B, C) of ``flat`` (B, voxels, C): one batched matrix product over
    ``slabs`` equal runs of voxels (the slices along the first spatial axis), then summed (module
    docstring: no single long fp32 accumulation). ``voxels`` must be a multiple of ``slabs``."""
    batch, n, channels = flat.shape
    parts = flat.reshape(batch * slabs, n // slabs, channels)  # a view: the runs are contiguous
    squares = torch.diagonal(torch.bmm(parts.transpose(1, 2), parts), dim1=1, dim2=2)
    return squares.reshape(batch, slabs, channels).sum(1)


class _FusedConvNormAct(nn.Module):
    """Convolution → (instance norm → activation, fused) | (batch norm folded into the convolution)."""

    def __init__(self, block: ConvNormAct, memory_format: torch.memory_format):
        super().__init__()
        conv, norm, act = block[0], block[1], block[2]
        self.memory_format = memory_format
        self.slope = float(getattr(act, "negative_slope", 0.0))
        self.instance_norm = None
        if isinstance(norm, (nn.BatchNorm2d, nn.BatchNorm3d)):
            conv = _fold_batch_norm(conv, norm)
        elif isinstance(norm, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
            self.instance_norm = norm
        self.conv = conv.to(memory_format=memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.contiguous(memory_format=self.memory_format))
        if self.instance_norm is not None:
            norm = self.instance_norm
            return instance_norm_act(y, norm.weight, norm.bias, norm.eps, self.slope)
        return F.leaky_relu_(y, self.slope) if self.slope != 0 else F.relu_(y)


def _fold_batch_norm(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> nn.Conv3d:
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    folded.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias)
    return folded


def _fuse_blocks(module: nn.Module, memory_format) -> None:
    """Replace every ConvNormAct under ``module`` (in place) by its fused form."""
    for name, child in module.named_children():
        if isinstance(child, ConvNormAct):
            setattr(module, name, _FusedConvNormAct(child, memory_format))
        else:
            _fuse_blocks(child, memory_format)


class _FusedUp(nn.Module):
    def __init__(self, up: Up, memory_format):
        super().__init__()
        self.upsample, self.conv, self.memory_format = up.upsample, up.conv, memory_format

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        from pipeline.model.blocks import center_crop

        x = self.upsample(x).contiguous(memory_format=self.memory_format)
        skip = center_crop(skip, x.shape[2:]).contiguous(memory_format=self.memory_format)
        return self.conv(torch.cat([skip, x], dim=1))


class _FusedUNet(nn.Module):
    def __init__(self, unet: UNet):
        super().__init__()
        unet = copy.deepcopy(unet).eval()
        self.spatial_dims, self.in_channels, self.out_channels = unet.spatial_dims, unet.in_channels, unet.out_channels
        self.margin = unet.margin
        self.output_size = unet.output_size
        formats = [CHANNELS_LAST if level < CHANNELS_LAST_LEVELS else CHANNELS_FIRST for level in range(unet.depth)]
        self.encoders = unet.encoders
        for level, encoder in enumerate(self.encoders):
            _fuse_blocks(encoder, formats[level])
        ups = []
        for j, up in enumerate(unet.decoders):  # decoders[0] makes level depth-1 (0-based depth-2)
            level = unet.depth - 2 - j
            _fuse_blocks(up.conv, formats[level])
            up.upsample.to(memory_format=formats[level])
            ups.append(_FusedUp(up, formats[level]))
        self.decoders = nn.ModuleList(ups)
        self.head = unet.head.to(memory_format=formats[0])
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encode in self.encoders[:-1]:
            x = encode(x)
            skips.append(x)
        u = self.encoders[-1](x)
        for decode, skip in zip(self.decoders, reversed(skips)):
            u = decode(u, skip)
        return self.head(u)  # channels-last: the band accumulates any layout (no class-sized copy)
