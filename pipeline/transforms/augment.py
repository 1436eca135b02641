"""Random augmentation for training, from ``AugmentConfig``; 2D or 3D by ``spatial_dims``.

Spatial transforms are applied to image and label together (label with nearest interpolation), the
same transform to every channel of the image; intensity transforms to the image only, drawn per
channel for multi-channel images (each sequence's scaling varies on its own).
"""

from __future__ import annotations

import math

from monai.transforms import (
    Rand2DElasticd,
    Rand3DElasticd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from pipeline.config import AugmentConfig


def augment_transforms(cfg: AugmentConfig, spatial_dims: int, image_key="image", label_key="label",
                       channels: int = 1) -> list:
    keys = [image_key, label_key]
    modes = ["bilinear", "nearest"]
    steps: list = []
    if cfg.flip_prob > 0:
        # Flip in-plane axes only for 2D; in 3D also the slice axis.
        steps += [RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)]
    if cfg.rotate_prob > 0 or cfg.scale_prob > 0:
        angle = math.radians(cfg.rotate_deg)
        rotate = (angle,) if spatial_dims == 2 else (angle / 3, angle / 3, angle)
        zoom = (-cfg.scale_range, cfg.scale_range)
        steps.append(
            RandAffined(
                keys,
                prob=max(cfg.rotate_prob, cfg.scale_prob),
                rotate_range=rotate if cfg.rotate_prob > 0 else None,
                scale_range=[zoom] * spatial_dims if cfg.scale_prob > 0 else None,
                mode=modes,
                padding_mode="border",
            )
        )
    if cfg.elastic_prob > 0:
        elastic = Rand2DElasticd if spatial_dims == 2 else Rand3DElasticd
        kwargs = {"spacing": tuple([int(cfg.elastic_sigma[1] * 4)] * 2)} if spatial_dims == 2 else {
            "sigma_range": tuple(cfg.elastic_sigma)}
        steps.append(
            elastic(
                keys,
                prob=cfg.elastic_prob,
                magnitude_range=tuple(cfg.elastic_magnitude),
                mode=modes,
                padding_mode="border",
                **kwargs,
            )
        )
    if cfg.intensity_scale_prob > 0:
        steps.append(RandScaleIntensityd([image_key], factors=cfg.intensity_scale, prob=cfg.intensity_scale_prob,
                                         channel_wise=channels > 1))
    if cfg.intensity_shift_prob > 0:
        steps.append(RandShiftIntensityd([image_key], offsets=cfg.intensity_shift, prob=cfg.intensity_shift_prob,
                                         channel_wise=channels > 1))
    if cfg.noise_prob > 0:
        steps.append(RandGaussianNoised([image_key], prob=cfg.noise_prob, std=cfg.noise_std))
    return steps
