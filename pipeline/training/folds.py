"""Cross-validation folds: ``splits.json`` (nnU-Net's format) and which cases each fold trains on.

``splits.json`` sits in ``train.out_dir`` and is written once, atomically: a list with one
``{"train": [case ids], "val": [case ids]}`` per fold. The cases are stratified by whether their label
holds any lesion voxel (each group shuffled with ``train.seed``, then dealt to the folds in turn), so
every fold validates on its share of lesion-free cases. Every fold, and ``medseg cv``, reads the same
file; if the dataset's case list no longer matches it, training refuses (delete the file to re-split).
Fold ``K`` trains into ``train.out_dir/fold_K/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.io.atomic import write_json

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"


def fold_dir(out_dir: str | Path, fold: int) -> Path:
    """Where fold ``fold`` trains: ``out_dir/fold_<fold>``."""
    return Path(out_dir) / f"fold_{fold}"


def fold_config(cfg: Config, fold: int) -> Config:
    """``cfg`` training fold ``fold``: its ``train.out_dir`` is the fold's folder."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(fold_dir(cfg.train.out_dir, fold))))


def has_lesion(label_path: str | Path | None) -> bool:
    """Whether a label file holds any foreground voxel (read once, for the stratification)."""
    if label_path is None:
        return False
    from pipeline.io.read_scan import read_scan

    return bool(np.any(np.asarray(read_scan(label_path, validate=False).array) > 0))


def make_splits(case_ids: Sequence[str], lesion: Sequence[bool], folds: int, seed: int) -> list[dict]:
    """``folds`` (fewer when there are fewer cases: as many as cases) ``{"train", "val"}`` splits.

    Stratified: the cases with and without a lesion are each shuffled with ``seed`` and dealt to the
    folds in turn (with lesions first, the rest continuing where they stopped), so fold sizes differ by
    at most one and each group is spread as evenly as it can be. Lists are sorted.
    """
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        raise InputError("make_splits: the case ids are not unique")
    if len(ids) < 2:
        raise InputError(f"cross-validation needs at least 2 cases, found {len(ids)}")
    n_folds = folds
    if len(ids) < folds:
        log.warning("only %d cases for data.folds=%d: using %d folds (one validation case each)",
                    len(ids), folds, len(ids))
        n_folds = len(ids)
    rng = np.random.default_rng(seed)
    with_lesion = [c for c, flag in zip(ids, lesion) if flag]
    without = [c for c, flag in zip(ids, lesion) if not flag]
    order = [with_lesion[i] for i in rng.permutation(len(with_lesion))] + \
            [without[i] for i in rng.permutation(len(without))]
    val = [sorted(order[k::n_folds]) for k in range(n_folds)]
    return [{"train": sorted(c for c in ids if c not in set(v)), "val": v} for v in val]


def read_splits(path: str | Path) -> list[dict]:
    """The folds of a ``splits.json`` (checked: a list of ``{"train": [...], "val": [...]}``)."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read '{path}': {exc}. Delete it to split the cases again") from None
    if not isinstance(splits, list) or not splits or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list)
            for s in splits):
        raise InputError(f"'{path}' is not a splits file: expected a list of {{\"train\": [...], \"val\": [...]}} "
                         "per fold. Delete it to split the cases again")
    return splits


def fold_splits(out_dir: str | Path, items: Sequence[dict], cfg: Config) -> list[dict]:
    """The folds of ``out_dir/splits.json``: read when it exists (and matches the cases), else made from
    ``items`` (``case_id``, ``label``) and written once, atomically."""
    path = Path(out_dir) / SPLITS_FILE
    ids = [item["case_id"] for item in items]
    if path.is_file():
        splits = read_splits(path)
        listed = set(splits[0]["train"]) | set(splits[0]["val"])
        if listed != set(ids):
            added, gone = sorted(set(ids) - listed), sorted(listed - set(ids))
            raise InputError(
                f"the cases of '{cfg.data.root}' no longer match '{path}' (new: {added[:5]}, no longer there: "
                f"{gone[:5]}): the folds would mix models trained on other cases. Delete '{path}' (and the "
                "fold_* folders) to split again, or restore the dataset")
        expected = min(cfg.data.folds, len(ids))
        if len(splits) != expected:
            raise InputError(f"'{path}' holds {len(splits)} folds but data.folds={cfg.data.folds} asks for "
                             f"{expected}: set data.folds={len(splits)}, or delete '{path}' to split again")
        return splits
    splits = make_splits(ids, [has_lesion(item.get("label")) for item in items], cfg.data.folds, cfg.train.seed)
    write_json(splits, path)
    log.info("wrote %s: %d folds of %d cases", path, len(splits), len(ids))
    return splits


def fold_items(items: Sequence[dict], splits: list[dict], fold: int) -> tuple[list[dict], list[dict]]:
    """(training items, validation items) of fold ``fold``: its ``val`` list and every other case."""
    if not 0 <= fold < len(splits):
        raise InputError(f"--fold {fold}: there are {len(splits)} folds (0 to {len(splits) - 1})")
    val_ids = set(splits[fold]["val"])
    return [i for i in items if i["case_id"] not in val_ids], [i for i in items if i["case_id"] in val_ids]


def check_fold(cfg: Config, fold: int) -> None:
    """Refuse a fold number outside ``0 .. data.folds - 1`` before any work."""
    if not isinstance(fold, int) or not 0 <= fold < cfg.data.folds:
        raise InputError(f"--fold {fold}: expected 0 to {cfg.data.folds - 1} (data.folds={cfg.data.folds}) or 'all'")
