"""``medseg bench --rss-vs-n``: peak RSS and time of segment against the number of slices (tiny shapes),
and the growth of a child's peak RSS with the volume staying under a generous bound."""

from __future__ import annotations

import io

import nibabel as nib
import pytest

from pipeline.benchmarks.rss_vs_n import STAGES, StagePeaks, fit_line, print_rss_vs_n, rss_vs_n
from pipeline.errors import InputError
from tests.helpers import tiny_checkpoint, torch_threads


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the child processes
    with torch_threads(1):
        yield


def test_fit_line_known_answer():
    slope, intercept = fit_line([200, 400, 800], [3.0 * 200 + 5, 3.0 * 400 + 5, 3.0 * 800 + 5])
    assert slope == pytest.approx(3.0) and intercept == pytest.approx(5.0)
    slope, _ = fit_line([1, 2, 3], [1, 3, 2])  # least squares, not the end points
    assert slope == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two or more"):
        fit_line([1], [1])


def test_stage_peaks_see_a_stage_allocation():
    import numpy as np

    peaks = StagePeaks()
    peaks.start()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    peaks.end("big")
    del block
    peaks.start()
    peaks.end("small")
    assert peaks.peaks["big"] >= 64 << 20
    if peaks.resettable:  # the reset works: the later stage does not carry the earlier peak
        assert peaks.peaks["small"] < peaks.peaks["big"] - (32 << 20)


def test_missing_model_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        rss_vs_n(tmp_path, tmp_path / "nope.pt")


def quiet_checkpoint(path):
    """A tiny U-Net at the demo's spacing rules whose background bias labels (almost) nothing, as a trained
    model on a scan with few lesions (a random one labels ~half the volume: the lesion statistics of
    thousands of islands would be measured, not the engine)."""
    import torch

    from pipeline.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    tiny_checkpoint(path, "preprocess.spacing=[1.6, 1.6, 2.5]", "preprocess.crop_foreground=true",
                    "inference.roi_size=[32, 32, 16]", "sampling.patch_size=[32, 32, 16]", "inference.backend=torch")
    ckpt = load_checkpoint(path)
    state = dict(ckpt.state_dict)
    last_bias = [k for k, v in state.items() if k.endswith("bias") and tuple(v.shape) == (2,)][-1]
    state[last_bias] = torch.tensor([12.0, -12.0])
    return save_checkpoint(path, Checkpoint(config=ckpt.config, state_dict=state))


@pytest.mark.slow
def test_rss_vs_n_small_volumes_growth_under_bound(tmp_path):
    """Two volumes (384x384x112 and x224: 16.5 M voxels apart; one slab of the source-grid resampling or more in both) at the demo's spacing rules, each in a child:
    the fitted growth stays under 10 bytes per source voxel (the old path needed ~14; the target is 6),
    every stage has its peak, and the masks are written in the sources' shapes."""
    model = quiet_checkpoint(tmp_path / "tiny.pt")
    lines = []
    results = rss_vs_n(tmp_path / "work", model, slices=(112, 224), in_plane=(384, 384), progress=lines.append)
    rows = results["rows"]
    assert [r["slices"] for r in rows] == [112, 224] and rows[1]["voxels"] == 384 * 384 * 224
    for row in rows:
        assert set(row["stage_peak_rss_bytes"]) == {"setup", *STAGES}
        assert row["peak_rss_bytes"] >= max(row["stage_peak_rss_bytes"].values())
        assert row["cpu_seconds"] > 0 and row["wall_seconds"] >= row["segment_seconds"]
        mask = nib.load(row["runs"][0]["mask_path"])
        assert mask.shape == tuple(row["shape"])
    assert 0 < results["rss_bytes_per_source_voxel"] < 10.0, results["rss_bytes_per_source_voxel"]
    assert results["time_ratio_800_vs_400"] is None  # no 400/800 pair here
    out = io.StringIO()
    print_rss_vs_n(results, file=out)
    assert "bytes per source voxel" in out.getvalue() and "  224 " in out.getvalue()
