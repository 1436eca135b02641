"""The slab-by-slab resampling grid gives MONAI's voxels bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.layers.spatial_transforms import AffineTransform
from monai.transforms import Spacingd

import pipeline.transforms.lean_resample as lean_resample
from pipeline.transforms.lean_resample import LeanSpacingd, SlabAffineTransform
from tests.conftest import make_affine
from tests.helpers import torch_threads


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("slab_voxels", [1, 97, 1 << 18])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_slab_affine_transform_equals_monai(align_corners, slab_voxels, mode, monkeypatch):
    monkeypatch.setattr(lean_resample, "SLAB_VOXELS", slab_voxels)
    torch.manual_seed(0)
    src = torch.rand(1, 2, 23, 19, 11)
    theta = torch.tensor([[2.0, 0.05, 0.0, 0.3], [0.0, -1.7, 0.02, 17.5], [0.01, 0.0, 2.6, -0.4],
                          [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64).to(src)
    kwargs = dict(normalized=False, mode=mode, padding_mode="border", align_corners=align_corners,
                  reverse_indexing=True)
    with torch_threads(1):
        expected = AffineTransform(**kwargs)(src, theta=theta, spatial_size=(12, 13, 5))
        got = SlabAffineTransform(**kwargs)(src, theta=theta, spatial_size=(12, 13, 5))
    assert got.shape == expected.shape == (1, 2, 12, 13, 5)
    assert torch.equal(got, expected)


def test_lean_spacingd_equals_spacingd(monkeypatch):
    monkeypatch.setattr(lean_resample, "SLAB_VOXELS", 50)  # many slabs
    rng = np.random.default_rng(1)
    array = torch.from_numpy(rng.normal(size=(1, 40, 36, 14)).astype(np.float32))
    image = MetaTensor(array, affine=torch.as_tensor(make_affine("RAS")))
    args = dict(keys=["image"], pixdim=[1.6, 1.8, 3.0], mode="bilinear", padding_mode="border",
                dtype=torch.float32)
    with torch_threads(1):
        expected = Spacingd(**args)({"image": image.clone()})["image"]
        got = LeanSpacingd(**args)({"image": image.clone()})["image"]
    assert tuple(got.shape) == tuple(expected.shape) == (1, 20, 18, 12)
    assert torch.equal(got.as_tensor(), expected.as_tensor())
    np.testing.assert_array_equal(np.asarray(got.affine), np.asarray(expected.affine))
    from monai.transforms.spatial import functional

    assert functional.AffineTransform is AffineTransform  # restored after the call
