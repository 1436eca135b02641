"""``medseg bench --ensemble``: the ensemble's peak RSS against one model's, in the same run (tiny shapes)."""

from __future__ import annotations

import io

import pytest

from pipeline.benchmarks.ensemble_rss import REDUCED, ensemble_rss, print_ensemble_rss
from tests.helpers import torch_threads

TINY = ["model.features=2", "model.depth=2", "model.deep_supervision=false", "inference.roi_size=[16, 16, 8]",
        "sampling.patch_size=[16, 16, 8]", "preprocess.spacing=[2.0, 2.0, 2.0]"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the child processes
    with torch_threads(1):
        yield


@pytest.mark.slow
def test_ensemble_rss_measures_both_in_one_run(tmp_path):
    lines = []
    results = ensemble_rss(None, tmp_path, ensemble=2, tta="mirror", overrides=TINY, shape=(40, 36, 24),
                           progress=lines.append)
    single, ensemble = results["runs"]["single"][0], results["runs"]["ensemble"][0]
    assert single["forwards"] > 0 and ensemble["forwards"] == single["forwards"]  # one call per window batch
    assert results["peak_rss_gb_single"] > 0.05 and results["peak_rss_gb_ensemble"] > 0.05
    assert results["peak_rss_ratio_ensemble_vs_single"] == pytest.approx(
        results["peak_rss_gb_ensemble"] / results["peak_rss_gb_single"])
    assert results["reduced"] == list(REDUCED) and any("reduced" in line for line in lines)
    out = io.StringIO()
    print_ensemble_rss(results, file=out)
    assert "2 models, tta mirror:" in out.getvalue() and "ratio" in out.getvalue()
    assert "features=4" in out.getvalue()  # the reduction is said
    assert (tmp_path / "models" / "ensemble_1.pt").is_file()
