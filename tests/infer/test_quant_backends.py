"""int8 (ONNX Runtime QDQ) and OpenVINO backends on a briefly trained tiny U-Net: their masks agree with
torch fp32 within the accuracy contract, and ``auto`` only ever picks a backend that agrees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from pipeline.config import override_config  # noqa: E402
from pipeline.infer import Segmenter  # noqa: E402
from pipeline.infer import auto as auto_module  # noqa: E402
from pipeline.infer.cache import cache_dir  # noqa: E402
from pipeline.infer.calibration import CASES, RULE_CASE, WINDOWS_PER_CASE, calibration_for  # noqa: E402
from tests.conftest import make_affine, save_nifti  # noqa: E402
from tests.export.conftest import SHAPE, dice, train_tiny  # noqa: E402
from tests.helpers import ct_case, torch_threads  # noqa: E402


def _openvino_or_skip():
    pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino; a project dependency)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The export tests' briefly trained tiny U-Net (bright lesions), its data.root pointing nowhere: the
    calibration windows come from the case being segmented (the documented fallback)."""
    folder = tmp_path_factory.mktemp("quant-model")
    return train_tiny(folder / "best.pt", f"data.root={folder / 'no-data'}")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    image, label = ct_case(SHAPE, seed=21)
    path = tmp_path_factory.mktemp("quant-case") / "case_0000.nii.gz"
    save_nifti(image.astype(np.int16), make_affine("RAS", spacing=(1.0, 1.0, 2.5)), path)
    return path, label


def _segment(checkpoint, path, *overrides):
    base = Segmenter.from_checkpoint(checkpoint, device="cpu", backend="torch")
    config = override_config(base.config, list(overrides))
    seg = Segmenter(base.network, config, device="cpu", model_sha256=base.model_sha256)
    with torch_threads(1):
        result = seg.segment(str(path))
    return seg, result.labels


@pytest.fixture(scope="module")
def reference(trained, case):
    seg, labels = _segment(trained, case[0], "inference.backend=torch")
    assert seg.backend == "torch"
    assert labels.sum() > 20  # non-trivial masks
    assert dice(labels, case[1]) > 0.5  # and they follow the lesions
    return labels


@pytest.mark.parametrize("backend, precision", [("onnxruntime", "int8"), ("openvino", "fp32"),
                                                ("openvino", "int8")])
def test_backend_masks_agree_with_torch_fp32(trained, case, reference, backend, precision):
    if backend == "openvino":
        _openvino_or_skip()
    seg, labels = _segment(trained, case[0], f"inference.backend={backend}", f"inference.precision={precision}")
    assert (seg.backend, seg.runner.precision) == (backend, precision)
    assert labels.shape == reference.shape
    assert dice(labels, reference) >= 0.98
    if (backend, precision) == ("openvino", "fp32"):  # the export with staged instance-norm reductions
        assert any(p.name.split("-ov")[0].endswith("-stagednorm") for p in (cache_dir() / "openvino").glob("*.xml"))
    if precision == "int8":
        int8_files = list((cache_dir() / "int8").glob("*.onnx"))
        assert int8_files  # quantised once, cached
        if backend == "openvino":
            assert any(p.name.startswith(int8_files[0].stem) for p in (cache_dir() / "openvino").glob("*.xml"))


def test_calibration_falls_back_to_the_case_deterministically(trained, case):
    seg = Segmenter.from_checkpoint(trained, device="cpu", backend="torch")
    assert calibration_for(seg.config) is None  # no training data, no case: nothing to calibrate on
    image = seg.load(str(case[0])).image
    first, second = calibration_for(seg.config, image), calibration_for(seg.config, image)
    assert first.rule == RULE_CASE and first.digest == second.digest
    windows = first.windows()
    assert windows.shape == (CASES * WINDOWS_PER_CASE, 1, *seg.config.inference.roi_size)
    assert windows.dtype == np.float32
    np.testing.assert_array_equal(windows, second.windows())


def _decision():
    (path,) = (cache_dir() / "backend").glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))


def _auto(trained, case, *overrides):
    seg, labels = _segment(trained, case[0], "inference.backend=auto", *overrides)
    return seg, labels


def test_auto_rejects_a_backend_that_disagrees_and_one_that_fails(trained, case, reference, fresh_cache,
                                                                 monkeypatch):
    real = auto_module._predictor

    def broken(name, *args):
        if name == "onnxruntime":  # instant garbage: the fastest candidate by far, but it disagrees
            return lambda x: torch.stack([torch.zeros(x.shape[0], *x.shape[2:]),
                                          torch.full((x.shape[0], *x.shape[2:]), 10.0)], dim=1)
        return real(name, *args)

    monkeypatch.setattr(auto_module, "_predictor", broken)
    seg, labels = _auto(trained, case)
    assert (seg.backend, seg.runner.precision) == ("torch", "fp32")
    np.testing.assert_array_equal(labels, reference)
    data = _decision()
    assert data["choice"] == "torch"
    assert data["agreement"]["onnxruntime"]["agrees"] is False
    assert data["agreement"]["onnxruntime"]["dice_min"] < 0.98
    assert data["agreement"]["onnxruntime"]["max_abs_probability_difference"] > 0.5
    assert "disagree" in data["skipped"]["onnxruntime"]
    assert "openvino" not in data["skipped"] and "openvino" not in data["seconds_per_batch"]  # opt-in only
    assert set(data["seconds_per_batch"]) == {"torch", "onnxruntime"}  # the garbage was the fastest
    assert data["seconds_per_batch"]["onnxruntime"] < data["seconds_per_batch"]["torch"]
    assert data["key"]["calibration"].startswith(RULE_CASE)


@pytest.mark.slow
def test_auto_picks_an_agreeing_backend_and_int8_only_when_asked(trained, case, reference, fresh_cache):
    seg, labels = _auto(trained, case)
    data = _decision()
    assert data["choice"] in ("torch", "onnxruntime") and seg.runner.precision == "fp32"
    assert data["key"]["candidates"] == ["torch", "onnxruntime"]
    assert not any(name.endswith("int8") for name in [*data["agreement"], *data["skipped"]])  # fp32: no int8 tried
    seconds, choice = data["seconds_per_batch"], data["choice"]
    for figures in data["agreement"].values():  # checked on the 16 calibration windows
        assert figures["windows"] == 16 and figures["agrees"] == (figures["dice_min"] >= 0.98)
    if choice != "torch":
        assert data["agreement"][choice]["agrees"] and seconds[choice] < seconds["torch"]
    for name, s in seconds.items():  # nothing faster than the choice was taken: it disagreed or failed
        if s < seconds[choice]:
            assert name in data["skipped"] and not data["agreement"].get(name, {}).get("agrees", False)
    assert dice(labels, reference) >= 0.98
    assert set(data["cpu"]) >= {"flags", "vnni", "reduce_range", "isa"}

    for path in (cache_dir() / "backend").glob("*.json"):
        path.unlink()
    seg, labels = _auto(trained, case, "inference.precision=int8")
    data = _decision()
    assert data["key"]["precision"] == "int8"
    assert "onnxruntime-int8" in data["agreement"] or "onnxruntime-int8" in data["skipped"]
    choice = data["choice"]
    assert choice in data["seconds_per_batch"]
    if choice != "torch":
        assert data["agreement"][choice]["agrees"]
    assert dice(labels, reference) >= 0.98


def test_int8_quantises_the_full_resolution_convolutions_but_the_first_and_the_head(trained):
    import onnx

    from pipeline.infer.backend import OnnxRunner
    from pipeline.infer.quantize import QUANTISED_OPS, fp32_convs

    seg = Segmenter.from_checkpoint(trained, device="cpu", backend="torch")
    roi = tuple(seg.config.inference.roi_size)
    model = onnx.load(str(OnnxRunner(seg.network, seg.model_sha256, (1, *roi), threads=1).fp32_path))
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)[2:]
              for v in (*graph.value_info, *graph.output)}
    convs = [n for n in graph.node if n.op_type in QUANTISED_OPS]
    keep = set(fp32_convs(model))
    int8 = [n for n in convs if n.name not in keep]
    assert convs[0].name in keep and convs[-1].name in keep  # the input's and the head
    assert int8 and all(shapes[n.output[0]] == roi for n in int8)  # full resolution only
    assert all(shapes[n.output[0]] != roi for n in convs[1:-1] if n.name in keep)  # the coarser levels
    assert any(n.op_type == "ConvTranspose" for n in int8)  # the last decoder's up-convolution


def test_fp32_candidates_must_agree_up_to_rounding_int8_to_the_dice_floor():
    torch.manual_seed(0)
    reference = torch.randn(3, 2, 8, 8, 4) * 4
    rounding = reference + 1e-6 * torch.randn_like(reference)
    drifted = reference.clone()
    drifted[0, 1, 0, 0, 0] += 0.2  # one voxel's probability moves by a few hundredths: masks nearly equal
    shift = auto_module.agreement(reference, drifted)["max_abs_probability_difference"]
    assert 1e-3 < shift < 0.1
    fp32 = auto_module.FP32_MAX_DIFFERENCE
    assert auto_module.agreement(reference, rounding, max_difference=fp32)["agrees"]
    drifted_fp32 = auto_module.agreement(reference, drifted, max_difference=fp32)
    assert drifted_fp32["dice_min"] >= auto_module.MIN_DICE and not drifted_fp32["agrees"]
    assert auto_module.agreement(reference, drifted)["agrees"]  # int8: the Dice floor alone
    key = auto_module.decision_key("ab" * 32, (1, 8, 8, 4), 2, "fp32", None)
    assert key["rule"] == auto_module.RULE  # a changed agreement rule measures again
    from pipeline.model.fused import NUMERICS

    # and so do other candidates, another OpenVINO export or a change in the torch reference's rounding
    assert key["candidates"] == ["torch", "onnxruntime"]
    assert key["openvino_export"] == "stagednorm" and key["torch_fused"] == NUMERICS
