"""ONNX Runtime backend: numerical agreement with torch, the export cache, and the backend choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from scipy.ndimage import gaussian_filter

pytest.importorskip("onnxruntime")

from pipeline.errors import ConfigError  # noqa: E402
from pipeline.infer import backend  # noqa: E402
from pipeline.infer.backend import OnnxRunner, cache_dir, onnx_path, select_backend  # noqa: E402
from pipeline.model import UNet  # noqa: E402

SHA = "0123456789abcdef" * 4
OTHER_SHA = "fedcba9876543210" * 4
ROI3D = (32, 32, 16)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_unet(spatial_dims=3, seed=0, **kwargs) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims, 1, 2, features=4, depth=3, **kwargs).eval()


def torch_logits(net, x):
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize(
    "spatial_dims, kwargs, window",
    [
        (3, {}, ROI3D),
        (2, {}, (32, 32)),
        (3, {"deep_supervision": True}, ROI3D),
        (3, {"padding": "valid", "upsample": "interp"}, (44, 44, 44)),
    ],
    ids=["3d", "2d", "deep-supervision", "valid-padding"],
)
def test_runner_matches_torch(spatial_dims, kwargs, window):
    net = tiny_unet(spatial_dims, **kwargs)
    runner = OnnxRunner(net, SHA, (1, *window), threads=1)
    for batch in (1, 3):  # the batch axis is dynamic (exported with 2)
        x = torch.randn(batch, 1, *window)
        y = runner(x)
        expected = torch_logits(net, x)
        assert y.dtype == torch.float32
        assert y.shape == expected.shape
        assert torch.allclose(y, expected, atol=1e-4), (y - expected).abs().max()


def test_export_leaves_the_callers_module_untouched():
    net = tiny_unet(deep_supervision=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    OnnxRunner(net, SHA, (1, *ROI3D), threads=1)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def smooth_volume(shape=(48, 48, 24), seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    volume = gaussian_filter(rng.normal(size=shape), sigma=3)
    volume = (volume - volume.mean()) / volume.std()
    return torch.from_numpy(volume.astype(np.float32))[None, None]


def sliding(predictor, image):
    with torch.no_grad():
        return sliding_window_inference(image, roi_size=ROI3D, sw_batch_size=2, predictor=predictor,
                                        overlap=0.25, mode="gaussian")


def test_sliding_window_masks_agree():
    net = tiny_unet()
    image = smooth_volume()
    # Move the foreground logit so that about half of the voxels are foreground (blending is linear).
    logits = sliding(net, image)
    with torch.no_grad():
        net.head.bias[1] -= torch.median(logits[0, 1] - logits[0, 0])
    expected = sliding(net, image).argmax(1)
    fraction = expected.float().mean().item()
    assert 0.05 < fraction < 0.95, fraction

    runner = OnnxRunner(net, SHA, (1, *ROI3D))
    got = sliding(runner, image).argmax(1)
    a, b = expected.bool(), got.bool()
    dice = 2 * (a & b).sum().item() / (a.sum().item() + b.sum().item())
    assert dice >= 0.999, dice


def test_export_is_cached_and_reused():
    net = tiny_unet()
    first = OnnxRunner(net, SHA, (1, *ROI3D), threads=1)
    assert first.exported and first.path.is_file()
    assert first.path == onnx_path(SHA, (1, *ROI3D))
    assert first.path.parent.parent == cache_dir()
    inode = first.path.stat().st_ino  # an export again would replace the file (a new inode)

    second = OnnxRunner(net, SHA, (1, *ROI3D), threads=1)
    assert not second.exported
    assert second.path == first.path and second.path.stat().st_ino == inode
    assert list(first.path.parent.iterdir()) == [first.path]  # no temporary files left

    other = OnnxRunner(net, OTHER_SHA, (1, *ROI3D), threads=1)
    assert other.exported and other.path != first.path


def test_corrupt_cache_file_is_exported_again():
    net = tiny_unet()
    path = OnnxRunner(net, SHA, (1, *ROI3D), threads=1).path
    path.write_bytes(b"this is not an onnx model")

    runner = OnnxRunner(net, SHA, (1, *ROI3D), threads=1)
    assert runner.exported
    x = torch.randn(2, 1, *ROI3D)
    assert torch.allclose(runner(x), torch_logits(net, x), atol=1e-4)


def test_runner_rejects_other_window_shapes():
    runner = OnnxRunner(tiny_unet(), SHA, (1, *ROI3D), threads=1)
    with pytest.raises(ConfigError, match="expected windows of shape"):
        runner(torch.randn(1, 1, 32, 32, 32))


def test_cache_dir_locations(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache" and cache_dir().is_dir()
    monkeypatch.delenv("MEDSEG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "medseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "medseg"


def test_onnx_path_needs_a_checkpoint_sha():
    with pytest.raises(ConfigError, match="sha256"):
        onnx_path("", (1, *ROI3D))
    name = onnx_path(SHA.upper(), (1, *ROI3D)).name
    assert name.startswith(f"{SHA[:16]}-1x32x32x16-op17-") and name.endswith(".onnx")


# ---- select_backend ----------------------------------------------------------------------------------


def test_explicit_backends_pass_through():
    net = tiny_unet()
    assert select_backend("torch", net, torch.device("cpu"), "", (1, *ROI3D), 2) == "torch"
    assert select_backend("torch", net, torch.device("cuda"), SHA, (1, *ROI3D), 2) == "torch"
    assert select_backend("onnxruntime", net, torch.device("cpu"), SHA, (1, *ROI3D), 2) == "onnxruntime"


def test_onnxruntime_needs_cpu_sha_and_the_package(monkeypatch):
    net = tiny_unet()
    with pytest.raises(ConfigError, match="CPU"):
        select_backend("onnxruntime", net, torch.device("cuda"), SHA, (1, *ROI3D), 2)
    with pytest.raises(ConfigError, match="sha256"):
        select_backend("onnxruntime", net, torch.device("cpu"), "", (1, *ROI3D), 2)
    monkeypatch.setattr(backend, "onnxruntime_available", lambda: False)
    with pytest.raises(ConfigError, match="not installed"):
        select_backend("onnxruntime", net, torch.device("cpu"), SHA, (1, *ROI3D), 2)
    assert select_backend("auto", net, torch.device("cpu"), SHA, (1, *ROI3D), 2) == "torch"


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="expected one of 'auto', 'torch', 'onnxruntime', 'openvino'"):
        select_backend("tensorrt", tiny_unet(), torch.device("cpu"), SHA, (1, *ROI3D), 2)


def test_auto_without_sha_or_on_gpu_is_torch(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("must not time anything")

    monkeypatch.setattr(backend, "_time_forward", no_timing)
    net = tiny_unet()
    assert select_backend("auto", net, torch.device("cpu"), "", (1, *ROI3D), 2) == "torch"
    assert select_backend("auto", net, torch.device("cuda:0"), SHA, (1, *ROI3D), 2) == "torch"


def test_auto_measures_once_and_caches_the_choice(monkeypatch, cache):
    net = tiny_unet()
    timed = []
    real = backend._time_forward

    def spy(forward, x, *args, **kwargs):
        timed.append(forward)
        assert x.shape == (2, 1, *ROI3D)
        return real(forward, x, *args, **kwargs)

    monkeypatch.setattr(backend, "_time_forward", spy)
    calls = []

    def torch_forward(x):
        calls.append(x.shape)
        return net(x)

    choice = select_backend("auto", net, torch.device("cpu"), SHA, (1, *ROI3D), 2,
                            torch_forward=torch_forward)
    fp32 = {"torch", "onnxruntime", "openvino"}
    assert choice in fp32
    # every fp32 candidate agrees with torch here and is timed once (openvino: where it is installed)
    assert len(timed) in (2, 3) and timed[0] is torch_forward and isinstance(timed[1], OnnxRunner)
    # the agreement run on the (seeded) timing batch, one warm-up, then the timed calls
    assert len(calls) == 1 + 1 + backend.TIMING_REPEATS

    files = list((cache / "backend").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["choice"] == choice
    assert set(data["seconds_per_batch"]) <= fp32 and {"torch", "onnxruntime"} <= set(data["seconds_per_batch"])
    # the candidates faster than torch were checked against it, fastest first, until one agreed
    assert all(f["agrees"] and f["dice_min"] >= 0.98 for f in data["agreement"].values())
    assert choice == "torch" or choice in data["agreement"]
    assert data["key"]["batch"] == 2 and data["key"]["input_shape"] == [1, *ROI3D]
    assert data["key"]["torch_threads"] == torch.get_num_threads()
    assert data["key"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert data["key"]["precision"] == "fp32"

    def no_timing(*args, **kwargs):
        raise AssertionError("the cached decision must be reused")

    monkeypatch.setattr(backend, "_time_forward", no_timing)
    assert select_backend("auto", net, torch.device("cpu"), SHA, (1, *ROI3D), 2) == choice

    # Another batch size (or thread count, machine, version) is a different key: measured again.
    with pytest.raises(AssertionError, match="cached decision"):
        select_backend("auto", net, torch.device("cpu"), SHA, (1, *ROI3D), 4)


def test_auto_remeasures_after_a_corrupt_calibration_file(cache):
    net = tiny_unet()
    first = select_backend("auto", net, torch.device("cpu"), SHA, (1, *ROI3D), 1)
    (path,) = (cache / "backend").glob("*.json")
    path.write_text("{not json")
    fp32 = ("torch", "onnxruntime", "openvino")
    assert select_backend("auto", net, torch.device("cpu"), SHA, (1, *ROI3D), 1) in fp32
    assert json.loads(path.read_text())["choice"] in fp32
    assert first in fp32


def test_auto_on_a_full_cache_disk_is_torch_with_a_warning(monkeypatch, cache, caplog):
    """The export cannot be written (ENOSPC, here a stand-in at the atomic write's sync): every case
    would fail on it, so ``auto`` takes torch instead and says why."""
    import errno
    import os

    from pipeline.io import atomic

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "fsync_file", full)
    assert select_backend("auto", tiny_unet(), torch.device("cpu"), SHA, (1, *ROI3D), 1) == "torch"
    assert "ONNX export could not be written to the cache" in caplog.text
    assert "no space left on device while writing" in caplog.text
    assert [p.name for p in cache.rglob("*") if p.is_file()] == []
