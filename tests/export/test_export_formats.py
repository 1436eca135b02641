"""``medseg export``: each format from a briefly trained tiny U-Net, run the way its users run it, against
``segment``'s masks on held-out cases (RAS, LPS, feet-first; spacings other than the model's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.export import export_model
from pipeline.export.spec import SPEC_KEY, inference_spec
from pipeline.infer import Segmenter
from pipeline.model.checkpoint import load_checkpoint
from tests.export.conftest import dice
from tests.helpers import torch_threads

EXAMPLE = Path(__file__).resolve().parents[2] / "pipeline" / "export" / "onnx_segment_example.py"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def segment_masks(trained_checkpoint, held_out_cases):
    """``segment``'s labels (and affines) per case: the reference every export is held to."""
    segmenter = Segmenter.from_checkpoint(trained_checkpoint, device="cpu", backend="torch")
    with torch_threads(1):
        out = {}
        for path in sorted(held_out_cases.glob("*.nii.gz")):
            result = segmenter.segment(str(path))
            out[path.name.removesuffix("_0000.nii.gz")] = result
    assert all(r.labels.sum() > 100 for r in out.values())  # non-empty masks: the Dice below means something
    return out


def _env():
    import os

    return {**os.environ, **ENV}


def test_onnx_metadata_carries_the_inference_spec(trained_checkpoint, tmp_path):
    import onnx

    result = export_model(trained_checkpoint, tmp_path / "model.onnx", "onnx")
    assert result.max_abs_diff < 1e-3
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    spec = json.loads(props[SPEC_KEY])
    expected = inference_spec(load_checkpoint(trained_checkpoint))
    assert {k: v for k, v in spec.items() if k != "onnx"} == json.loads(json.dumps(expected))
    assert spec["checkpoint_sha256"] == load_checkpoint(trained_checkpoint).sha256
    assert spec["preprocess"]["spacing"] == [1.2, 1.2, 2.5]
    assert spec["preprocess"]["normalisation"] == [{"channel": "0", "scheme": "window", "low": -150.0,
                                                    "high": 250.0}]
    assert spec["inference"]["roi_size"] == [24, 24, 8] and spec["postprocess"]["min_component_mm3"] == 4.0
    assert spec["onnx"] == {"opset": 17, "dynamic_spatial": True, "spatial_multiple": 2}
    assert props["medseg.orientation"] == "RAS" and json.loads(props["medseg.labels"]) == {"background": 0,
                                                                                            "lesion": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporaries left


def test_onnx_dynamic_axes_match_torch(trained_checkpoint, tmp_path):
    import onnxruntime as ort

    path = export_model(trained_checkpoint, tmp_path / "model.onnx", "onnx").path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ckpt = load_checkpoint(trained_checkpoint)
    from pipeline.export.network import exportable

    module = exportable(ckpt).module
    x = torch.randn((3, 1, 32, 28, 12), generator=torch.Generator().manual_seed(1))  # batch 3, not the roi
    with torch.no_grad():
        expected = module(x).numpy()
    got = session.run(None, {"x": x.numpy()})[0]
    assert got.shape == (3, 2, 32, 28, 12)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_onnx_example_script_reproduces_segment(trained_checkpoint, held_out_cases, segment_masks, tmp_path):
    model = export_model(trained_checkpoint, tmp_path / "model.onnx", "onnx").path
    out = tmp_path / "masks"
    run = subprocess.run([sys.executable, str(EXAMPLE), str(model), str(held_out_cases), str(out)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for case, reference in segment_masks.items():
        mask = nib.load(str(out / f"{case}_seg.nii.gz"))
        assert mask.shape == reference.labels.shape
        np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-5)
        assert dice(np.asarray(mask.dataobj), reference.labels) >= 0.99


def test_example_script_imports_no_medseg():
    source = EXAMPLE.read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports == {"itertools", "json", "sys", "pathlib", "nibabel", "numpy", "onnxruntime", "scipy"}


def test_torchscript_loads_with_jit_and_matches(trained_checkpoint, tmp_path):
    path = export_model(trained_checkpoint, tmp_path / "model.ts", "torchscript").path
    files = {"medseg.json": ""}
    loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    spec = json.loads(files["medseg.json"])
    assert spec["checkpoint_sha256"] == load_checkpoint(trained_checkpoint).sha256
    assert spec["labels"] == {"background": 0, "lesion": 1} and spec["inference"]["overlap"] == 0.25
    from pipeline.export.network import exportable

    module = exportable(load_checkpoint(trained_checkpoint)).module
    x = torch.randn((2, 1, 24, 24, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), module(x).numpy(), atol=1e-5)


def test_bundle_layout(trained_checkpoint, tmp_path):
    out = export_model(trained_checkpoint, tmp_path / "bundle", "bundle").path
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "docs/README.md", "LICENSE",
                 "scripts/medseg_bundle.py"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "configs/metadata.json").read_text())
    assert meta["medseg"]["checkpoint_sha256"] == load_checkpoint(trained_checkpoint).sha256
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "lesion"}
    config = json.loads((out / "configs/inference.json").read_text())
    targets = [t["_target_"] for t in config["preprocessing"]["transforms"]]
    assert targets == ["LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "Orientationd",
                       "scripts.medseg_bundle.AntiAliasd", "Spacingd", "ScaleIntensityRanged", "CropForegroundd"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # the partial folder was renamed


@pytest.mark.slow
def test_monai_bundle_run_reproduces_segment_in_source_geometry(trained_checkpoint, held_out_cases, segment_masks,
                                                                 tmp_path):
    bundle = export_model(trained_checkpoint, tmp_path / "bundle", "bundle").path
    out = tmp_path / "masks"
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(bundle / "configs" / "inference.json"), "--dataset_dir", str(held_out_cases),
                          "--output_dir", str(out)], capture_output=True, text=True, env=_env(), timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for case, reference in segment_masks.items():
        mask = nib.load(str(out / f"{case}_0000_seg.nii.gz"))
        assert mask.shape == reference.labels.shape  # the source geometry: shape and affine
        np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-5)
        assert mask.get_data_dtype() == np.uint8
        assert dice(np.asarray(mask.dataobj), reference.labels) >= 0.99


@pytest.mark.parametrize("mode", ["zscore", "ct_window"])
def test_bundle_config_resolves_with_monai(tmp_path, mode, monkeypatch):
    """The bundle's preprocessing and post-processing instantiate with MONAI's ConfigParser, bundle code
    included, and preprocess a NIfTI file onto the model's grid."""
    from monai.bundle import ConfigParser

    from tests.conftest import make_affine, save_nifti
    from tests.export.conftest import OVERRIDES
    from tests.helpers import ct_case, tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "model.pt", *OVERRIDES, f"preprocess.intensity.mode={mode}")
    bundle = export_model(ckpt, tmp_path / "bundle", "bundle").path
    image, _ = ct_case((40, 36, 14), seed=3)
    scan = save_nifti(image, make_affine("LPS", spacing=(1.0, 1.0, 2.5)), tmp_path / "in" / "a.nii.gz")
    monkeypatch.syspath_prepend(str(bundle))
    for name in ("scripts", "scripts.medseg_bundle"):  # this bundle's code, not an earlier test's
        monkeypatch.delitem(sys.modules, name, raising=False)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["dataset_dir"] = str(scan.parent)
    assert [d["image"] for d in parser.get_parsed_content("datalist")] == [str(scan)]
    out = parser.get_parsed_content("preprocessing")({"image": str(scan)})["image"]
    assert out.shape[0] == 1 and np.allclose(np.abs(np.diag(np.asarray(out.affine))[:3]), [1.2, 1.2, 2.5])
    steps = [type(t).__name__ for t in parser.get_parsed_content("postprocessing").transforms]
    assert steps == ["Activationsd", "Invertd", "Decided", "RemoveSmallComponentsd", "SaveImaged"]
    if mode == "zscore":
        assert abs(float(out.mean())) < 0.5  # z-scored (then cropped to the body)
    for name in ("scripts", "scripts.medseg_bundle"):
        sys.modules.pop(name, None)


@pytest.mark.slow
def test_onnx_example_with_tta_and_every_postprocessing_rule(trained_checkpoint, held_out_cases, tmp_path):
    """The same weights with inference.tta=mirror, restrict_to_body and keep_largest: the example script
    follows the spec's TTA (mean softmax over the 8 flips) and rules as segment does."""
    from dataclasses import replace

    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    ckpt = load_checkpoint(trained_checkpoint)
    config = ckpt.config
    config = replace(config, inference=replace(config.inference, tta="mirror"),
                     postprocess=replace(config.postprocess, keep_largest=["lesion"], restrict_to_body=["lesion"]))
    path = save_checkpoint(tmp_path / "tta.pt", Checkpoint(config=config, state_dict=ckpt.state_dict, epoch=1))
    for reference, mask in _example_and_segment(path, held_out_cases, tmp_path):
        assert ndimage.label(reference, np.ones((3, 3, 3)))[1] == 1  # keep_largest acted
        assert reference.sum() > 50 and dice(mask, reference) >= 0.99


@pytest.mark.slow
def test_onnx_example_with_zscore_normalisation(held_out_cases, tmp_path):
    """A model trained under intensity.mode=zscore (crop to the voxels above the minimum): the script's
    z-score and crop rule follow the spec as segment's MONAI transforms do."""
    from tests.export.conftest import train_tiny

    path = train_tiny(tmp_path / "z.pt", "preprocess.intensity.mode=zscore")
    for reference, mask in _example_and_segment(path, held_out_cases, tmp_path):
        assert reference.sum() > 50 and dice(mask, reference) >= 0.99


def _example_and_segment(checkpoint, cases, tmp_path):
    """(segment's mask, the example script's mask) per case: the checkpoint exported to ONNX, the script run
    on ``cases`` as a subprocess, ``segment`` (torch backend) on the same files."""
    model = export_model(checkpoint, tmp_path / "model.onnx", "onnx").path
    out = tmp_path / "masks"
    run = subprocess.run([sys.executable, str(EXAMPLE), str(model), str(cases), str(out)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", backend="torch")
    with torch_threads(1):
        for source in sorted(cases.glob("*.nii.gz")):
            mask = np.asarray(nib.load(str(out / source.name.replace("_0000.nii.gz", "_seg.nii.gz"))).dataobj)
            yield segmenter.segment(str(source)).labels, mask
