"""Writing an evaluation: ``metrics.csv``, ``summary.json`` and PNG plots, each atomically."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

from pipeline.evaluate.case import COLUMNS, CaseMetrics
from pipeline.io.atomic import atomic_path, write_json

log = logging.getLogger(__name__)


def write_report(rows: Sequence[CaseMetrics], summary: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write the table, the summary and (with ``plots``) the PNGs; return the paths written.

    A plot that fails is logged as a warning: the table and summary are already in place.
    """
    out_dir = Path(out_dir)
    written = [write_csv(rows, out_dir / "metrics.csv"), write_json(summary, out_dir / "summary.json")]
    if plots:
        from pipeline.evaluate.plots import write_evaluation_plots

        written += write_evaluation_plots(rows, summary, out_dir)
    return written


def write_csv(rows: Sequence[CaseMetrics], path: Path) -> Path:
    """One row per case and label; NaN written as ``nan``."""
    table = [row.as_row() for row in rows]
    fieldnames = list(table[0]) if table else list(COLUMNS)
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(table)
    return path
