"""``run_demo``: the whole product on its embedded synthetic default.

synthesize (``synth.kind``: CT, or FLAIR + T1c MR) → train → segment the held-out scans (NIfTI files, and
DICOM series or, for MR, two-series DICOM studies) → evaluate.
Everything lands under ``out_dir``: ``model/`` (checkpoints, log), ``masks/``, ``evaluation/`` and
``summary.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

from pipeline.batch import CaseResult, segment_folder
from pipeline.config import Config
from pipeline.evaluate import CaseMetrics, evaluate_folder
from pipeline.io.atomic import write_json
from pipeline.synth import synthesize, synthesize_mr
from pipeline.training import train

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    summary: dict
    cases: list[CaseMetrics]
    segmented: list[CaseResult]


def run_demo(config: Config, out_dir: Union[str, Path] = "runs/demo", progress: bool = False) -> DemoResult:
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}

    t = time.perf_counter()
    s = config.synth
    write = synthesize_mr if s.kind == "mr" else synthesize
    root = write(config.data.root, cases=s.cases, seed=s.seed, test_fraction=s.test_fraction,
                      dicom_test_cases=s.dicom_test_cases, shape=tuple(s.shape), spacing=tuple(s.spacing))
    timings["synth_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    config = replace(config, train=replace(config.train, out_dir=str(out_dir / "model")))
    trained = train(config, progress=progress)
    timings["train_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    segmented = segment_folder(Path(root) / "imagesTs", out_dir / "masks", trained.best, device=config.inference.device,
                               progress=progress)
    timings["segment_seconds"] = time.perf_counter() - t

    cases, metrics = evaluate_folder(out_dir / "masks", Path(root) / "labelsTs", out_dir / "evaluation")
    summary = {
        **metrics,
        "n_segmented": sum(r.status == "done" for r in segmented),
        "n_failed": sum(r.status == "failed" for r in segmented),
        "best_val_dice": trained.best_metric,
        "checkpoint": str(trained.best),
        **{k: round(v, 1) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(summary, out_dir / "summary.json")
    return DemoResult(summary=summary, cases=cases, segmented=segmented)
