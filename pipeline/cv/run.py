"""``run_cv(out_dir)``: what ``medseg cv OUT_DIR`` does after ``medseg train --fold ...``.

predict (each fold's ``best.pt`` on that fold's validation cases of ``splits.json``, read from the
dataset's imagesTr, post-processing off) → evaluate every out-of-fold prediction together against
labelsTr → choose post-processing (:mod:`pipeline.cv.select`) → evaluate the post-processed
predictions → record the chosen rules in each fold's ``best.pt`` and in ``OUT_DIR/config.yaml``.

Outputs under ``OUT_DIR/cv/``: ``predictions/<case>_seg.nii.gz``, ``metrics.csv``, ``summary.json`` (as
``medseg evaluate`` writes them, with its plots; ``summary.json`` also holds the rule combinations tried,
under ``postprocessing``), ``postprocessing.json``,
``predictions_postprocessed/``, ``metrics_postprocessed.csv`` and ``summary_postprocessed.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pipeline.config import Config, load_config, save_config
from pipeline.errors import InputError
from pipeline.io.atomic import atomic_path, write_json

log = logging.getLogger(__name__)

CV_DIR = "cv"


@dataclass
class CVResult:
    cv_dir: Path
    folds: list[int]  # the folds evaluated (those with a best.pt)
    missing_folds: list[int]
    cases: list[str]  # the out-of-fold cases predicted, each once
    mean_dice: dict[str, float]  # per class name, over the out-of-fold cases
    mean_dice_postprocessed: dict[str, float]
    chosen: dict = field(default_factory=dict)  # postprocessing.json's "chosen"


def run_cv(out_dir: Union[str, Path], device: str = "auto", progress: bool = False) -> CVResult:
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.training.data import training_cases
    from pipeline.training.folds import SPLITS_FILE, fold_dir, read_splits

    out_dir = Path(out_dir)
    splits_path = out_dir / SPLITS_FILE
    if not splits_path.is_file():
        raise InputError(f"no {SPLITS_FILE} in '{out_dir}': expected the train.out_dir of `medseg train CONFIG "
                         "--fold K` (or --fold all), which writes it with the fold_K/ folders")
    splits = read_splits(splits_path)
    _check_disjoint(splits, splits_path)
    bests = {k: fold_dir(out_dir, k) / "best.pt" for k in range(len(splits))}
    folds = [k for k, path in bests.items() if path.is_file()]
    missing = [k for k in bests if k not in folds]
    if not folds:
        raise InputError(f"no fold has a best.pt in '{out_dir}' (expected fold_0/best.pt ... "
                         f"fold_{len(splits) - 1}/best.pt): train them with `medseg train CONFIG --fold all`")
    if missing:
        log.warning("fold(s) %s have no best.pt: evaluating folds %s only", missing, folds)
    config = load_checkpoint(bests[folds[0]]).config
    items = {item["case_id"]: item for item in training_cases(config.data.root)}
    unknown = sorted({c for k in folds for c in splits[k]["val"]} - set(items))
    if unknown:
        raise InputError(f"{SPLITS_FILE} names case(s) {unknown[:5]} that the dataset '{config.data.root}' no "
                         "longer holds: restore them, or delete splits.json and the folds and train again")

    cv_dir = out_dir / CV_DIR
    pred_dir = _fresh_dir(cv_dir / "predictions")
    cases = []
    for k in folds:
        val = [items[c] for c in splits[k]["val"]]
        log.info("fold %d: segmenting its %d validation case(s)", k, len(val))
        predict_cases(bests[k], val, pred_dir, device=device, progress=progress)
        cases += [item["case_id"] for item in val]

    gt_dir = _labels_dir(items, cases)
    options = _options(config)
    rows, summary = _evaluate(pred_dir, gt_dir, cv_dir, options, progress)

    from pipeline.cv.select import OOFCase, chosen_config, select_postprocessing

    oof = [OOFCase(c, pred_dir / f"{c}_seg.nii.gz", Path(items[c]["label"]), items[c]["image"]) for c in cases]
    report = select_postprocessing(oof, config)
    report["folds"], report["missing_folds"] = folds, missing
    write_json(report, cv_dir / "postprocessing.json")
    summary["postprocessing"] = {"chosen": report["chosen"], "combination": report["combination"]}
    write_json(summary, cv_dir / "summary.json")
    log.debug("post-processing chosen: %s", report["chosen"])

    post_cfg = chosen_config(config, report["chosen"])
    post_dir = _fresh_dir(cv_dir / "predictions_postprocessed")
    _postprocess_predictions(oof, post_cfg, post_dir)
    post_rows, post_summary = _evaluate(post_dir, gt_dir, None, options, progress)
    from pipeline.evaluate.report import write_csv

    write_csv(post_rows, cv_dir / "metrics_postprocessed.csv")
    write_json(post_summary, cv_dir / "summary_postprocessed.json")

    record_postprocessing([bests[k] for k in folds], out_dir / "config.yaml", report["chosen"])
    names = {v: n for n, v in config.data.labels.items()}
    return CVResult(cv_dir=cv_dir, folds=folds, missing_folds=missing, cases=cases,
                    mean_dice=_mean_dice(rows, names), mean_dice_postprocessed=_mean_dice(post_rows, names),
                    chosen=report["chosen"])


def predict_cases(checkpoint: Path, items: list[dict], pred_dir: Path, device: str = "auto",
                  progress: bool = False) -> list[Path]:
    """``pred_dir/<case>_seg.nii.gz`` for each item, with the checkpoint's model and its post-processing off
    (the raw predictions the choice of post-processing starts from)."""
    from pipeline.cv.select import without_postprocessing
    from pipeline.infer.segmenter import Segmenter
    from pipeline.io.read_scan import is_nifti
    from pipeline.io.write import write_mask
    from pipeline.model import build_model
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.progress import progress_bar

    ckpt = load_checkpoint(checkpoint)
    config = without_postprocessing(ckpt.config)
    network = build_model(config.model, in_channels=config.in_channels, out_channels=config.num_classes)
    network.load_state_dict(ckpt.state_dict)
    segmenter = Segmenter(network, config, device=device, model_sha256=ckpt.sha256)
    written = []
    for item in progress_bar(items, enabled=progress, desc=checkpoint.parent.name, unit="case", leave=False):
        seg = segmenter.segment(item["image"])
        first = item["image"].sources[0] if hasattr(item["image"], "sources") else item["image"]
        target = pred_dir / f"{item['case_id']}_seg.nii.gz"
        written.append(write_mask(seg.labels, seg.affine, target, source=first if is_nifti(str(first)) else None))
    return written


def record_postprocessing(checkpoints: list[Path], config_yaml: Path, chosen: dict) -> None:
    """Write the chosen rules into each checkpoint's config (re-saved atomically) and into ``config_yaml``
    (created from the first checkpoint's config if missing), so ``segment`` applies them."""
    from pipeline.cv.select import chosen_config
    from pipeline.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    first_config = None
    for path in checkpoints:
        ckpt = load_checkpoint(path)
        first_config = first_config or ckpt.config
        save_checkpoint(path, Checkpoint(chosen_config(ckpt.config, chosen), ckpt.state_dict, ckpt.epoch,
                                         ckpt.best_metric, extra=ckpt.extra))
    if config_yaml.is_file():
        base = load_config(config_yaml)
    else:
        base = dataclasses.replace(first_config, train=dataclasses.replace(
            first_config.train, out_dir=str(config_yaml.parent)))
    _save_config_atomic(chosen_config(base, chosen), config_yaml)
    plans = _plans_of(config_yaml.parent)
    if plans is not None:
        from pipeline.plan.write import record_postprocessing as record_in_plans

        record_in_plans(plans, chosen, f"`medseg cv {config_yaml.parent}` from the out-of-fold predictions")
        log.info("post-processing chosen recorded in %s", plans)


def _plans_of(out_dir: Path) -> Optional[Path]:
    """The ``plans.yaml`` (of ``medseg plan``) whose ``train.out_dir`` is ``out_dir``, if there is one: it
    sits one folder up, beside ``fingerprint.json``."""
    plans = out_dir.parent / "plans.yaml"
    if not plans.is_file():
        return None
    try:
        planned = Path(load_config(plans).train.out_dir)
    except Exception:  # noqa: BLE001 - a file we cannot read is not ours to change
        return None
    return plans if planned.resolve() == out_dir.resolve() else None


# --- helpers -------------------------------------------------------------------------------------


def _check_disjoint(splits: list[dict], path: Path) -> None:
    seen: dict[str, int] = {}
    for k, split in enumerate(splits):
        for case in split["val"]:
            if case in seen:
                raise InputError(f"'{path}': case {case} is in the validation lists of folds {seen[case]} and {k}; "
                                 "each case must be validated by one fold. Delete it to split again")
            seen[case] = k


def _fresh_dir(path: Path) -> Path:
    """An empty folder (ours: the masks of an earlier run are removed, so no stale case is evaluated)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _labels_dir(items: dict, cases: list[str]) -> Path:
    folders = {Path(items[c]["label"]).parent for c in cases if items[c].get("label")}
    if len(folders) != 1:
        raise InputError(f"the out-of-fold cases' labels are not in one folder ({sorted(map(str, folders))}): "
                         "expected the dataset's labelsTr/")
    return folders.pop()


def _options(config: Config):
    from pipeline.evaluate import EvaluationOptions

    return EvaluationOptions(labels=tuple(range(1, config.num_classes)))


def _evaluate(pred_dir: Path, gt_dir: Path, out_dir, options, progress: bool):
    """``evaluate_folder`` against labelsTr: cases of missing folds are listed in ``missing_predictions``."""
    from pipeline.evaluate import evaluate_folder

    return evaluate_folder(pred_dir, gt_dir, out_dir, options, progress=progress)


def _postprocess_predictions(cases, config: Config, out_dir: Path) -> None:
    import nibabel as nib

    from pipeline.cv.select import first_channel
    from pipeline.io.write import write_mask
    from pipeline.postprocess.rules import apply_postprocessing

    needs_image = bool(config.postprocess.restrict_to_body)
    for case in cases:
        image = nib.load(str(case.prediction))
        labels = np.asarray(image.dataobj).astype(np.uint8)
        scan = first_channel(case.image) if needs_image else None
        out = apply_postprocessing(labels, image.affine, scan, config)
        write_mask(out, image.affine, out_dir / case.prediction.name, source=case.prediction)


def _mean_dice(rows, names: dict[int, str]) -> dict[str, float]:
    by_label: dict[int, list[float]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row.dice)
    return {names.get(label, str(label)): float(np.mean(v)) for label, v in sorted(by_label.items())}


def _save_config_atomic(config: Config, path: Path) -> None:
    with atomic_path(path, suffix=".tmp.yaml") as tmp:
        save_config(config, tmp)
