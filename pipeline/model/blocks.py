"""U-Net building blocks; each serves 2D and 3D through ``spatial_dims``.

``padding="same"`` keeps the spatial size through a 3×3(×3) convolution; ``padding="valid"`` is the
unpadded convolution of the original U-Net paper (Ronneberger et al., 2015), which removes one voxel
on each side, so a :class:`DoubleConv` shrinks every axis by 4.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.config.schema import NORMS, PADDINGS, SPATIAL_DIMS, UPSAMPLES
from pipeline.errors import ConfigError

ACTS = ("leakyrelu", "relu")  # not a config key: the Python API's choice
LEAKY_SLOPE = 0.01


def check_choice(name: str, value: str, options: Sequence[str]) -> None:
    """Raise a :class:`ConfigError` if ``value`` is not one of ``options``."""
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise ConfigError(
            f"model.{name}: expected one of {listed}, found {value!r}. Set model.{name} to one of them."
        )


def check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in SPATIAL_DIMS:
        raise ConfigError(
            f"model.spatial_dims: expected 2 or 3, found {spatial_dims!r}. "
            "Use 2 for slice-wise images and 3 for volumes."
        )


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.Identity()


def _act(act: str) -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if act == "leakyrelu" else nn.ReLU(inplace=True)


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centre ``size`` of the spatial axes of ``x`` (a view, no copy)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], size):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


class ConvNormAct(nn.Sequential):
    """3×3(×3) convolution → normalisation → activation (→ dropout).

    The convolution has a bias only when ``norm="none"``: a normalisation layer would cancel it.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: str = "instance",
        act: str = "leakyrelu",
        padding: str = "same",
        dropout: float = 0.0,
    ):
        check_spatial_dims(spatial_dims)
        check_choice("norm", norm, NORMS)
        check_choice("act", act, ACTS)
        check_choice("padding", padding, PADDINGS)
        layers = [
            _conv(spatial_dims)(
                in_channels,
                out_channels,
                kernel_size=3,
                padding=1 if padding == "same" else 0,
                bias=norm == "none",
            ),
            _norm(norm, spatial_dims, out_channels),
            _act(act),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct` blocks: ``in_channels → out_channels → out_channels``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: str = "instance",
        act: str = "leakyrelu",
        padding: str = "same",
        dropout: float = 0.0,
    ):
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, out_channels, norm, act, padding, dropout),
            ConvNormAct(spatial_dims, out_channels, out_channels, norm, act, padding, dropout),
        )


class Down(nn.Sequential):
    """Max-pool by 2, then :class:`DoubleConv`: one level down the encoder."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: str = "instance",
        act: str = "leakyrelu",
        padding: str = "same",
        dropout: float = 0.0,
    ):
        check_spatial_dims(spatial_dims)
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        super().__init__(
            pool(kernel_size=2, stride=2),
            DoubleConv(spatial_dims, in_channels, out_channels, norm, act, padding, dropout),
        )


class Up(nn.Module):
    """One level up the decoder: upsample ×2 to ``skip_channels``, concatenate the skip, :class:`DoubleConv`.

    ``upsample="transpose"`` is a 2×2(×2) transposed convolution with stride 2; ``"interp"`` is
    bilinear/trilinear interpolation followed by a 1×1(×1) convolution (no checkerboard artefacts).
    With ``padding="valid"`` the skip is larger than the upsampled tensor and is centre-cropped to it.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        norm: str = "instance",
        act: str = "leakyrelu",
        padding: str = "same",
        upsample: str = "transpose",
        dropout: float = 0.0,
    ):
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_choice("upsample", upsample, UPSAMPLES)
        if upsample == "transpose":
            transpose = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
            self.upsample = transpose(in_channels, skip_channels, kernel_size=2, stride=2)
        else:
            self.upsample = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear" if spatial_dims == 2 else "trilinear"),
                _conv(spatial_dims)(in_channels, skip_channels, kernel_size=1),
            )
        self.conv = DoubleConv(spatial_dims, 2 * skip_channels, out_channels, norm, act, padding, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        skip = center_crop(skip, x.shape[2:])
        return self.conv(torch.cat([skip, x], dim=1))
