"""Training data: the case list of an nnU-Net/MSD raw dataset, the split, datasets and loaders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.transforms import Compose, EnsureTyped

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.transforms.augment import augment_transforms
from pipeline.transforms.preprocess import preprocess_transforms
from pipeline.transforms.sampling import sampling_transforms

log = logging.getLogger(__name__)


def training_cases(root: str | Path) -> list[dict]:
    """``[{"case_id", "image", "label"}]`` from ``dataset.json`` (or imagesTr/ + labelsTr/ pairs)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"training data folder not found: '{root}'. Set data.root to a folder in the nnU-Net/MSD layout "
            "(imagesTr/, labelsTr/), e.g. one made by `medseg synth data/demo`"
        )
    items = []
    manifest = root / "dataset.json"
    if manifest.is_file():
        listed = json.loads(manifest.read_text()).get("training", [])
        for entry in listed:
            image, label = root / entry["image"], root / entry["label"]
            items.append({"case_id": Path(entry["label"]).name.split(".")[0], "image": str(image), "label": str(label)})
    else:
        for label in sorted((root / "labelsTr").glob("*.nii*")):
            case_id = label.name.split(".")[0]
            image = next(iter(sorted((root / "imagesTr").glob(f"{case_id}_0000.*"))), None)
            if image is None:
                raise InputError(f"label '{label}' has no image: expected imagesTr/{case_id}_0000.nii.gz")
            items.append({"case_id": case_id, "image": str(image), "label": str(label)})
    if not items:
        raise InputError(f"no training cases in '{root}': expected imagesTr/<case>_0000.nii.gz + labelsTr/<case>.nii.gz")
    for item in items:
        for key in ("image", "label"):
            if not Path(item[key]).exists():
                raise InputError(f"training {key} not found: '{item[key]}' (listed in {root})")
    return items


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


def train_loader(items: list[dict], cfg: Config) -> DataLoader:
    deterministic = preprocess_transforms(cfg.preprocess, label_key="label", num_classes=cfg.num_classes)
    random_steps = sampling_transforms(cfg.sampling, cfg.model.spatial_dims) + augment_transforms(
        cfg.augment, cfg.model.spatial_dims
    )
    transform = Compose(list(deterministic.transforms) + random_steps + [EnsureTyped(["image", "label"], track_meta=False)])
    dataset_cls = CacheDataset if cfg.sampling.cache else Dataset
    kwargs = {"cache_rate": 1.0, "num_workers": 0, "progress": False} if cfg.sampling.cache else {}
    dataset = dataset_cls(data=items, transform=transform, **kwargs)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.sampling.batch_size,
        shuffle=True,
        num_workers=cfg.train.num_workers,
        collate_fn=list_data_collate,
        generator=generator,
        drop_last=len(items) > cfg.sampling.batch_size,
    )


def validation_dataset(items: list[dict], cfg: Config) -> CacheDataset:
    transform = preprocess_transforms(cfg.preprocess, label_key="label", num_classes=cfg.num_classes)
    return CacheDataset(data=items, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
