"""What a training run takes from its dataset: the cases, the channel names, the label names, and the
intensity statistics of CT channels. The result is the config the model is trained with, which every
checkpoint carries, so ``segment`` needs nothing but the checkpoint.

* ``data.channels``: the dataset's channel names (nnU-Net ``channel_names``, MSD ``modality``) unless
  the config names them; a config that names another number of channels is refused.
* ``data.labels``: the dataset's labels unless the config sets labels other than the default.
* ``preprocess.intensity.mode: auto``: one entry per channel in ``preprocess.intensity.channels``, by
  name (``CT`` → clip + z-score with the dataset's foreground statistics, measured here; anything else
  → per-image z-score). Entries the config gives are kept as they are.
* ``ct_window`` applies a HU window: on a dataset whose channels are not all CT it is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.config.schema import DEFAULT_LABELS, ChannelNormConfig
from pipeline.errors import ConfigError, InputError
from pipeline.io.channels import Channels
from pipeline.io.reader import ScanReader
from pipeline.transforms.normalize import channel_statistics, foreground_sample, resolve_channel_norms

log = logging.getLogger(__name__)

MAX_PROBLEMS_SHOWN = 8


def dataset_items(dataset) -> list[dict]:
    """``[{"case_id", "image", "label"}]`` for the loaders: ``image`` is the case's one file (a 3D scan or a
    4D NIfTI) or the :class:`~pipeline.io.channels.Channels` of its channel files."""
    names = tuple(dataset.channel_names)
    items = []
    for case in dataset.cases:
        image = case.images[0] if len(case.images) == 1 else Channels(tuple(case.images), names)
        items.append({"case_id": case.case_id, "image": image, "label": case.label})
    return items


def load_training_data(cfg: Config, check: bool = True) -> tuple[Config, list[dict]]:
    """The config resolved against ``data.root``'s dataset, and its training items.

    The items are the ``data.max_cases`` draw (:func:`pipeline.training.data.select_cases`; all cases by
    default). With ``check`` those cases are validated first (:func:`pipeline.dataset.check.check_dataset`);
    any problem stops training with the list.
    """
    from pipeline.dataset.check import check_dataset
    from pipeline.dataset.layout import read_dataset

    if not Path(cfg.data.root).is_dir():
        raise InputError(
            f"training data folder not found: '{cfg.data.root}'. Set data.root to a dataset folder (nnU-Net v2, "
            "MSD, or imagesTr/ + labelsTr/), e.g. one made by `medseg synth data/demo`"
        )
    from pipeline.training.data import select_cases

    dataset = read_dataset(cfg.data.root)
    labels = _labels(cfg, dataset)
    items = select_cases(dataset_items(dataset), cfg.data.max_cases, cfg.train.seed)
    if len(items) < len(dataset.cases):
        log.info("data.max_cases %d: training on %d of the dataset's %d cases (a seeded draw)",
                 cfg.data.max_cases, len(items), len(dataset.cases))
    if check:
        report = check_dataset(cfg.data.root, labels=labels, case_ids={item["case_id"] for item in items})
        if not report.ok:
            lines = report.lines()
            shown = "; ".join(lines[:MAX_PROBLEMS_SHOWN]) + (f"; ... ({len(lines)} in all)" if len(lines) >
                                                               MAX_PROBLEMS_SHOWN else "")
            raise InputError(f"the dataset '{cfg.data.root}' has {len(lines)} problem(s): {shown}. "
                             f"Run `medseg check {cfg.data.root}` for the full list, fix them, and train again")
    channels = _channels(cfg, dataset)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=labels, channels=channels))
    cfg = _intensity(cfg, items)
    return cfg, items


def _labels(cfg: Config, dataset) -> dict[str, int]:
    if dataset.labels and cfg.data.labels == DEFAULT_LABELS:
        return dict(dataset.labels)
    return dict(cfg.data.labels)


def _channels(cfg: Config, dataset) -> list[str]:
    found = list(dataset.channel_names) or ["0"]
    if not cfg.data.channels:
        return found
    if len(cfg.data.channels) != len(found):
        raise ConfigError(
            f"data.channels names {len(cfg.data.channels)} channel(s) {cfg.data.channels} but the dataset "
            f"'{dataset.root}' has {len(found)} ({found}): remove data.channels to take the dataset's, or fix it"
        )
    return list(cfg.data.channels)


def _intensity(cfg: Config, items: list[dict]) -> Config:
    intensity = cfg.preprocess.intensity
    names = cfg.channel_names
    if intensity.mode == "ct_window":
        # named channels other than CT (numbers are unnamed channels: the config's window is trusted)
        others = [n for n in cfg.data.channels if n.strip().upper() != "CT" and not n.strip().isdigit()]
        if others:
            raise ConfigError(
                f"preprocess.intensity.mode ct_window clips every channel to the HU window {intensity.window}, "
                f"but the dataset's channels {cfg.data.channels} include {others}, which are not CT: set "
                "preprocess.intensity.mode: auto (per channel by name, as nnU-Net does) or zscore"
            )
        return cfg
    if intensity.mode != "auto":
        return cfg
    norms = resolve_channel_norms(names, intensity.channels)
    missing = [c for c, norm in enumerate(norms) if not norm.complete]
    if missing:
        stats = ct_statistics(items, missing, len(names), cfg.train.seed)
        norms = [dataclasses.replace(norm, **stats[c]) if c in stats else norm for c, norm in enumerate(norms)]
    for c, norm in enumerate(norms):
        log.info("channel %d (%s): %s", c, norm.name, _describe(norm))
    return dataclasses.replace(cfg, preprocess=dataclasses.replace(
        cfg.preprocess, intensity=dataclasses.replace(intensity, channels=norms)))


def ct_statistics(items: list[dict], channels: list[int], n_channels: int, seed: int = 0) -> dict[int, dict]:
    """Foreground (label > 0) intensity statistics of ``channels`` (of ``n_channels``) over the training
    ``items``, read in their own units (HU), one case at a time."""
    rng = np.random.default_rng(seed)
    reader, label_reader = ScanReader(channels=n_channels), ScanReader()
    samples: dict[int, list] = {c: [] for c in channels}
    for item in items:
        if not item.get("label"):
            continue
        image = reader.get_data(reader.read(item["image"]))[0]
        label = label_reader.get_data(label_reader.read(item["label"]))[0]
        image = image[..., None] if image.ndim == 3 else image
        if image.shape[:3] != label.shape:
            continue  # the dataset check reports grid problems
        for c in channels:
            samples[c].append(foreground_sample(image[..., c], label, rng))
    return {c: channel_statistics(values) for c, values in samples.items()}


def _describe(norm: ChannelNormConfig) -> str:
    if norm.resolved_scheme == "ct":
        return (f"CT: clip to [{norm.clip[0]:.1f}, {norm.clip[1]:.1f}], z-score with foreground mean "
                f"{norm.mean:.1f}, std {norm.std:.1f}")
    return "per-image z-score inside the body"

