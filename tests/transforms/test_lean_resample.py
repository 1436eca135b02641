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


# --- LowpassSpacingd: float32 conversion, low-pass and resampling, the planes made as they are read ---


def _scan(dtype, shape=(1, 37, 30, 14)):
    rng = np.random.default_rng(7)
    values = rng.normal(40.0, 300.0, size=shape)
    array = torch.from_numpy(values.astype(dtype) if dtype != np.int16 else np.round(values).astype(np.int16))
    return MetaTensor(array, affine=torch.as_tensor(make_affine("RAS", spacing=(0.8, 0.7, 1.0))))


def _reference(image, pixdim):
    from monai.transforms import Compose, EnsureTyped

    from pipeline.transforms.antialias import AntiAliasd

    return Compose([EnsureTyped(["image"], dtype=torch.float32, track_meta=True), AntiAliasd(["image"], pixdim=pixdim),
                    Spacingd(["image"], pixdim=pixdim, mode="bilinear", padding_mode="border",
                             dtype=torch.float32)])({"image": image})["image"]


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("pixdim", [[1.6, 1.8, 2.5], [0.8, 1.6, 3.0], [3.1, 0.7, 1.0], [0.5, 0.5, 0.6],
                                    [0.8, 0.7, 1.0]])
@pytest.mark.parametrize("slab_voxels, chunk_voxels", [(1, 1), (200, 3000), (1 << 18, 1 << 23)])
def test_lowpass_spacingd_equals_ensure_antialias_spacing(monkeypatch, dtype, pixdim, slab_voxels, chunk_voxels):
    """Bit for bit and with the same metadata, for downsampling (sigmas along X of 0.5 to 1.4 voxels, and
    none), upsampling (no low-pass) and the grid already at the target (no resampling: the copy itself),
    from one output row and one plane at a time to a single slab."""
    from pipeline.transforms.lean_resample import LowpassSpacingd

    monkeypatch.setattr(lean_resample, "SLAB_VOXELS", slab_voxels)
    monkeypatch.setattr(lean_resample, "CHUNK_VOXELS", chunk_voxels)
    image = _scan(dtype)
    with torch_threads(1):
        expected = _reference(image.clone(), pixdim)
        got = LowpassSpacingd(["image"], pixdim=pixdim)({"image": image})["image"]
    assert got.dtype == expected.dtype == torch.float32
    assert tuple(got.shape) == tuple(expected.shape)
    assert torch.equal(got.as_tensor(), expected.as_tensor())
    np.testing.assert_array_equal(np.asarray(got.affine), np.asarray(expected.affine))
    assert [op["class"] for op in got.applied_operations] == [op["class"] for op in expected.applied_operations]
    assert ([op["orig_size"] for op in got.applied_operations]
            == [op["orig_size"] for op in expected.applied_operations])
    assert image.dtype == torch.float32 or torch.equal(image.as_tensor(), _scan(dtype).as_tensor())  # untouched


@pytest.mark.parametrize("private_maps", [True, False])
def test_plane_source_makes_the_filtered_planes_in_any_order_and_drops_the_others(monkeypatch, private_maps):
    """Planes asked for forwards, backwards and by jumps are those of the whole-volume filter; the window
    kept holds the planes asked for and at most a chunk more (also without anonymous private maps)."""
    from scipy import ndimage

    from pipeline.transforms.lean_resample import PlaneSource

    monkeypatch.setattr(lean_resample, "_PRIVATE_MAPS", private_maps)

    rng = np.random.default_rng(3)
    source = rng.integers(-1000, 1000, size=(2, 40, 9, 7)).astype(np.int16)
    sigma = np.array([1.2, 0.5, 0.0])
    full = np.stack([ndimage.gaussian_filter(c.astype(np.float32), sigma, mode="nearest") for c in source])
    planes = PlaneSource(source, sigma, chunk_voxels=2 * 5 * 9 * 7)  # five planes, capped at 40 / 16
    assert planes.chunk == 2 and planes.radius == 5  # a sixteenth of 40 planes; int(4 * 1.2 + 0.5)
    for p0, p1 in [(0, 3), (1, 4), (2, 9), (30, 33), (29, 31), (27, 30), (10, 12), (38, 40), (0, 1)]:
        planes.ensure(p0, p1)
        w0, w1 = planes.window
        assert w0 <= p0 and p1 <= w1 and w1 - w0 <= max(p1 - p0, planes.chunk)
        np.testing.assert_array_equal(planes.tensor[:, w0:w1].numpy(), full[:, w0:w1])
    planes.make_all()
    np.testing.assert_array_equal(planes.tensor.numpy(), full)


def test_lowpass_spacingd_is_inverted_as_spacingd():
    """``Invertd`` of a preprocessing holding it (MONAI's fallback back to the source grid) undoes the
    resampling as it undoes ``Spacingd``'s: the same shape, affine and values."""
    from monai.transforms import Compose, EnsureTyped

    from pipeline.transforms.antialias import AntiAliasd
    from pipeline.transforms.lean_resample import LowpassSpacingd

    pixdim = [1.6, 1.8, 2.5]
    lean = Compose([LowpassSpacingd(["image"], pixdim=pixdim)])
    reference = Compose([EnsureTyped(["image"], dtype=torch.float32, track_meta=True),
                         AntiAliasd(["image"], pixdim=pixdim),
                         Spacingd(["image"], pixdim=pixdim, mode="bilinear", padding_mode="border",
                                  dtype=torch.float32)])
    with torch_threads(1):
        back = lean.inverse(lean({"image": _scan(np.int16)}))["image"]
        expected = reference.inverse(reference({"image": _scan(np.int16)}))["image"]
    assert tuple(back.shape) == tuple(expected.shape) == (1, 37, 30, 14)
    np.testing.assert_array_equal(np.asarray(back.affine), np.asarray(expected.affine))
    assert torch.equal(back.as_tensor(), expected.as_tensor())
    assert back.applied_operations == []
