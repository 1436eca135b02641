"""Training data: the case list of an nnU-Net/MSD raw dataset, the split, datasets and loaders.

Throughput: the deterministic preprocessing (and the padding to the patch size) runs once per case and
is cached (``sampling.cache``); so are, for 3D patches, the flat indices of the lesion and background
voxels the patch sampler draws centres from (``RandCropByPosNegLabeld`` would otherwise scan the whole
volume for them on every draw: ~100 ms for a 400×400×120 volume, ~2 ms with the cached indices; the
patches drawn are the same). Only the random crops and augmentations run per sample. With
``train.num_workers > 0`` the worker processes are persistent (started once, not at every pass over the
data) and each keeps ``PREFETCH_FACTOR`` batches ready; with 0 the trainer may prepare the next batches
in a background thread (:mod:`pipeline.training.trainer`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.transforms import Compose, EnsureTyped, MapTransform, RandCropByPosNegLabeld
from monai.transforms.utils import map_binary_to_indices

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.transforms.augment import augment_transforms
from pipeline.transforms.preprocess import preprocess_transforms
from pipeline.transforms.sampling import sampling_transforms

log = logging.getLogger(__name__)


def training_cases(root: str | Path, max_cases: int = 0, seed: int = 0) -> list[dict]:
    """``[{"case_id", "image", "label"}]`` of the dataset at ``root`` (nnU-Net v2, MSD or a plain folder:
    :func:`pipeline.dataset.layout.read_dataset`), at most ``max_cases`` of them (:func:`select_cases`); a
    layout problem (a missing channel or label file, a duplicate case) raises :class:`InputError` naming it."""
    from pipeline.dataset.layout import read_dataset
    from pipeline.training.dataset_config import dataset_items

    dataset = read_dataset(root)
    if dataset.problems:
        raise InputError(f"the dataset '{root}' has {len(dataset.problems)} problem(s): "
                         + "; ".join(dataset.problems[:8]) + f". Run `medseg check {root}` for the full list")
    return select_cases(dataset_items(dataset), max_cases, seed)


def select_cases(items: list[dict], max_cases: int, seed: int = 0) -> list[dict]:
    """At most ``max_cases`` of the labelled ``items`` (``data.max_cases``; 0 = all of them): a seeded draw,
    kept in dataset order, so that training, every fold, ``medseg cv`` and ``medseg plan`` see the same cases.
    Unlabelled items are never drawn (they are not training cases)."""
    if not max_cases or max_cases >= sum(1 for item in items if item.get("label")):
        return list(items)
    labelled = [i for i, item in enumerate(items) if item.get("label")]
    order = np.random.default_rng(seed).permutation(len(labelled))
    chosen = {labelled[i] for i in order[:max_cases]}
    return [item for i, item in enumerate(items) if i in chosen]


def split_cases(items: list[dict], cfg: Config) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split (by seed), or the explicit ``data.val_cases``."""
    if cfg.data.val_cases:
        val_ids = set(cfg.data.val_cases)
        missing = val_ids - {i["case_id"] for i in items}
        if missing:
            raise InputError(f"data.val_cases names unknown cases {sorted(missing)}")
    else:
        n_val = int(round(len(items) * cfg.data.val_fraction))
        if cfg.data.val_fraction > 0 and len(items) >= 2:
            n_val = min(max(1, n_val), len(items) - 1)
        order = np.random.default_rng(cfg.train.seed).permutation(len(items))
        val_ids = {items[i]["case_id"] for i in order[:n_val]}
    train = [i for i in items if i["case_id"] not in val_ids]
    val = [i for i in items if i["case_id"] in val_ids]
    return train, val


PREFETCH_FACTOR = 2  # batches each loader worker keeps ready


def train_loader(items: list[dict], cfg: Config) -> DataLoader:
    deterministic = preprocess_transforms(cfg.preprocess, label_key="label", num_classes=cfg.num_classes,
                                          channels=cfg.data.channels)
    sampling = sampling_transforms(cfg.sampling, cfg.model.spatial_dims)
    if cfg.sampling.cache:
        sampling = with_cached_crop_indices(sampling)
    random_steps = sampling + augment_transforms(cfg.augment, cfg.model.spatial_dims, channels=cfg.in_channels)
    transform = Compose(list(deterministic.transforms) + random_steps + [EnsureTyped(["image", "label"], track_meta=False)])
    dataset_cls = CacheDataset if cfg.sampling.cache else Dataset
    kwargs = {"cache_rate": 1.0, "num_workers": 0, "progress": False} if cfg.sampling.cache else {}
    dataset = dataset_cls(data=items, transform=transform, **kwargs)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    workers = cfg.train.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.sampling.batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=list_data_collate,
        generator=generator,
        drop_last=len(items) > cfg.sampling.batch_size,
        # The trainer re-iterates the loader at every pass: keep the workers instead of forking new ones.
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
    )


class CropIndicesd(MapTransform):
    """Flat indices of the foreground and background voxels of ``label_key``, as ``RandCropByPosNegLabeld``
    computes them (``map_binary_to_indices``), stored under ``fg_key``/``bg_key`` so a cache keeps them.

    Stored as int32 numpy arrays when the volume allows (half the memory of int64; the same voxels).
    """

    def __init__(self, label_key: str, fg_key: str, bg_key: str):
        super().__init__([label_key])
        self.label_key, self.fg_key, self.bg_key = label_key, fg_key, bg_key

    def __call__(self, data):
        d = dict(data)
        label = d[self.label_key]
        fg, bg = map_binary_to_indices(label.as_tensor() if hasattr(label, "as_tensor") else label)
        dtype = np.int32 if int(np.prod(label.shape[1:])) < np.iinfo(np.int32).max else np.int64
        d[self.fg_key] = np.asarray(fg, dtype=dtype)
        d[self.bg_key] = np.asarray(bg, dtype=dtype)
        return d


def with_cached_crop_indices(steps: list, fg_key: str = "label_fg_indices", bg_key: str = "label_bg_indices") -> list:
    """``steps`` with :class:`CropIndicesd` before each ``RandCropByPosNegLabeld`` that has none, which then
    reads them. It only moves work before the first random step (where a cache keeps it): the crops drawn
    are exactly the same. 2D sampling (random slices first) is returned unchanged.
    """
    out: list = []
    for step in steps:
        if isinstance(step, RandCropByPosNegLabeld) and step.fg_indices_key is None and step.bg_indices_key is None \
                and step.image_key is None and not any(_is_random(s) for s in out):
            out.append(CropIndicesd(step.label_key, fg_key, bg_key))
            step.fg_indices_key, step.bg_indices_key = fg_key, bg_key
        out.append(step)
    return out


def _is_random(step) -> bool:
    from monai.transforms import RandomizableTrait

    return isinstance(step, RandomizableTrait)


def validation_dataset(items: list[dict], cfg: Config) -> CacheDataset:
    transform = preprocess_transforms(cfg.preprocess, label_key="label", num_classes=cfg.num_classes,
                                      channels=cfg.data.channels)
    return CacheDataset(data=items, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
