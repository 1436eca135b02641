"""The fast inference path: no float64 tensor anywhere from loading to labels, cropping to the body
before tiling gives the mask the uncropped volume gives, both backends give the same mask, the CPU never
runs batch-1 windows, and what is kept per case does not grow with the number of classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import load_config
from pipeline.infer import Segmenter
from pipeline.model import build_model
from pipeline.model.checkpoint import Checkpoint, save_checkpoint
from tests.conftest import make_affine, save_nifti


def dice(a, b) -> float:
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def ct_scan(tmp_path, orientation="LPS", shape=(56, 48, 20)):
    """A small CT: air around a body of soft tissue with two brighter lesions."""
    rng = np.random.default_rng(0)
    image = np.full(shape, -1000, np.int16)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    body = ((ii - 28) / 20.0) ** 2 + ((jj - 22) / 15.0) ** 2 < 1
    image[body] = rng.integers(0, 60, body.sum())
    image[((ii - 20) ** 2 + (jj - 20) ** 2 + ((kk - 8) * 2) ** 2) < 30] = 150
    image[((ii - 36) ** 2 + (jj - 28) ** 2 + ((kk - 13) * 2) ** 2) < 20] = 170
    return save_nifti(image, make_affine(orientation), tmp_path / "ct.nii.gz")


def config(*extra):
    return load_config(None, ["preprocess.spacing=[1.2, 1.2, 2.5]", "preprocess.intensity.window=[-150, 250]",
                              "model.features=4", "model.depth=3", "inference.roi_size=[32, 32, 8]",
                              "inference.overlap=0.5", "inference.min_component_mm3=0", *extra])


class Threshold(torch.nn.Module):
    """A voxel-wise stand-in: lesion where the windowed intensity is above 0.7 (no context, no windows)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.cat([(0.7 - x) * 30, (x - 0.7) * 30], dim=1)


def random_unet_checkpoint(tmp_path, cfg, source, classes=2, seed=0):
    """A random U-Net whose lesion bias is set so that about half of the body is lesion: a hard mask."""
    torch.manual_seed(seed)
    net = build_model(cfg.model, in_channels=1, out_channels=classes).eval()
    segmenter = Segmenter(net, cfg, "cpu", backend="torch")
    probs = segmenter.probabilities(segmenter.load(str(source)).image)
    median = float(probs[1].median().clamp(1e-4, 1 - 1e-4))
    with torch.no_grad():
        net.head.bias[1] -= float(np.log(median / (1 - median)))
    path = tmp_path / f"model{classes}.pt"
    save_checkpoint(path, Checkpoint(state_dict=net.state_dict(), config=cfg, epoch=0))
    return path


class Float64Spy(TorchDispatchMode):
    """Records every op that makes a float64 tensor larger than an affine matrix."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() > 16:
                self.seen.append(f"{func} -> {tuple(t.shape)}")
        return out


def test_no_float64_tensor_in_the_inference_path(tmp_path):
    segmenter = Segmenter(build_model(config().model, 1, 2), config(), "cpu")
    source = ct_scan(tmp_path)
    with Float64Spy() as spy:
        prepared = segmenter.load(str(source))
        result = segmenter.finish(segmenter.predict(prepared), prepared)
    assert spy.seen == []
    assert prepared.image.dtype == torch.float32
    assert result.labels.dtype == np.uint8 and result.foreground.dtype == np.float16


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_cropped_and_pasted_equals_uncropped(tmp_path, orientation):
    source = str(ct_scan(tmp_path, orientation))
    cropped = Segmenter(Threshold(), config("preprocess.crop_foreground=true"), "cpu").segment(source)
    whole = Segmenter(Threshold(), config("preprocess.crop_foreground=false"), "cpu").segment(source)
    assert cropped.labels.sum() > 50
    np.testing.assert_array_equal(cropped.labels, whole.labels)
    np.testing.assert_allclose(cropped.foreground.astype(np.float32), whole.foreground.astype(np.float32), atol=2e-3)


def test_cropped_body_tiles_fewer_windows(tmp_path):
    source = str(ct_scan(tmp_path, shape=(96, 96, 20)))
    cropped = Segmenter(Threshold(), config("preprocess.crop_foreground=true"), "cpu")
    whole = Segmenter(Threshold(), config("preprocess.crop_foreground=false"), "cpu")
    assert cropped.predict(cropped.load(source)).windows < whole.predict(whole.load(source)).windows


def test_both_backends_give_the_same_mask(tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = config()
    source = str(ct_scan(tmp_path))
    checkpoint = random_unet_checkpoint(tmp_path, cfg, source)
    by_torch = Segmenter.from_checkpoint(checkpoint, "cpu", backend="torch")
    by_onnx = Segmenter.from_checkpoint(checkpoint, "cpu", backend="onnxruntime")
    a, b = by_torch.segment(source), by_onnx.segment(source)
    assert (by_torch.backend, by_onnx.backend) == ("torch", "onnxruntime")
    assert 0.05 < a.labels.sum() / (a.image > -500).sum() < 0.95
    assert dice(a.labels, b.labels) >= 0.999
    np.testing.assert_allclose(a.foreground.astype(np.float32), b.foreground.astype(np.float32), atol=2e-3)


def test_fused_torch_path_equals_the_plain_network(tmp_path):
    """The CPU-fused U-Net and the module as trained give the same probabilities."""
    cfg = config()
    source = ct_scan(tmp_path)
    segmenter = Segmenter.from_checkpoint(random_unet_checkpoint(tmp_path, cfg, source), "cpu", backend="torch")
    prepared = segmenter.load(str(source))
    fast = segmenter.probabilities(prepared.image)
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        logits = sliding_window_inference(prepared.image.as_tensor()[None], cfg.inference.roi_size, 1,
                                          segmenter.network, overlap=cfg.inference.overlap, mode=cfg.inference.blend)
    torch.testing.assert_close(fast, torch.softmax(logits[0], 0), atol=1e-4, rtol=1e-4)


def test_cpu_windows_go_in_batches_of_at_least_two():
    cfg = config("inference.sw_batch_size=1")
    assert Segmenter(Threshold(), cfg, "cpu").window_batch == 2


def test_what_is_kept_per_case_does_not_grow_with_the_classes(tmp_path):
    """Binary: P(lesion), decided on the source grid. Many classes: the argmax on the windows' grid (uint8)
    and P(foreground), one channel each whatever the number of classes; both equal MONAI's inversion."""
    source = str(ct_scan(tmp_path))
    for classes in (2, 5):
        cfg = config(f"data.labels={{background: 0, {', '.join(f'c{k}: {k}' for k in range(1, classes))}}}")
        torch.manual_seed(classes)
        segmenter = Segmenter(build_model(cfg.model, 1, classes), cfg, "cpu")
        prepared = segmenter.load(source)
        prediction = segmenter.predict(prepared)
        assert prediction.probs.dtype == torch.float16
        assert tuple(prediction.probs.shape) == (1,) + tuple(prepared.image.shape[1:])
        result = segmenter.finish(prediction, prepared)
        assert result.labels.shape == (56, 48, 20) and result.labels.max() < classes
        full = segmenter.probabilities(prepared.image)
        expected = segmenter.to_source(full, prepared.image)
        np.testing.assert_allclose(result.foreground.astype(np.float32), expected[1:].sum(0).numpy(), atol=2e-3)
        if classes == 2:
            assert prediction.labels is None
            clear = (expected[1] - 0.5).abs().numpy() > 2e-3  # float16 storage: p within 0.002 of 0.5 may flip
            assert clear.mean() > 0.9
            np.testing.assert_array_equal(result.labels[clear], (expected[1] > 0.5).numpy()[clear])
        else:
            assert prediction.labels.dtype == torch.uint8 and prediction.labels.shape == prediction.probs.shape
            np.testing.assert_array_equal(prediction.labels[0].numpy(), full.argmax(0).numpy())
            # Independently, in world coordinates: each source voxel takes the label of the nearest voxel of
            # the windows' grid (0 outside the body box); voxels halfway between two are left out (ties).
            src = np.asarray(prepared.image.meta["original_affine"], dtype=np.float64)
            to_pre = np.linalg.inv(np.asarray(prepared.image.affine, dtype=np.float64)) @ src
            ijk = np.stack(np.meshgrid(*[np.arange(n) for n in result.labels.shape], indexing="ij"), -1).reshape(-1, 3)
            p = ijk @ to_pre[:3, :3].T + to_pre[:3, 3]
            nearest = np.floor(p + 0.5).astype(int)
            pre = prediction.labels[0].numpy()
            inside = np.all((nearest >= 0) & (nearest < pre.shape), axis=1)
            expected_labels = np.zeros(len(p), np.uint8)
            expected_labels[inside] = pre[tuple(nearest[inside].T)]
            no_tie = np.all(np.abs(np.abs(p - np.floor(p)) - 0.5) > 1e-3, axis=1)
            assert no_tie.mean() > 0.5
            np.testing.assert_array_equal(result.labels.reshape(-1)[no_tie], expected_labels[no_tie])


def test_running_argmax_equals_torch_argmax_ties_included():
    from pipeline.infer.accumulate import _argmax_classes

    values = torch.rand(6, 9, 8, 7, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # many ties
    values = values.permute(0, 2, 1, 3)  # a non-contiguous slab, as finish gets them
    torch.testing.assert_close(_argmax_classes(values), values.argmax(dim=0).to(torch.uint8))
