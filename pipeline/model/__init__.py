"""Segmentation networks and the registry that builds them from the model config."""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.model.unet import UNet

ARCHITECTURES = {"unet": UNet}

# Config attributes passed to the architecture; a missing one falls back to the constructor default.
_MODEL_KEYS = (
    "spatial_dims", "features", "depth", "norm", "upsample", "padding", "deep_supervision", "dropout", "act"
)

__all__ = ["ARCHITECTURES", "UNet", "build_model"]


def build_model(cfg, in_channels: int, out_channels: int) -> UNet:
    """Build the network the model config ``cfg`` describes (``cfg.name``, default ``"unet"``)."""
    name = getattr(cfg, "name", None) or "unet"
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"model.name: Wrong architecture `{name}`. Available options are: {', '.join(ARCHITECTURES)}"
        )
    kwargs = {key: getattr(cfg, key) for key in _MODEL_KEYS if hasattr(cfg, key)}
    return ARCHITECTURES[name](in_channels=in_channels, out_channels=out_channels, **kwargs)
