"""A 2D model (slice by slice through the volume) exported: ``monai.bundle run`` of the bundle and the onnx
example script against ``segment`` on the held-out CT cases of tests/export/conftest.py, with and without
TTA mirror."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.export import export_model
from pipeline.infer import Segmenter
from tests.export.conftest import OVERRIDES, SHAPE, dice
from tests.helpers import ct_case, tiny_config_overrides, torch_threads

EXAMPLE = Path(__file__).resolve().parents[2] / "pipeline" / "export" / "onnx_segment_example.py"


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    """A tiny 2D U-Net fitted (60 Adam steps) to the axial slices of windowed synthetic CT volumes."""
    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    config = load_config(None, tiny_config_overrides(*OVERRIDES, "model.spatial_dims=2", "inference.roi_size=[24, 24]",
                                                     "sampling.patch_size=[24, 24]"))
    torch.manual_seed(0)
    network = build_model(config.model, in_channels=1, out_channels=config.num_classes)
    low, high = config.preprocess.intensity.window
    pairs = [ct_case(SHAPE, seed=s) for s in range(3)]
    x = torch.from_numpy(np.stack([np.clip((i - low) / (high - low), 0, 1) for i, _ in pairs])).float()
    y = torch.from_numpy(np.stack([lab for _, lab in pairs])).long()
    x, y = x.permute(0, 3, 1, 2).reshape(-1, 1, *SHAPE[:2]), y.permute(0, 3, 1, 2).reshape(-1, *SHAPE[:2])
    optimiser = torch.optim.Adam(network.parameters(), lr=0.03)
    with torch_threads(1):
        for _ in range(60):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(network(x), y, weight=torch.tensor([1.0, 3.0]))
            loss.backward()
            optimiser.step()
    return save_checkpoint(tmp_path_factory.mktemp("export-2d") / "best.pt",
                           Checkpoint(config=config, state_dict=network.state_dict(), epoch=1))


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["none", "mirror"])
def test_bundle_and_onnx_example_2d_model(model_2d, held_out_cases, tmp_path, tta):
    from pipeline.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(model_2d)
    config = replace(ckpt.config, inference=replace(ckpt.config.inference, tta=tta))
    path = save_checkpoint(tmp_path / "m.pt", Checkpoint(config=config, state_dict=ckpt.state_dict, epoch=1))
    bundle = export_model(path, tmp_path / "bundle", "bundle").path
    inferer = json.loads((bundle / "configs" / "inference.json").read_text())["inferer"]
    assert inferer["_target_"] == "scripts.medseg_bundle.MedsegInferer" and inferer["roi_size"] == [24, 24, 1]
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(bundle / "configs" / "inference.json"), "--dataset_dir", str(held_out_cases),
                          "--output_dir", str(tmp_path / "masks")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    onnx = export_model(path, tmp_path / "model.onnx", "onnx").path
    run = subprocess.run([sys.executable, str(EXAMPLE), str(onnx), str(held_out_cases), str(tmp_path / "onnx")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-2000:]
    segmenter = Segmenter.from_checkpoint(path, device="cpu", backend="torch")
    scores = {}
    with torch_threads(1):
        for source in sorted(held_out_cases.glob("*.nii.gz")):
            reference = segmenter.segment(str(source))
            mask = nib.load(str(tmp_path / "masks" / source.name.replace(".nii.gz", "_seg.nii.gz")))
            assert mask.shape == reference.labels.shape and reference.labels.sum() > 50
            np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-5)
            scores["bundle", source.name] = dice(np.asarray(mask.dataobj), reference.labels)
            mask = nib.load(str(tmp_path / "onnx" / source.name.replace("_0000.nii.gz", "_seg.nii.gz")))
            assert mask.shape == reference.labels.shape
            scores["onnx", source.name] = dice(np.asarray(mask.dataobj), reference.labels)
    print(f"2d tta={tta} dice", scores)
    assert min(scores.values()) >= 0.99, scores
