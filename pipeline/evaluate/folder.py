"""Evaluating a folder of predicted masks against a folder of ground truth, case by case.

Pairing: each ground truth ``GT_DIR/<case>.nii.gz`` (the nnU-Net/MSD ``labelsTs`` naming; ``.nii`` too)
is matched with ``PRED_DIR/<case>_seg.nii.gz`` (what ``segment`` writes) or else ``PRED_DIR/<case>.nii.gz``.
A ground truth without prediction is skipped with a warning and listed in the summary
(``missing_predictions``). If ``GT_DIR`` holds no NIfTI but has a ``labelsTs/`` folder, that folder is used.

Every pair must share its grid (same shape, affines equal within 1e-3 mm). This is checked from the
headers for all pairs before any metric is computed; if any pair differs, nothing is evaluated and an
:class:`InputError` names every such case (the CLI exits with code 2).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pipeline.errors import InputError
from pipeline.evaluate.case import CaseMetrics, EvaluationOptions, evaluate_arrays, labels_present
from pipeline.evaluate.summary import summarise
from pipeline.io.geometry import AFFINE_TOLERANCE_MM, voxel_spacing

log = logging.getLogger(__name__)

PRED_SUFFIX = "_seg.nii.gz"
NIFTI_SUFFIXES = (".nii.gz", ".nii")

PathLike = Union[str, Path]


def evaluate_folder(pred_dir: PathLike, gt_dir: PathLike, out_dir: Optional[PathLike] = None,
                    options: Optional[EvaluationOptions] = None,
                    progress: bool = False) -> tuple[list[CaseMetrics], dict]:
    """Evaluate every matched case; return the rows (one per case and label) and the summary.

    With ``out_dir``: ``metrics.csv``, ``summary.json`` and PNG plots are written there (atomically).
    """
    options = options or EvaluationOptions()
    pairs, missing = find_pairs(Path(pred_dir), Path(gt_dir))
    check_grids(pairs)
    rows = evaluate_pairs(pairs, options, progress)
    summary = summarise(rows)
    summary["settings"] = {
        "labels": sorted({r.label for r in rows}),
        "nsd_tolerance_mm": options.nsd_tolerance_mm,
        "min_overlap_iou": options.min_overlap_iou,
        "size_bins_mm3": list(options.size_bins_mm3),
    }
    summary["missing_predictions"] = missing
    if out_dir is not None:
        from pipeline.evaluate.report import write_report

        write_report(rows, summary, Path(out_dir), plots=options.plots)
    return rows, summary


def evaluate_case(case_id: str, pred_path: PathLike, gt_path: PathLike,
                  options: Optional[EvaluationOptions] = None) -> list[CaseMetrics]:
    """Rows of one case: the labels of ``options.labels``, else those present in either mask (else 1)."""
    options = options or EvaluationOptions()
    check_grids([(case_id, Path(pred_path), Path(gt_path))])
    pred, truth, spacing = read_pair(Path(pred_path), Path(gt_path))
    labels = options.labels or sorted(labels_present(pred) | labels_present(truth)) or [1]
    return evaluate_arrays(case_id, pred, truth, spacing, labels, options)


def evaluate_pairs(pairs: list[tuple[str, Path, Path]], options: EvaluationOptions,
                   progress: bool = False) -> list[CaseMetrics]:
    """Rows for every pair. Without ``options.labels`` the label set is every foreground value seen in any
    case (label 1 if all masks are empty); a label absent from both masks of a case gets the both-empty row
    (Dice 1, distances 0)."""
    per_case: list[tuple[str, list[CaseMetrics]]] = []
    seen: set[int] = set()
    for case_id, pred_path, gt_path in _progress(pairs, progress):
        pred, truth, spacing = read_pair(pred_path, gt_path)
        if options.labels is not None:
            labels = list(options.labels)
        else:
            labels = sorted(labels_present(pred) | labels_present(truth))
            seen.update(labels)
        log.debug("case %s: labels %s, spacing %s mm", case_id, labels, np.round(spacing, 4).tolist())
        per_case.append((case_id, evaluate_arrays(case_id, pred, truth, spacing, labels, options)))
    all_labels = list(options.labels) if options.labels is not None else sorted(seen) or [1]
    rows = []
    for case_id, case_rows in per_case:
        by_label = {r.label: r for r in case_rows}
        for label in all_labels:
            rows.append(by_label.get(label) or _both_empty_row(case_id, label, options))
    return rows


def find_pairs(pred_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case_id, prediction, ground truth) for every ground truth with a prediction; the missing case ids."""
    if not gt_dir.is_dir():
        raise InputError(f"ground-truth folder not found: '{gt_dir}'")
    if not pred_dir.is_dir():
        raise InputError(f"prediction folder not found: '{pred_dir}'")
    truths = _nifti_files(gt_dir)
    if not truths and (gt_dir / "labelsTs").is_dir():
        log.info("using %s for the ground truth", gt_dir / "labelsTs")
        truths = _nifti_files(gt_dir / "labelsTs")
    pairs, missing = [], []
    for case_id, gt in truths.items():
        pred = next((p for p in _prediction_candidates(pred_dir, case_id) if p.is_file()), None)
        if pred is None:
            log.warning("no prediction for case %s (expected %s)", case_id,
                        pred_dir / f"{case_id}{PRED_SUFFIX}")
            missing.append(case_id)
            continue
        pairs.append((case_id, pred, gt))
    if not pairs:
        raise InputError(
            f"no prediction in '{pred_dir}' matches a ground truth in '{gt_dir}' ({len(truths)} ground-truth "
            f"files <case>.nii.gz; predictions are expected as <case>{PRED_SUFFIX} or <case>.nii.gz)"
        )
    if missing:
        log.warning("%d of %d ground-truth cases have no prediction and are left out", len(missing),
                    len(truths))
    return pairs, missing


def check_grids(pairs: list[tuple[str, Path, Path]]) -> None:
    """Raise one :class:`InputError` naming every case whose prediction and ground truth grids differ."""
    import nibabel as nib

    problems = []
    for case_id, pred_path, gt_path in pairs:
        pred, truth = nib.load(str(pred_path)), nib.load(str(gt_path))
        pred_shape, gt_shape = _spatial_shape(pred.shape), _spatial_shape(truth.shape)
        if pred_shape != gt_shape:
            problems.append(f"case {case_id}: prediction {pred_path.name} has shape {pred_shape}, "
                            f"ground truth {gt_path.name} {gt_shape}")
            continue
        offset = float(np.abs(pred.affine - truth.affine).max())
        if offset > AFFINE_TOLERANCE_MM:
            problems.append(f"case {case_id}: the affines of prediction {pred_path.name} and ground truth "
                            f"{gt_path.name} differ by up to {offset:.3g} mm")
    if problems:
        cases = "1 case is" if len(problems) == 1 else f"{len(problems)} cases are"
        raise InputError(
            f"{cases} not on the same grid as the ground truth (same shape, affine within "
            f"{AFFINE_TOLERANCE_MM:g} mm), so nothing was evaluated: "
            + "; ".join(problems)
            + ". Segment the source scan of each label, or move these cases out of the folders"
        )


def read_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both label arrays (integers) and the voxel spacing in mm (column norms of the ground-truth affine)."""
    import nibabel as nib

    truth_img = nib.load(str(gt_path))
    truth = _read_labels(gt_path, truth_img)
    if truth.ndim > 3:
        raise InputError(f"'{gt_path}' has shape {truth.shape}; expected a 2D or 3D label map")
    spacing = voxel_spacing(truth_img.affine)[: truth.ndim]
    return _read_labels(pred_path), truth, spacing


# --- helpers -------------------------------------------------------------------------------------


def _both_empty_row(case_id: str, label: int, options: EvaluationOptions) -> CaseMetrics:
    empty = np.zeros((1, 1, 1), bool)
    return evaluate_arrays(case_id, empty, empty, (1.0, 1.0, 1.0), [label], options)[0]


def _read_labels(path: Path, image=None) -> np.ndarray:
    import nibabel as nib

    image = image if image is not None else nib.load(str(path))
    data = np.asarray(image.dataobj)
    data = data.reshape(_spatial_shape(data.shape))
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all():
            raise InputError(f"'{path}' holds NaN or infinite values; a label map must hold integer labels")
        data = np.rint(data).astype(np.int32)
    return data


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton dimensions beyond the third ((x, y, z, 1) → (x, y, z))."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _nifti_files(folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.iterdir()):
        case_id = _strip_suffix(path.name)
        if path.is_file() and case_id is not None and not path.name.startswith("."):
            out.setdefault(case_id, path)
    return out


def _strip_suffix(name: str) -> Optional[str]:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _prediction_candidates(pred_dir: Path, case_id: str) -> list[Path]:
    return [pred_dir / f"{case_id}_seg{suffix}" for suffix in NIFTI_SUFFIXES] + [
        pred_dir / f"{case_id}{suffix}" for suffix in NIFTI_SUFFIXES
    ]


def _progress(items, enabled: bool):
    from pipeline.progress import progress_bar  # a bar on a terminal only

    return progress_bar(items, enabled=enabled, desc="evaluate", unit="case", leave=False)
