"""The bundle's ``intensity.mode: auto`` preprocessing against medseg's own, on the same NIfTI files: a CT
channel (clip + the dataset's z-score, MONAI's ScaleIntensityRange) with an MR channel (body z-score), and
a CT-only model (one ScaleIntensityRanged); plus how the bundle lists multi-channel cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.export import export_model
from tests.conftest import make_affine, save_nifti
from tests.helpers import ct_case, tiny_config_overrides

CT = "{name: CT, scheme: ct, clip: [-120.0, 180.0], mean: 45.0, std: 30.0}"
COMMON = ("preprocess.intensity.mode=auto", "preprocess.spacing=[1.2, 1.2, 2.5]", "preprocess.crop_foreground=true",
          "inference.roi_size=[24, 24, 8]", "inference.tta=mirror", "postprocess.restrict_to_body=[lesion]")


def _checkpoint(path, channels, *extra):
    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    config = load_config(None, tiny_config_overrides(*COMMON, *extra))
    torch.manual_seed(0)
    network = build_model(config.model, in_channels=channels, out_channels=config.num_classes)
    return save_checkpoint(path, Checkpoint(config=config, state_dict=network.state_dict(), epoch=1))


def _parser(bundle, monkeypatch, dataset_dir):
    from monai.bundle import ConfigParser

    monkeypatch.syspath_prepend(str(bundle))
    for name in ("scripts", "scripts.medseg_bundle"):  # this bundle's code, not an earlier test's
        monkeypatch.delitem(sys.modules, name, raising=False)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["dataset_dir"] = str(dataset_dir)
    return parser


def _cleanup():
    for name in ("scripts", "scripts.medseg_bundle"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("channels", [["CT", "T1"], ["CT"]])
def test_bundle_auto_preprocessing_equals_medseg(tmp_path, monkeypatch, channels):
    from pipeline.io.channels import Channels
    from pipeline.transforms.preprocess import preprocess_transforms

    norms = "[" + ", ".join([CT] + ["{name: T1}"] * (len(channels) - 1)) + "]"
    ckpt = _checkpoint(tmp_path / "m.pt", len(channels), f"data.channels=[{', '.join(channels)}]",
                       f"preprocess.intensity.channels={norms}")
    bundle = export_model(ckpt, tmp_path / "bundle", "bundle").path
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    intensity = config["preprocessing"]["transforms"][-2]
    if len(channels) == 1:  # pure MONAI: (clip(x, -120, 180) - 45) / 30 as one linear rescaling
        assert intensity["_target_"] == "ScaleIntensityRanged"
        assert (intensity["b_min"], intensity["b_max"]) == (-5.5, 4.5)
    else:
        assert intensity["_target_"] == "scripts.medseg_bundle.NormalizeChannelsd"
        assert [n["scheme"] for n in intensity["channels"]] == ["ct", "zscore_body"]
    assert config["inferer"]["_target_"] == "scripts.medseg_bundle.MedsegInferer"
    image, _ = ct_case((40, 36, 14), seed=4)
    affine = make_affine("LPS", spacing=(1.0, 0.9, 2.5))
    files = [str(save_nifti(image, affine, tmp_path / "in" / "a_0000.nii.gz"))]
    if len(channels) == 2:
        mr = np.where(image > -500, image * 2.0 + 300.0, 0.0).astype(np.float32)
        files.append(str(save_nifti(mr, affine, tmp_path / "in" / "a_0001.nii.gz")))
    parser = _parser(bundle, monkeypatch, tmp_path / "in")
    try:
        data = parser.get_parsed_content("datalist")
        assert data == [{"image": files if len(files) > 1 else files[0]}]
        got = parser.get_parsed_content("preprocessing")(data[0])
    finally:
        _cleanup()
    source = Channels(tuple(files)) if len(files) > 1 else files[0]
    expected = preprocess_transforms(load_cfg(ckpt).preprocess, channels=channels)({"image": source})["image"]
    assert tuple(got["image"].shape) == tuple(expected.shape) and got["image"].shape[0] == len(channels)
    np.testing.assert_allclose(np.asarray(got["image"].affine), np.asarray(expected.affine), atol=1e-5)
    np.testing.assert_allclose(got["image"].numpy(), expected.numpy(), atol=1e-4)
    assert float(got["image"][0].max()) == pytest.approx(3.5, abs=1e-3)  # lesions at 150 HU: (150 - 45) / 30
    np.testing.assert_array_equal(got["source"], image)  # kept for restrict_to_body: channel 0 as read


def load_cfg(ckpt):
    from pipeline.model.checkpoint import load_checkpoint

    return load_checkpoint(ckpt).config


def test_case_list_groups_channel_files_and_refuses_incomplete_cases(tmp_path, monkeypatch):
    from pipeline.export.to_bundle import BUNDLE_CODE

    monkeypatch.syspath_prepend(str(BUNDLE_CODE.parent))
    monkeypatch.delitem(sys.modules, "medseg_bundle", raising=False)
    import medseg_bundle

    image = np.zeros((6, 5, 4), np.float32)
    affine = make_affine("RAS", spacing=(1.0, 1.0, 2.0))
    for name in ("b_0000.nii.gz", "b_0001.nii.gz", "a_0001.nii.gz", "a_0000.nii.gz", "c.nii.gz"):
        save_nifti(image, affine, tmp_path / name)
    cases = medseg_bundle.case_list(str(tmp_path), 2)
    assert cases == [{"image": [str(tmp_path / "a_0000.nii.gz"), str(tmp_path / "a_0001.nii.gz")]},
                     {"image": [str(tmp_path / "b_0000.nii.gz"), str(tmp_path / "b_0001.nii.gz")]},
                     {"image": str(tmp_path / "c.nii.gz")}]  # c: a 4D NIfTI
    save_nifti(image, make_affine("RAS", spacing=(1.0, 1.0, 3.0)), tmp_path / "b_0001.nii.gz")
    with pytest.raises(ValueError, match=r"channel 1 of case 'b_0000.nii.gz' \(b_0001.nii.gz\) is on another grid"):
        medseg_bundle.case_list(str(tmp_path), 2)
    (tmp_path / "b_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case 'b' has channel files \[0\]: expected _0000 ... _0001"):
        medseg_bundle.case_list(str(tmp_path), 2)
    sys.modules.pop("medseg_bundle", None)


def test_onnx_example_refuses_a_case_missing_a_channel(tmp_path):
    """The example script stops, naming the expected channels, when a case lacks one (not a silent zip)."""
    ckpt = _checkpoint(tmp_path / "m.pt", 2, "data.channels=[FLAIR, T1c]")
    model = export_model(ckpt, tmp_path / "m.onnx", "onnx").path
    image, _ = ct_case((24, 24, 8), seed=1)
    save_nifti(image, make_affine("RAS"), tmp_path / "in" / "a_0000.nii.gz")
    example = Path(__file__).resolve().parents[2] / "pipeline" / "export" / "onnx_segment_example.py"
    run = subprocess.run([sys.executable, str(example), str(model), str(tmp_path / "in"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 1
    assert "expected 2 channel(s) ['FLAIR', 'T1c'] on channel 0's grid, found 1" in run.stderr
