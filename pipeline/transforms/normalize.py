"""Per-channel intensity normalisation chosen by the channel's name, as nnU-Net does
(``preprocess.intensity.mode: auto``).

* ``ct`` (a channel named CT): clip to the dataset's foreground 0.5-99.5 percentiles, then subtract the
  dataset's foreground mean and divide by its standard deviation. The statistics are measured once on
  the training data (:func:`channel_statistics`) and travel in the config, hence in the checkpoint.
* ``zscore`` (any other channel: MR sequences, PET...): per image, with the mean and standard deviation
  of the voxels inside the body (above the image's minimum: the zero background of skull-stripped or
  masked MR does not count), applied to every voxel.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from pipeline.config.schema import ChannelNormConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

CT_PERCENTILES = (0.5, 99.5)
SAMPLES_PER_CASE = 10_000  # foreground voxels drawn per training case for the CT statistics (nnU-Net's number)
MIN_BODY_FRACTION = 0.05  # below this share of voxels above the minimum, z-score over the whole image


class NormalizeChannelsd(MapTransform):
    """Normalise each channel of ``keys`` (C, *spatial) by its :class:`ChannelNormConfig`."""

    def __init__(self, keys, channels: Sequence[ChannelNormConfig], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = list(channels)
        for index, channel in enumerate(self.channels):
            if not channel.complete:
                raise ConfigError(
                    f"preprocess.intensity.channels[{index}] ({channel.name or index}) is a CT channel without "
                    "its dataset statistics (clip, mean, std): `medseg train` measures them; set them in the "
                    "config to normalise without training"
                )

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.channels):
                raise ConfigError(
                    f"the image has {image.shape[0]} channel(s) but preprocess.intensity.channels describes "
                    f"{len(self.channels)} ({[c.name for c in self.channels]}): one entry per input channel"
                )
            for c, channel in enumerate(self.channels):
                normalize_channel_(image[c], channel)
        return d


def normalize_channel_(x: torch.Tensor, channel: ChannelNormConfig) -> torch.Tensor:
    """``x`` (one channel, float) normalised in place."""
    if channel.resolved_scheme == "ct":
        low, high = channel.clip
        return x.clamp_(low, high).sub_(channel.mean).div_(max(channel.std, 1e-8))
    body = x > x.min()
    values = x[body] if int(body.sum()) >= MIN_BODY_FRACTION * x.numel() else x.reshape(-1)
    mean, std = float(values.mean()), float(values.std()) if values.numel() > 1 else 0.0
    return x.sub_(mean).div_(max(std, 1e-8))


def body_foreground(x: torch.Tensor) -> torch.Tensor:
    """Crop-to-body selection for ``auto``: any channel above its own minimum."""
    spatial = tuple(range(1, x.ndim))
    return x > x.amin(dim=spatial, keepdim=True)


def resolve_channel_norms(names: Sequence[str], given: Sequence[ChannelNormConfig]) -> list[ChannelNormConfig]:
    """One entry per channel name: the config's own entries where given (kept as they are), else by name."""
    if given and len(given) != len(names):
        raise ConfigError(
            f"preprocess.intensity.channels has {len(given)} entries for {len(names)} channel(s) {list(names)}: "
            "give one entry per channel, in order, or none (then they are chosen by channel name)"
        )
    out = []
    for index, name in enumerate(names):
        entry = given[index] if given else ChannelNormConfig()
        name = entry.name or name
        scheme = entry.scheme or ChannelNormConfig(name=name).resolved_scheme
        out.append(ChannelNormConfig(name=name, scheme=scheme, clip=entry.clip, mean=entry.mean, std=entry.std))
    return out


def channel_statistics(samples: Sequence[np.ndarray]) -> dict:
    """CT statistics of one channel from foreground samples: ``clip`` (0.5/99.5 percentiles), ``mean``
    and ``std`` of the voxels inside the clip range (nnU-Net's definition)."""
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples]) if samples else np.empty(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ConfigError(
            "a CT channel needs foreground voxels (label > 0) in the training data to measure its intensity "
            "statistics, and none were found: check the labels, or set preprocess.intensity.channels[] "
            "clip/mean/std in the config"
        )
    low, high = np.percentile(values, CT_PERCENTILES)
    inside = values[(values >= low) & (values <= high)]
    return {"clip": [float(low), float(high)], "mean": float(inside.mean()), "std": float(max(inside.std(), 1e-8))}


def foreground_sample(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                      count: int = SAMPLES_PER_CASE) -> np.ndarray:
    """Up to ``count`` values of ``image`` where ``label > 0`` (a seeded draw)."""
    values = np.asarray(image)[np.asarray(label) > 0]
    if values.size > count:
        values = values[rng.choice(values.size, count, replace=False)]
    return values
