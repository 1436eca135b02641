"""Our U-Net for 2D and 3D (Ronneberger et al., 2015), with "same" or the paper's "valid" padding.

The diagram, for ``depth=4`` (level ``k`` works at ``1/2**(k-1)`` resolution with ``features * 2**(k-1)``
channels)::

    x0 ─enc1─ x1 ──────────────────────────────── up1 ─ u1 ─head─► logits        (full resolution)
               └─enc2─ x2 ────────────────── up2 ─ u2 ─(aux head)─► 1/2 res logits
                        └─enc3─ x3 ──── up3 ─ u3 ─(aux head)─► 1/4 res logits
                                 └─enc4─ x4 ┘                          (bottom, 1/8 resolution)

``enc1`` is a :class:`DoubleConv`; ``enc2..`` are :class:`Down` (max-pool, then DoubleConv); ``upk`` is
an :class:`Up` that upsamples ``u(k+1)`` (or the bottom ``x4``), concatenates the skip ``xk`` and applies
a DoubleConv.

Deep supervision
----------------
With ``deep_supervision=True`` and the module in training mode, ``forward`` returns a list of
``depth - 1`` logit tensors, one per decoder level, highest resolution first::

    [u1 logits (1/1), u2 logits (1/2), ..., u(depth-1) logits (1/2**(depth-2))]

The bottom level is excluded (it has no decoder block). Every tensor has ``out_channels`` channels. With
``padding="same"`` the tensor at index ``k`` has spatial size ``input_size // 2**k``; with
``padding="valid"`` use :meth:`UNet.output_size` with ``level=k``. In eval mode (and whenever
``deep_supervision=False``) ``forward`` returns only the full-resolution tensor.

Sizes
-----
``padding="same"``: the output has the input's spatial size; every axis must be divisible by
``2**(depth-1)``. ``padding="valid"``: each DoubleConv removes 4 voxels per axis, so the output is smaller
than the input (572 → 388 for the paper's 2D, depth-5 network); every size before a pooling must be even
and every size must stay positive. :meth:`UNet.valid_input_size` gives the smallest valid size that is
at least a given size, and :meth:`UNet.margin` how much the output lacks on each side.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.blocks import (
    ACTS,
    LEAKY_SLOPE,
    NORMS,
    PADDINGS,
    UPSAMPLES,
    DoubleConv,
    Down,
    Up,
    check_choice,
    check_spatial_dims,
)

VALID_SHRINK = 4  # voxels a DoubleConv of two unpadded 3x3 convolutions removes per axis


def _check_int(name: str, value, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{name}: expected an integer >= {minimum}, found {value!r}. {hint}")


def _trace_axis(size: int, depth: int, padding: str) -> tuple[list[int] | None, str]:
    """Sizes of one axis at the decoder outputs, full resolution first, or ``None`` and the reason."""
    if padding == "same":
        factor = 2 ** (depth - 1)
        if size <= 0 or size % factor:
            return None, f"expected a positive multiple of 2**(depth-1) = {factor}, found {size}"
        return [size // 2**k for k in range(depth - 1)], ""
    s = size
    for level in range(1, depth):
        s -= VALID_SHRINK
        if s <= 0:
            return None, f"input {size} shrinks to {s} after the convolutions of level {level}"
        if s % 2:
            return None, f"input {size} gives the odd size {s} before pooling at level {level}"
        s //= 2
    s -= VALID_SHRINK
    if s <= 0:
        return None, f"input {size} shrinks to {s} at the bottom level {depth}"
    decoded = []
    for level in range(depth - 1, 0, -1):
        s = 2 * s - VALID_SHRINK
        if s <= 0:
            return None, f"input {size} shrinks to {s} in the decoder at level {level}"
        decoded.append(s)
    return decoded[::-1], ""


class UNet(nn.Module):
    """U-Net with double-conv blocks, concatenated skips and a 1×1(×1) head; see the module docstring.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (image modalities).
        out_channels: output channels (classes, background included).
        features: channels at the first level; they double at every level down.
        depth: number of resolution levels (``depth - 1`` poolings), at least 2.
        norm: ``"instance"`` (affine), ``"batch"`` or ``"none"``.
        upsample: ``"transpose"`` (2×2 transposed conv) or ``"interp"`` (interpolation + 1×1 conv).
        padding: ``"same"`` (output size == input size) or ``"valid"`` (unpadded, as in the paper).
        deep_supervision: in training mode, also return logits of the lower decoder levels.
        dropout: dropout probability after every activation (0 disables it).
        act: ``"leakyrelu"`` (slope 0.01) or ``"relu"``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 16,
        depth: int = 4,
        norm: str = "instance",
        upsample: str = "transpose",
        padding: str = "same",
        deep_supervision: bool = False,
        dropout: float = 0.0,
        act: str = "leakyrelu",
    ):
        super().__init__()
        check_spatial_dims(spatial_dims)
        _check_int("in_channels", in_channels, 1, "Use the number of image channels (modalities).")
        _check_int("out_channels", out_channels, 1, "Use the number of classes, background included.")
        _check_int("features", features, 1, "Typical values are 8 to 32.")
        _check_int("depth", depth, 2, "depth counts resolution levels; 4 or 5 is typical.")
        for name, value, options in (
            ("norm", norm, NORMS),
            ("upsample", upsample, UPSAMPLES),
            ("padding", padding, PADDINGS),
            ("act", act, ACTS),
        ):
            check_choice(name, value, options)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"model.dropout: expected a probability in [0, 1), found {dropout!r}. Use 0 to disable it."
            )

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.padding = padding
        self.deep_supervision = bool(deep_supervision)
        self.channels = tuple(features * 2**k for k in range(depth))
        ch = self.channels
        block = dict(norm=norm, act=act, padding=padding, dropout=dropout)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d

        # encoders[k] produces level k+1; encoders[-1] is the bottom.
        self.encoders = nn.ModuleList(
            [DoubleConv(spatial_dims, in_channels, ch[0], **block)]
            + [Down(spatial_dims, ch[k - 1], ch[k], **block) for k in range(1, depth)]
        )
        # decoders in the order they run, deepest first: decoders[0] makes level depth-1 from the bottom.
        self.decoders = nn.ModuleList(
            [
                Up(spatial_dims, ch[k], ch[k - 1], ch[k - 1], upsample=upsample, **block)
                for k in range(depth - 1, 0, -1)
            ]
        )
        self.head = conv(ch[0], out_channels, kernel_size=1)
        # aux_heads[k-1] gives the logits of level k+1 (1/2**k resolution), k = 1 .. depth-2.
        self.aux_heads = (
            nn.ModuleList([conv(ch[k], out_channels, kernel_size=1) for k in range(1, depth - 1)])
            if self.deep_supervision
            else None
        )
        self._init_weights(LEAKY_SLOPE if act == "leakyrelu" else 0.0)

    def _init_weights(self, slope: float) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        # Encoder: x1 = enc1(x0), x2 = enc2(x1), ...; every level but the bottom is kept as a skip.
        skips = []
        for encode in self.encoders[:-1]:
            x = encode(x)
            skips.append(x)
        u = self.encoders[-1](x)  # the bottom level
        # Decoder: u(depth-1) = up(x_bottom, x(depth-1)), ..., u1 = up1(u2, x1).
        decoded = []
        for decode, skip in zip(self.decoders, reversed(skips)):
            u = decode(u, skip)
            decoded.append(u)
        logits = self.head(u)
        if not (self.deep_supervision and self.training):
            return logits
        # decoded is deepest first and ends with u1; pair u2, u3, ... with their heads.
        lower = decoded[-2::-1]
        return [logits] + [head(level) for head, level in zip(self.aux_heads, lower)]

    # ---- sizes -------------------------------------------------------------------------------------

    def output_size(self, input_size: Sequence[int], level: int = 0) -> tuple[int, ...]:
        """Spatial size of the logits for an input of spatial size ``input_size``.

        ``level=k`` gives the size of the deep-supervision output at index ``k`` (``1/2**k`` resolution).
        Raises :class:`ConfigError` if the size does not fit the network.
        """
        sizes = self._trace(input_size)
        if not 0 <= level < self.depth - 1:
            raise ConfigError(
                f"level: expected 0 .. {self.depth - 2} (one per decoder level), found {level}."
            )
        return tuple(axis[level] for axis in sizes)

    def margin(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Voxels the output lacks on each side of every axis: ``(input - output) // 2`` (0 for "same")."""
        output = self.output_size(input_size)
        return tuple((i - o) // 2 for i, o in zip(input_size, output))

    def valid_input_size(self, min_size: int | Sequence[int]) -> tuple[int, ...]:
        """Smallest valid input size that is ``>= min_size`` on every axis (an int applies to all axes)."""
        if isinstance(min_size, int):
            min_size = (min_size,) * self.spatial_dims
        return tuple(self._nearest_valid(int(s))[1] for s in min_size)

    def _nearest_valid(self, size: int) -> tuple[int | None, int]:
        """The largest valid size ``<= size`` (``None`` if there is none) and the smallest ``>= size``."""
        below = next((s for s in range(size, 0, -1) if _trace_axis(s, self.depth, self.padding)[0]), None)
        above = next(s for s in range(max(size, 1), 2**31) if _trace_axis(s, self.depth, self.padding)[0])
        return below, above

    def _trace(self, input_size: Sequence[int]) -> list[list[int]]:
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != self.spatial_dims:
            raise ConfigError(
                f"Expected a {self.spatial_dims}D spatial size, found {input_size}. "
                f"Give one size per spatial axis (model.spatial_dims={self.spatial_dims})."
            )
        sizes, problems = [], []
        for axis, size in enumerate(input_size):
            trace, reason = _trace_axis(size, self.depth, self.padding)
            sizes.append(trace)
            if trace is None:
                below, above = self._nearest_valid(size)
                nearest = f"{below} or {above}" if below is not None else f"{above}"
                problems.append(f"axis {axis}: {reason} (nearest valid sizes: {nearest})")
        if problems:
            raise ConfigError(
                f"Input size {input_size} does not fit UNet(depth={self.depth}, padding={self.padding!r}): "
                + "; ".join(problems)
                + f". Pad or crop the input, e.g. to UNet.valid_input_size({input_size}) = "
                f"{self.valid_input_size(input_size)}, or change model.depth / the patch size."
            )
        return sizes

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            axes = "H, W" if self.spatial_dims == 2 else "H, W, D"
            raise ConfigError(
                f"Expected an input of shape (batch, {self.in_channels}, {axes}), found {tuple(x.shape)}. "
                "Check model.spatial_dims and the number of input channels."
            )
        self._trace(x.shape[2:])
