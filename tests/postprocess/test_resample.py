"""Probabilities back onto the source grid slab by slab: equal to MONAI's ``Invertd`` of the
preprocessing (orientation, resampling, foreground crop) for RAS, LPS, oblique and feet-first scans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.postprocess import ToSourceGrid
from pipeline.postprocess.resample import axis_map, crop_box, to_source_slabs
from pipeline.transforms.preprocess import preprocess_transforms
from tests.conftest import make_affine, save_nifti


def scan(tmp_path, orientation, shape=(40, 36, 18)):
    rng = np.random.default_rng(0)
    image = np.full(shape, -1000, np.int16)
    image[5:33, 4:30, 2:16] = rng.integers(-100, 200, (28, 26, 14))  # the body: crop box inside the grid
    return save_nifti(image, make_affine(orientation), tmp_path / f"{orientation}.nii.gz")


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique", "feet_first"])
@pytest.mark.parametrize("spacing", ["null", "[1.3, 0.7, 3.0]"])
def test_slabs_equal_monai_invert(tmp_path, orientation, spacing):
    config = load_config(None, [f"preprocess.spacing={spacing}", "preprocess.crop_foreground=true",
                                "preprocess.crop_margin=1"])
    preprocess = preprocess_transforms(config.preprocess)
    image = preprocess({"image": str(scan(tmp_path, orientation))})["image"]
    probs = torch.rand((3,) + tuple(image.shape[1:]), generator=torch.Generator().manual_seed(2))
    expected = ToSourceGrid(preprocess)(probs, image).numpy()

    source_affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
    maps = axis_map(source_affine, np.asarray(image.affine, dtype=np.float64))
    assert maps is not None
    got = np.full(expected.shape, np.nan, np.float32)

    def on_slab(k0, k1, values):
        got[..., k0:k1] = values.numpy()

    to_source_slabs(probs, crop_box(image, image.shape[1:]), maps, expected.shape[1:], on_slab,
                    max_elements=3 * 40 * 36 * 4)  # several slabs
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_rotated_grids_are_not_axis_aligned():
    a = make_affine("RAS")
    b = make_affine("oblique")
    assert axis_map(a, b) is None
    maps = axis_map(a, a)
    assert [m.target for m in maps] == [0, 1, 2] and all(abs(m.scale - 1) < 1e-9 for m in maps)
