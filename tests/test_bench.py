"""The pieces of ``medseg bench`` (not their timings): measurement helpers, the synthetic CT, the plain-MONAI
baseline, the training-step measurement and a quick run of the whole benchmark on tiny shapes."""

from __future__ import annotations

import json
import math
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.benchmarks import bench
from pipeline.benchmarks.measure import matmul_ceiling, median_time, network_flops, peak_rss_child
from pipeline.benchmarks.synthetic_ct import ct_affine, dicom_series_dir, make_ct
from pipeline.config import load_config
from tests.helpers import torch_threads

TINY = [
    "model.features=4",
    "model.depth=3",
    "inference.roi_size=[32, 32, 16]",
    "inference.overlap=0.25",
    "sampling.patch_size=[16, 16, 8]",
    "sampling.samples_per_volume=1",
    "synth.shape=[48, 48, 16]",
]
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # Tiny tensors gain nothing from threads; on a busy 2-core machine spinning OpenMP threads cost seconds.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for child processes
    with torch_threads(1):
        yield


# --- measurement helpers -------------------------------------------------------------------------


def test_network_flops_of_a_conv3d():
    conv = torch.nn.Conv3d(2, 4, kernel_size=3, padding=1)
    assert network_flops(conv, (2, 8, 8, 6), batch=3) == 2 * 2 * 4 * 27 * (8 * 8 * 6) * 3


def test_median_time_calls_warmup_then_repeats():
    calls = []
    median, runs = median_time(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(runs) == 3
    assert median == sorted(runs)[1]


def test_matmul_ceiling_is_a_positive_rate():
    gflops = matmul_ceiling(threads=1, sizes=(64, 128), repeats=1)
    assert math.isfinite(gflops) and gflops > 0


def test_peak_rss_child_reports_the_child_not_the_parent():
    parent_ballast = np.ones(400 * MB // 8)  # resident here; must not leak into the child's figure
    code = "import numpy as np; a = np.ones(200 * 2**20 // 8); print('allocated', a.nbytes)"
    peak, returncode, output = peak_rss_child([sys.executable, "-c", code])
    assert returncode == 0 and "allocated" in output
    assert 200 * MB <= peak < 380 * MB
    assert parent_ballast.sum() > 0


def test_peak_rss_child_returns_the_exit_code():
    _, returncode, output = peak_rss_child([sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"])
    assert returncode == 3 and "bye" in output


# --- synthetic CT ----------------------------------------------------------------------------------


def test_synthetic_ct_geometry_and_cache(tmp_path):
    path = make_ct(tmp_path, (40, 36, 20), (0.8, 0.7, 1.0), seed=1)
    image = nib.load(str(path))
    assert image.shape == (40, 36, 20)
    assert np.allclose(image.header.get_zooms(), (0.8, 0.7, 1.0))
    assert np.allclose(image.affine, ct_affine((40, 36, 20), (0.8, 0.7, 1.0)))
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    assert image.get_data_dtype() == np.int16
    data = np.asarray(image.dataobj)
    body = (data > -500).mean()
    assert data.min() <= -990 and 0.3 < body < 0.7

    mtime = path.stat().st_mtime_ns
    assert make_ct(tmp_path, (40, 36, 20), (0.8, 0.7, 1.0), seed=1) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    again = np.asarray(nib.load(str(make_ct(tmp_path, (40, 36, 20), (0.8, 0.7, 1.5), seed=1))).dataobj)
    assert np.allclose(nib.load(str(path)).header.get_zooms(), (0.8, 0.7, 1.5))  # new spacing: rewritten
    assert again.shape == data.shape


def test_synthetic_ct_is_deterministic_and_writes_dicom(tmp_path):
    import SimpleITK as sitk

    a = make_ct(tmp_path / "a", (32, 32, 12), (0.8, 0.8, 1.0), seed=3, dicom=True)
    b = make_ct(tmp_path / "b", (32, 32, 12), (0.8, 0.8, 1.0), seed=3)
    assert np.array_equal(np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj))
    series = dicom_series_dir(a)
    assert len(list(series.iterdir())) == 12
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    volume = reader.Execute()
    assert volume.GetSize() == (32, 32, 12)
    assert np.allclose(volume.GetSpacing(), (0.8, 0.8, 1.0))
    # LPS storage with identity cosines: the DICOM pixel array is the NIfTI volume, transposed [k, j, i].
    assert np.array_equal(sitk.GetArrayFromImage(volume).transpose(2, 1, 0), np.asarray(nib.load(str(a)).dataobj))


# --- baseline, models, training --------------------------------------------------------------------


@pytest.fixture
def tiny_setup(tmp_path):
    config = load_config("configs/demo.yaml", TINY)
    image = make_ct(tmp_path / "cases", (64, 64, 32), (0.8, 0.8, 1.0))
    models = bench.build_bench_models(tmp_path / "models", config, calibrate_on=image)
    return config, image, models


def test_bench_models_are_calibrated_and_cached(tiny_setup, tmp_path):
    from pipeline.model.checkpoint import load_checkpoint

    config, image, models = tiny_setup
    assert set(models) == {2, 8}
    two, eight = load_checkpoint(models[2]), load_checkpoint(models[8])
    assert two.config.num_classes == 2 and eight.config.num_classes == 8
    assert two.config.inference.min_component_mm3 == 0
    mtime = models[2].stat().st_mtime_ns
    assert bench.build_bench_models(tmp_path / "models", config, calibrate_on=image) == models
    assert models[2].stat().st_mtime_ns == mtime


def test_monai_baseline_writes_a_mask_on_the_source_grid(tiny_setup, tmp_path):
    _, image, models = tiny_setup
    result = bench.monai_baseline(models[2], None, image, tmp_path / "out")
    source = nib.load(str(image))
    assert result["mask"].shape == source.shape and result["mask"].dtype == np.uint8
    written = nib.load(result["mask_path"])
    assert written.shape == source.shape
    assert np.allclose(written.affine, source.affine, atol=1e-4)
    assert np.array_equal(np.asarray(written.dataobj), result["mask"])
    assert 0 < result["mask"].mean() < 0.05  # calibrated: a small foreground, not ~40 %
    assert result["forwards"] > 0 and result["batch"] == 1
    assert all(result[stage] >= 0 for stage in (*bench.STAGES, "total"))


def test_monai_baseline_accepts_a_network(tiny_setup, tmp_path):
    from pipeline.model import build_model

    config, image, _ = tiny_setup
    network = build_model(config.model, in_channels=1, out_channels=2)
    result = bench.monai_baseline(network, config, image, tmp_path / "out")
    assert result["mask"].shape == nib.load(str(image)).shape


def test_mask_dice(tmp_path):
    affine = np.eye(4)
    a = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1
    b = np.zeros_like(a)
    b[1:3] = 1
    nib.save(nib.Nifti1Image(a, affine), str(tmp_path / "a.nii.gz"))
    nib.save(nib.Nifti1Image(b, affine), str(tmp_path / "b.nii.gz"))
    result = bench.mask_dice(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    assert result["dice"] == pytest.approx(0.5)
    assert result["agreement"] == pytest.approx(0.5)


def test_train_step_benchmark(tmp_path):
    config = load_config("configs/demo.yaml", TINY)
    result = bench.train_step_benchmark(config, tmp_path / "data", steps=2, cases=3)
    assert result["steps"] == 2 and len(result["runs"]) == 2
    assert 0 <= result["data_wait_fraction"] <= 1
    assert result["step_seconds"] > 0
    assert result["batch_shape"][2:] == [16, 16, 8]


# --- the whole benchmark, quick ---------------------------------------------------------------------


def placeholder_segment(checkpoint, image, out_dir) -> dict:
    """Stands in for the segment path: the baseline's work, with the stage keys the contract asks for."""
    result = bench.monai_baseline(checkpoint, None, image, out_dir)
    result.pop("mask")
    return result


def test_run_bench_quick_has_every_key(tmp_path):
    lines = []
    results = bench.run_bench("configs/demo.yaml", tmp_path / "work", repeats=1, quick=True,
                              segment_fn=placeholder_segment, overrides=TINY, small_shape=(64, 64, 32),
                              train_steps=1, train_cases=3, progress=lines.append)
    for key in bench.REQUIRED_KEYS:
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
    assert results["peak_rss_gb_512x512x400"] > 0.05
    assert results["segment"]["dice"]["dice"] == pytest.approx(1.0)  # the placeholder does the same work
    assert results["cases"]["large"]["shape"] == [64, 64, 32]
    assert lines

    out = tmp_path / "table.txt"
    with open(out, "w") as handle:
        bench.print_table(results, file=handle)
    assert "speedup" in out.read_text()
    saved = json.loads(bench.save_results(results, tmp_path / "bench.json").read_text())
    assert set(bench.REQUIRED_KEYS) <= set(saved)


# --- training throughput changes (pipeline.training.data / trainer) ---------------------------------


def test_cached_crop_indices_draw_the_same_patches():
    from monai.transforms import Compose

    from pipeline.training.data import CropIndicesd, with_cached_crop_indices
    from pipeline.transforms.sampling import sampling_transforms

    cfg = load_config(None, ["sampling.patch_size=[8, 8, 4]", "sampling.samples_per_volume=3"]).sampling
    label = torch.zeros(1, 30, 28, 12)
    label[0, 20:24, 5:9, 6:8] = 1
    data = {"image": torch.rand(1, 30, 28, 12, generator=torch.Generator().manual_seed(0)), "label": label}
    plain = Compose(sampling_transforms(cfg, spatial_dims=3)).set_random_state(seed=1)
    steps = with_cached_crop_indices(sampling_transforms(cfg, spatial_dims=3))
    assert any(isinstance(s, CropIndicesd) for s in steps)
    cached = Compose(steps).set_random_state(seed=1)
    for _ in range(4):
        for a, b in zip(plain(data), cached(data)):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
            assert "label_fg_indices" not in b


def test_prefetch_depth_only_where_it_is_free(monkeypatch):
    import pipeline.training.trainer as trainer

    monkeypatch.setattr(trainer.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with torch_threads(2):
        assert trainer.prefetch_depth(torch.device("cpu"), num_workers=0) == 0  # every core busy with torch
        assert trainer.prefetch_depth(torch.device("cuda"), num_workers=0) == trainer.PREFETCH_BATCHES
        assert trainer.prefetch_depth(torch.device("cuda"), num_workers=2) == 0  # workers prefetch already
    with torch_threads(1):
        assert trainer.prefetch_depth(torch.device("cpu"), num_workers=0) == trainer.PREFETCH_BATCHES


def test_loader_workers_are_persistent(tmp_path):
    from pipeline.synth import synthesize
    from pipeline.training.data import train_loader, training_cases

    root = synthesize(tmp_path / "data", cases=3, test_fraction=0.0, dicom_test_cases=0, shape=(32, 32, 12))
    cfg = load_config("configs/demo.yaml", TINY + [f"data.root={root}", "train.num_workers=1",
                                                     "sampling.batch_size=1"])
    loader = train_loader(training_cases(root), cfg)
    assert loader.persistent_workers and loader.prefetch_factor == 2
    first = [b["image"] for b in loader]
    iterator = loader._iterator
    second = [b["image"] for b in loader]
    assert loader._iterator is iterator  # the same workers for the second pass
    assert len(first) == len(second) == 3
