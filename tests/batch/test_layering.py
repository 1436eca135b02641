"""The batch service sits above inference: ``pipeline.infer`` never imports ``pipeline.batch``, and the
older names ``pipeline.infer.segment_folder`` / ``CaseResult`` / ``exit_code`` still reach it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_infer_does_not_import_the_batch_service():
    code = "import sys, pipeline.infer; print(sorted(m for m in sys.modules if m.startswith('pipeline.batch')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_older_names_in_infer_are_the_batch_service_s():
    import pipeline
    import pipeline.batch
    import pipeline.infer

    for name in ("segment_folder", "CaseResult", "exit_code", "summarise", "MASK_SUFFIX"):
        assert getattr(pipeline.infer, name) is getattr(pipeline.batch, name)
    assert pipeline.segment_folder is pipeline.batch.segment_folder
    assert pipeline.rebuild_reports is pipeline.batch.rebuild_reports
