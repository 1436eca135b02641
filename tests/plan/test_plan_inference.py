"""The ``inference_budget`` rule with a fake window timer whose answers are known: the window count is
MONAI's, the estimate is windows x seconds per window, an over-budget plan steps down features -> depth ->
spacing (at most 2x the median spacing), a plan within budget is unchanged; and one real, quick window
measurement and ``medseg plan`` writing the estimate and the reasons."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.plan import rules

NET = {"patch_size": [64, 64, 32], "depth": 4, "features": 32}
SHAPES = [[100, 100, 40], [120, 120, 40], [100, 100, 50]]  # median [100, 100, 40] at the target
SPACINGS = [[1.0, 1.0, 2.5]] * 3
TARGET = [1.0, 1.0, 2.5]


def fake_timer(per_feature: float = 0.01, per_level: float = 0.1):
    """Seconds per window grow with the features and the depth (a known, deterministic answer)."""
    calls = []

    def seconds(net):
        calls.append((net["features"], net["depth"], tuple(net["patch_size"])))
        voxels = math.prod(net["patch_size"]) / (64 * 64 * 32)
        return voxels * (per_feature * net["features"] + per_level * net["depth"])

    seconds.calls = calls
    return seconds


def monai_windows(shape, roi, overlap):
    """The windows MONAI's own sliding_window_inference runs: counted by calling it."""
    from monai.inferers import sliding_window_inference

    count = [0]

    def predictor(x):
        count[0] += x.shape[0]
        return torch.zeros((x.shape[0], 1, *x.shape[2:]))

    sliding_window_inference(torch.zeros((1, 1, *shape)), list(roi), 1, predictor, overlap=overlap)
    return count[0]


@pytest.mark.parametrize("shape, roi, overlap", [
    ((160, 160, 48), (104, 104, 24), 0.25),  # the demo's planned net at its median shape: 2 x 2 x 3
    ((100, 100, 40), (64, 64, 32), 0.5),
    ((50, 70, 20), (64, 64, 32), 0.25),  # smaller than the window: padded, one window on those axes
    ((97, 33, 61), (32, 16, 16), 0.6),
])
def test_window_count_is_monais(shape, roi, overlap):
    assert rules.window_count(shape, roi, overlap) == monai_windows(shape, roi, overlap)


def test_window_count_of_the_demo_and_the_bench_ct():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    assert rules.window_count([160, 160, 48], [104, 104, 24], 0.25) == 12
    grid, roi = (512, 512, 160), (104, 104, 24)  # 512x512x400 at 0.8/0.8/1.0 mm, resampled to 0.8/0.8/2.5
    interval = _get_scan_interval(grid, roi, 3, (0.25,) * 3)
    assert rules.window_count(grid, roi, 0.25) == len(dense_patch_slices(grid, roi, interval)) == 7 * 7 * 9


def test_window_count_2d_counts_every_slice():
    # 2D windows [64, 64] at overlap 0.5 (step 32) over (100, 100, 40): 3 x 3 per slice, 40 slices
    assert rules.window_count([100, 100, 40], [64, 64], 0.5) == 3 * 3 * 40


def test_within_budget_the_plan_is_unchanged_and_the_estimate_is_windows_times_seconds():
    timer = fake_timer()
    value, reason = rules.inference_budget(NET, TARGET, TARGET, SHAPES, SPACINGS, 0.25, 30.0, timer)
    per_window = 0.01 * 32 + 0.1 * 4  # 0.72 s
    windows = rules.window_count([100, 100, 40], [64, 64, 32], 0.25)
    assert windows == 2 * 2 * 2
    assert value["changed"] == [] and value["fits"] and len(value["tried"]) == 1
    assert value["net"] == NET and value["spacing"] == TARGET
    est = value["estimate"]
    assert est["windows"] == windows and est["seconds_per_window"] == pytest.approx(per_window)
    assert est["estimated_seconds"] == pytest.approx(windows * per_window)
    # the bench CT: 512x512x400 at 0.8/0.8/1.0 -> (410, 410, 160) at the target
    assert est["ct_grid"] == [410, 410, 160]
    assert est["ct_windows"] == rules.window_count([410, 410, 160], [64, 64, 32], 0.25) == 9 * 9 * 7  # steps 48 / 24
    assert est["ct_estimated_seconds"] == pytest.approx(9 * 9 * 7 * per_window, abs=0.01)
    assert reason.startswith("inference fits 30 s as planned")
    assert timer.calls == [(32, 4, (64, 64, 32))]


def test_over_budget_steps_down_features_then_depth_then_spacing():
    timer = fake_timer()
    # 8 windows: features 32 -> 5.76 s, 16 -> 4.48, 8 -> 3.84; depth 3 -> 3.04; then the spacing coarsens
    value, reason = rules.inference_budget(NET, TARGET, TARGET, SHAPES, SPACINGS, 0.25, 1.0, timer)
    steps = [row["step"] for row in value["tried"]]
    assert steps == ["as planned", "halved the features", "halved the features", "dropped a level",
                     "coarsened the spacing 1.25x", "coarsened the spacing 1.5x", "coarsened the spacing 1.75x"]
    assert [(row["features"], row["depth"]) for row in value["tried"]] == [
        (32, 4), (16, 4), (8, 4), (8, 3), (8, 3), (8, 3), (8, 3)]
    assert [row["spacing"] for row in value["tried"][-3:]] == [[1.25, 1.25, 3.125], [1.5, 1.5, 3.75],
                                                               [1.75, 1.75, 4.375]]
    assert [row["windows"] for row in value["tried"]] == [8, 8, 8, 8, 4, 4, 1]
    assert [row["estimated_seconds"] for row in value["tried"][:4]] == [5.76, 4.48, 3.84, 3.04]
    chosen = value["tried"][-1]
    # 1.75x coarser: median (57, 57, 23) -> the patch within it, rounded up to multiples of 4: one window
    assert chosen["median_shape"] == [57, 57, 23] and chosen["patch_size"] == [60, 60, 24]
    ratio = 60 * 60 * 24 / (64 * 64 * 32)
    assert chosen["estimated_seconds"] == pytest.approx(ratio * (0.08 + 0.3), abs=0.01)
    assert chosen["estimated_seconds"] <= 1.0
    assert value["fits"] and value["net"] == {"patch_size": [60, 60, 24], "depth": 3, "features": 8}
    assert value["spacing"] == [1.75, 1.75, 4.375]
    assert value["changed"] == ["model.features", "model.depth", "sampling.patch_size", "preprocess.spacing",
                                "inference.roi_size"]
    assert "features 32 -> 8" in reason and "depth 4 -> 3" in reason and "spacing [1.0, 1.0, 2.5] -> " in reason


def test_cannot_fit_keeps_the_fastest_within_2x_the_median_spacing_and_says_so():
    value, reason = rules.inference_budget(NET, TARGET, TARGET, SHAPES, SPACINGS, 0.25, 0.01, fake_timer())
    assert not value["fits"] and "DOES NOT FIT" in reason
    assert value["tried"][-1]["step"] == "coarsened the spacing 2x"
    assert value["spacing"] == [2.0, 2.0, 5.0]  # never coarser than 2x the median
    assert value["estimate"]["estimated_seconds"] == min(row["estimated_seconds"] for row in value["tried"])
    assert all(s <= 2 * m for row in value["tried"] for s, m in zip(row["spacing"], TARGET))


def test_the_spacing_bound_is_the_median_not_the_target():
    # 2x the target [1, 1, 3] would be [2, 2, 6]; the in-plane axes stop at 2x their median 0.8 mm
    value, _ = rules.inference_budget({**NET, "features": 8, "depth": 3}, [1.0, 1.0, 3.0], [0.8, 0.8, 5.0],
                                      SHAPES, SPACINGS, 0.25, 1e-6, fake_timer())
    assert [row["spacing"] for row in value["tried"][1:]] == [[1.25, 1.25, 3.75], [1.5, 1.5, 4.5],
                                                              [1.6, 1.6, 5.25], [1.6, 1.6, 6.0]]


def test_the_crop_to_the_body_shrinks_the_grid_segment_runs_over():
    # 70% in-plane, all the slices: (100, 100, 40) -> (70 + 8, 70 + 8, 40) with a 4-voxel margin, 2 x 2 x 2 windows
    value, _ = rules.inference_budget(NET, TARGET, TARGET, SHAPES, SPACINGS, 0.25, None, fake_timer(),
                                      body_fraction=[0.7, 0.7, 1.0], crop_margin=4)
    est = value["estimate"]
    assert est["median_shape"] == [100, 100, 40] and est["segment_shape"] == [78, 78, 40]
    assert est["windows"] == rules.window_count([78, 78, 40], [64, 64, 32], 0.25) == 8
    value, _ = rules.inference_budget(NET, TARGET, TARGET, SHAPES, SPACINGS, 0.25, None, fake_timer(),
                                      body_fraction=[0.5, 0.5, 1.0], crop_margin=4)
    assert value["estimate"]["segment_shape"] == [58, 58, 40]  # 58 rounds up to 64 at depth 4: 1 x 1 x 2
    assert value["estimate"]["patch_size"] == [64, 64, 32] and value["estimate"]["windows"] == 2


def test_body_fraction_is_what_preprocessing_crops(tmp_path):
    """One synthetic CT case through the planned preprocessing: the fraction gives back its cropped grid."""
    from pipeline.plan.fingerprint import dataset_fingerprint
    from pipeline.plan.inference import body_fraction
    from pipeline.synth import synthesize

    root = synthesize(tmp_path / "ct", cases=2, dicom_test_cases=0, shape=(48, 48, 16))
    fp = dataset_fingerprint(root)
    norms, _ = rules.normalization(fp["channels"], fp["intensity"])
    target = [0.8, 0.8, 2.5]
    fraction = body_fraction(root, fp["cases"][:1], fp["channels"], norms, target, count=1)
    assert len(fraction) == 3 and all(0 < f <= 1 for f in fraction) and min(fraction) < 1  # air is cropped
    from pipeline.config import ChannelNormConfig, IntensityConfig, PreprocessConfig
    from pipeline.dataset.layout import read_dataset
    from pipeline.training.dataset_config import dataset_items
    from pipeline.transforms.preprocess import preprocess_transforms

    cfg = PreprocessConfig(spacing=target, intensity=IntensityConfig(
        mode="auto", channels=[ChannelNormConfig(**n) for n in norms]), crop_margin=4)
    item = next(i for i in dataset_items(read_dataset(root)) if i["case_id"] == fp["cases"][0]["case_id"])
    cropped = list(preprocess_transforms(cfg, channels=fp["channels"])({"image": item["image"]})["image"].shape[1:])
    full = fp["cases"][0]["shape"]  # already at 0.8 x 0.8 x 2.5
    assert [min(n, round(n * f) + 8) for n, f in zip(full, fraction)] == cropped


def test_no_budget_only_estimates():
    value, reason = rules.inference_budget(NET, TARGET, TARGET, SHAPES, SPACINGS, 0.25, None, fake_timer())
    assert value["changed"] == [] and value["fits"] and reason.startswith("inference not budgeted")


def test_measure_window_runs_the_fused_forward():
    from pipeline.plan.inference import measure_window, window_timer

    seconds = measure_window([16, 16, 16], 4, 2, 1, 2, repeats=2)
    assert 0 < seconds < 5
    timer = window_timer(1, 2)
    net = {"patch_size": [16, 16, 16], "features": 4, "depth": 2}
    first = timer(net)
    assert timer(net) == first and len(timer.measured) == 1  # each network measured once
    assert timer.threads == torch.get_num_threads()
    assert 0 < timer.cpu(net) < 5 * max(first, 0.01) * timer.threads  # the same calls' CPU time


def test_plan_writes_the_estimate_and_the_reasons(tmp_path, monkeypatch):
    """``medseg plan --device cpu --infer-seconds``: the fake timer makes the planned net too slow, so the
    features step down; the reasons are beside the keys and the figures in fingerprint.json."""
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.plan import inference, timing
    from pipeline.synth import synthesize

    root = synthesize(tmp_path / "ct", cases=4, dicom_test_cases=0, shape=(48, 48, 16))
    monkeypatch.setattr(timing, "measure_step", lambda patch, features, *a, **k: 0.001 * features)
    monkeypatch.setattr(inference, "window_timer", lambda *a, **k: _timer_attrs(fake_timer(per_feature=0.5)))
    out = tmp_path / "plan"
    assert main(["-q", "plan", str(root), "--out", str(out), "--infer-seconds", "2"]) == 0
    config = load_config(out / "plans.yaml")
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    est = fingerprint["inference_estimate"]
    assert est["budget_seconds"] == 2 and est["fits"] and est["threads"] == 1
    assert len(est["body_fraction"]) == 3 and all(s <= m for s, m in zip(est["segment_shape"], est["median_shape"]))
    assert est["features"] == config.model.features < est["tried"][0]["features"]
    assert est["estimated_seconds"] == pytest.approx(est["windows"] * est["seconds_per_window"], abs=0.01)
    text = (out / "plans.yaml").read_text()
    features_line = next(line for line in text.splitlines() if line.strip().startswith("features:"))
    assert "inference budget 2 s" in features_line and "features 32 -> " in features_line
    # the training step was re-timed for the smaller network and the schedule refilled
    epochs_line = next(line for line in text.splitlines() if line.strip().startswith("epochs:"))
    assert "re-timed after the inference budget" in epochs_line


def _timer_attrs(timer):
    timer.threads, timer.measured = 1, {}
    return timer


def test_cuda_plans_no_inference_budget_by_default_and_refuses_one_without_a_gpu(tmp_path, monkeypatch):
    import pipeline.plan as plan
    from pipeline.errors import ConfigError
    from pipeline.synth import synthesize

    root = synthesize(tmp_path / "ct", cases=3, dicom_test_cases=0, shape=(32, 32, 16))
    result = plan.plan_dataset(root, tmp_path / "plan", device="cuda", memory_gb=8)
    assert result.inference_estimate is None
    assert "inference_estimate" not in json.loads(result.fingerprint.read_text())
    monkeypatch.setattr(plan, "_cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="--infer-seconds on --device cuda"):
        plan.plan_dataset(root, tmp_path / "plan2", device="cuda", infer_seconds=5)
    with pytest.raises(ConfigError, match="expected seconds >= 0"):
        plan.plan_dataset(root, tmp_path / "plan3", device="cpu", infer_seconds=-1)
