"""The one definition of deterministic preprocessing, shared by training, validation and inference.

load → channel-first → orientation → (low-pass) resample to the configured spacing → intensity normalisation →
crop to the body. Multi-channel images (C, X, Y, Z) go through the same steps, every channel with the
same spatial transform; ``intensity.mode: auto`` normalises each channel by its name
(:mod:`pipeline.transforms.normalize`). Each spatial step is recorded on the MetaTensor, so inference can invert it exactly
(``pipeline.postprocess.invert``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from pipeline.config import PreprocessConfig
from pipeline.transforms.antialias import AntiAliasd
from pipeline.transforms.load import CheckLabelsd, LoadScand
from pipeline.transforms.normalize import (
    NormalizeChannelsd,
    body_foreground,
    normalize_channel_,
    resolve_channel_norms,
)


def preprocess_transforms(
    cfg: PreprocessConfig,
    image_key: str = "image",
    label_key: str | None = None,
    num_classes: int | None = None,
    channels: Sequence[str] = (),
) -> Compose:
    """Deterministic transforms for an image (and optionally its label map).

    ``channels``: the image's channel names (``data.channels``); none: one channel.
    """
    keys: Sequence[str] = [image_key] if label_key is None else [image_key, label_key]
    steps = [LoadScand(keys, channels=max(1, len(channels)), channel_names=channels)]
    if label_key is not None and num_classes is not None:
        steps.append(CheckLabelsd([label_key], num_classes))
    steps += [
        EnsureTyped(keys, dtype=torch.float32, track_meta=True),  # the reader keeps the file's dtype
        Orientationd(keys, axcodes=cfg.orientation.upper()),
    ]
    if cfg.spacing is not None:
        modes = ["bilinear"] if label_key is None else ["bilinear", "nearest"]
        steps.append(AntiAliasd([image_key], pixdim=cfg.spacing))
        # float32 resampling: MONAI computes in float64 by default (twice the memory and time, no gain here)
        steps.append(Spacingd(keys, pixdim=list(cfg.spacing), mode=modes, padding_mode="border", dtype=torch.float32))
    steps.append(_intensity(cfg, image_key, channels))
    if cfg.crop_foreground:
        steps.append(
            CropForegroundd(
                keys,
                source_key=image_key,
                select_fn=_foreground_fn(cfg),
                margin=cfg.crop_margin,
                allow_smaller=True,
            )
        )
    return Compose(steps)


def body_floor(image, cfg: PreprocessConfig, channels: Sequence[str] = ()) -> torch.Tensor:
    """The voxels of ``image`` (a scan's first channel as read, ``[i, j, k]``) that ``crop_foreground``
    keeps as body: the same intensity normalisation and floor as preprocessing (above the CT window's
    low end; above the image's minimum for z-score and ``auto``). Boolean, ``image``'s grid."""
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None]  # a writable copy
    if cfg.intensity.mode == "auto":
        names = list(channels) or [c.name for c in cfg.intensity.channels] or ["0"]
        normalize_channel_(x[0], resolve_channel_norms(names, cfg.intensity.channels)[0])
    else:
        x = _intensity(cfg, "image", channels)({"image": x})["image"]
    return _foreground_fn(cfg)(torch.as_tensor(x))[0]


def _intensity(cfg: PreprocessConfig, key: str, channels: Sequence[str]):
    if cfg.intensity.mode == "ct_window":
        low, high = cfg.intensity.window
        return ScaleIntensityRanged([key], a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if cfg.intensity.mode == "auto":
        names = list(channels) or [c.name for c in cfg.intensity.channels] or ["0"]
        return NormalizeChannelsd([key], resolve_channel_norms(names, cfg.intensity.channels))
    return NormalizeIntensityd([key], nonzero=False, channel_wise=True)


def _foreground_fn(cfg: PreprocessConfig):
    if cfg.intensity.mode == "ct_window":
        return _above_window_floor
    if cfg.intensity.mode == "auto":
        return body_foreground
    return _above_minimum


def _above_window_floor(x: torch.Tensor) -> torch.Tensor:
    return x > 0.0


def _above_minimum(x: torch.Tensor) -> torch.Tensor:
    return x > x.min()
