"""Drawing training samples from preprocessed volumes so that rare lesion voxels are seen often.

* 3D: patches centred on a lesion voxel ``pos_ratio`` times as often as on any other voxel (MONAI
  ``RandCropByPosNegLabeld``).
* 2D: axial slices (the last axis after orientation), a fraction ``lesion_slice_ratio`` of them drawn
  from slices that contain a lesion, then cropped/padded to the patch size around lesions likewise.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform, RandCropByPosNegLabeld, Randomizable, SpatialPadd

from pipeline.config import SamplingConfig


def sampling_transforms(cfg: SamplingConfig, spatial_dims: int, image_key="image", label_key="label") -> list:
    keys = [image_key, label_key]
    patch = list(cfg.patch_size)
    steps: list = []
    if spatial_dims == 2:
        steps.append(RandAxialSliced(keys, label_key, cfg.lesion_slice_ratio, cfg.samples_per_volume))
        per_crop = 1
    else:
        per_crop = cfg.samples_per_volume
    crop = RandCropByPosNegLabeld if spatial_dims == 3 else _OneCropByPosNegLabeld
    steps += [
        SpatialPadd(keys, spatial_size=patch, mode="constant"),
        crop(
            keys,
            label_key=label_key,
            spatial_size=patch,
            pos=cfg.pos_ratio,
            neg=1.0,
            num_samples=per_crop,
            image_key=None,
            allow_smaller=False,
        ),
    ]
    return steps


class _OneCropByPosNegLabeld(RandCropByPosNegLabeld):
    """One crop per sample (a dict, not a list of one), for slices that are already a list."""

    def __call__(self, data, lazy=None):
        return super().__call__(data, lazy=lazy)[0]


class RandAxialSliced(Randomizable, MapTransform):
    """Take ``num_samples`` axial slices (C, X, Y, Z) → list of (C, X, Y), lesion slices oversampled."""

    def __init__(self, keys, label_key: str, lesion_ratio: float, num_samples: int):
        MapTransform.__init__(self, keys)
        self.label_key, self.lesion_ratio, self.num_samples = label_key, lesion_ratio, num_samples
        self._indices: list[int] = []

    def randomize(self, label: torch.Tensor) -> None:
        depth = label.shape[-1]
        per_slice = torch.as_tensor(label).reshape(-1, depth).amax(dim=0) > 0
        lesion = np.flatnonzero(per_slice.cpu().numpy())
        self._indices = []
        for _ in range(self.num_samples):
            if lesion.size and self.R.rand() < self.lesion_ratio:
                self._indices.append(int(self.R.choice(lesion)))
            else:
                self._indices.append(int(self.R.randint(depth)))

    def __call__(self, data) -> list[dict]:
        d = dict(data)
        self.randomize(d[self.label_key])
        out = []
        for index in self._indices:
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = _as_plain(d[key])[..., index]
            out.append(sample)
        return out


def _as_plain(x):
    """Drop MONAI's spatial metadata: a 2D slice has no 3D affine."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
