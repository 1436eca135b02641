"""``Segmenter`` with valid-padding networks: the mask comes back in the source geometry and equals the
argmax of :func:`predict_logits`, the path training and validation use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.infer import Segmenter
from pipeline.infer.sliding import predict_logits
from pipeline.model import build_model
from tests.conftest import make_affine, save_nifti
from tests.helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def valid_config(spatial_dims: int):
    roi = "[28, 28]" if spatial_dims == 2 else "[28, 28, 20]"
    return load_config(None, [
        f"model.spatial_dims={spatial_dims}", "model.padding=valid", "model.features=2", "model.depth=2",
        "model.deep_supervision=false", f"sampling.patch_size={roi}", f"inference.roi_size={roi}",
        "inference.overlap=0.25", "inference.min_component_mm3=0", "preprocess.spacing=null",
        "preprocess.crop_foreground=false",
    ])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_valid_padding_segmentation_equals_predict_logits(tmp_path, spatial_dims):
    rng = np.random.default_rng(0)
    shape = (30, 26, 5) if spatial_dims == 2 else (30, 26, 22)
    scan = rng.integers(-200, 300, size=shape).astype(np.int16)
    affine = make_affine("RAS", spacing=(0.9, 0.8, 2.5))
    source = save_nifti(scan, affine, tmp_path / "scan.nii.gz")
    cfg = valid_config(spatial_dims)
    torch.manual_seed(0)
    network = build_model(cfg.model, in_channels=1, out_channels=2).eval()
    with torch.no_grad():  # decisive logits: few voxels near the decision boundary
        network.head.weight.mul_(50.0)
    assert any(network.margin(tuple(cfg.inference.roi_size)))

    segmenter = Segmenter(network, cfg, "cpu", backend="torch")
    result = segmenter.segment(str(source))

    assert result.labels.shape == shape and result.labels.dtype == np.uint8
    np.testing.assert_allclose(result.affine, affine, atol=1e-5)
    # RAS source, native spacing, no crop: the preprocessed grid is the source grid.
    logits = predict_logits(network, segmenter.load(str(source)).image, cfg.inference, spatial_dims)
    expected = logits.argmax(0).numpy()
    decided = (logits[1] - logits[0]).abs().numpy() > 1e-2  # P(lesion) is kept as float16
    assert decided.mean() > 0.9 and 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(result.labels[decided], expected[decided])
