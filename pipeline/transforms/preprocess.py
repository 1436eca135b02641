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
from pipeline.transforms.lean_resample import LeanSpacingd, LowpassSpacingd
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
    lean: bool = False,
) -> Compose:
    """Deterministic transforms for an image (and optionally its label map).

    ``channels``: the image's channel names (``data.channels``); none: one channel.
    ``lean`` (inference, :class:`~pipeline.infer.Segmenter`): the same values with less memory: the scan is
    reoriented in its own dtype before the float32 conversion (a flip copies the volume: an int16 copy,
    not a float32 one), and the low-pass filter works in place on the float32 copy (which the pipeline
    owns, see :meth:`~pipeline.infer.Segmenter.prepare`), and the resampling builds its sampling grid slab
    by slab (:mod:`pipeline.transforms.lean_resample`); with a ``spacing`` and no label, the float32
    conversion, the low-pass and the resampling are one step that makes the low-passed float32 planes only
    as the resampling reads them (:class:`~pipeline.transforms.lean_resample.LowpassSpacingd`: no float32
    copy of the scan). The steps are then ``LoadScand, Orientationd, EnsureTyped, ...`` (or ``LoadScand,
    Orientationd, LowpassSpacingd, ...``): :data:`LEAN_READ_STEPS` of them make up the read.
    """
    keys: Sequence[str] = [image_key] if label_key is None else [image_key, label_key]
    steps = [LoadScand(keys, channels=max(1, len(channels)), channel_names=channels)]
    if label_key is not None and num_classes is not None:
        steps.append(CheckLabelsd([label_key], num_classes))
    to_float = EnsureTyped(keys, dtype=torch.float32, track_meta=True)  # the reader keeps the file's dtype
    orient = Orientationd(keys, axcodes=cfg.orientation.upper())
    # float32 conversion, low-pass and resampling in one step, a few source planes at a time: the same
    # voxels without a float32 copy of the scan (pipeline.transforms.lean_resample.LowpassSpacingd)
    one_step = lean and label_key is None and cfg.spacing is not None
    if one_step:
        steps += [orient, LowpassSpacingd([image_key], pixdim=cfg.spacing)]
    else:
        steps += [orient, to_float] if lean else [to_float, orient]
    if cfg.spacing is not None and not one_step:
        modes = ["bilinear"] if label_key is None else ["bilinear", "nearest"]
        steps.append(AntiAliasd([image_key], pixdim=cfg.spacing, in_place=lean))
        # float32 resampling: MONAI computes in float64 by default (twice the memory and time, no gain here)
        spacing = LeanSpacingd if lean else Spacingd  # lean: the sampling grid slab by slab, the same voxels
        steps.append(spacing(keys, pixdim=list(cfg.spacing), mode=modes, padding_mode="border", dtype=torch.float32))
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


LEAN_READ_STEPS = 2  # lean=True (no label key): LoadScand and Orientationd, in the file's dtype


def oriented_as_read(image) -> np.ndarray:
    """Channel 0 of an ``Orientationd`` output (a MetaTensor carrying ``original_affine``) as a numpy view
    in the grid it was read in (``[i, j, k]`` of the file): MONAI's own inverse of the reorientation
    (``Orientation.inverse``: the axis codes of the original affine, ``nib.io_orientation`` of the current
    one), as flips and a transpose, so no voxel is copied. Raises ``ValueError`` if the shape it arrives at
    is not the recorded source shape."""
    import nibabel as nib

    array = image.as_tensor()[0].numpy() if hasattr(image, "as_tensor") else np.asarray(image)[0]
    original = np.asarray(image.meta["original_affine"], dtype=np.float64)
    current = np.asarray(image.affine, dtype=np.float64)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(current),
                                           nib.orientations.axcodes2ornt(nib.aff2axcodes(original)))
    for axis in np.flatnonzero(ornt[:, 1] == -1):
        array = np.flip(array, axis=int(axis))
    array = array.transpose(np.argsort(ornt[:, 0]))
    expected = tuple(int(s) for s in np.asarray(image.meta.get("spatial_shape", array.shape))[:3])
    if array.shape != expected:
        raise ValueError(f"oriented_as_read: reached shape {array.shape}, the source's is {expected}")
    return array


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
