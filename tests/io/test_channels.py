"""Multi-channel reading: channel files and 4D NIfTI give (C, X, Y, Z) on channel 0's grid, in world mm."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.io.channels import Channels, onto_grid
from pipeline.io.discover import discover
from pipeline.io.geometry import grid_difference
from pipeline.transforms.load import LoadScand
from tests.conftest import make_affine, save_nifti


def ball(shape, affine, centre_mm, radius_mm, value=100.0):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = np.linalg.norm(xyz - np.asarray(centre_mm), axis=1) <= radius_mm
    return (inside.reshape(shape) * value).astype(np.float32)


def centroid_mm(array, affine, threshold):
    ijk = np.argwhere(array > threshold)
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).mean(axis=0)


def test_two_files_on_one_grid_stack_unchanged(tmp_path):
    affine = make_affine("oblique")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 12, 10, 8)).astype(np.float32)
    save_nifti(a, affine, tmp_path / "c_0000.nii.gz")
    save_nifti(b, affine, tmp_path / "c_0001.nii.gz")
    channels = Channels((str(tmp_path / "c_0000.nii.gz"), str(tmp_path / "c_0001.nii.gz")), ("FLAIR", "T1c"))

    image = LoadScand(["image"], channels=2)({"image": channels})["image"]

    assert tuple(image.shape) == (2, 12, 10, 8)
    np.testing.assert_array_equal(image[0].numpy(), a)
    np.testing.assert_array_equal(image[1].numpy(), b)
    np.testing.assert_allclose(np.asarray(image.affine), affine, atol=1e-6)


def test_4d_nifti_equals_channel_files(tmp_path):
    affine = make_affine("LPS")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 9, 8, 7)).astype(np.float32)
    save_nifti(np.stack([a, b], axis=-1), affine, tmp_path / "four_d.nii.gz")
    save_nifti(a, affine, tmp_path / "c_0000.nii.gz")
    save_nifti(b, affine, tmp_path / "c_0001.nii.gz")

    loader = LoadScand(["image"], channels=2)
    four_d = loader({"image": str(tmp_path / "four_d.nii.gz")})["image"]
    files = loader({"image": Channels((str(tmp_path / "c_0000.nii.gz"), str(tmp_path / "c_0001.nii.gz")))})["image"]

    assert tuple(four_d.shape) == (2, 9, 8, 7)
    np.testing.assert_array_equal(four_d.numpy(), files.numpy())
    np.testing.assert_allclose(np.asarray(four_d.affine), np.asarray(files.affine))


def test_channel_on_another_grid_lands_at_the_same_millimetres(tmp_path):
    """Channel 1 on a coarser, shifted, LPS grid: its ball comes out where it is in world coordinates."""
    affine0 = make_affine("oblique", spacing=(1.0, 1.0, 3.0), origin=(-20.0, -15.0, -12.0))
    shape0, shape1 = (40, 36, 12), (30, 28, 16)
    centre = affine0[:3, :3] @ np.array([22.0, 15.0, 6.0]) + affine0[:3, 3]
    affine1 = make_affine("LPS", spacing=(1.5, 1.5, 2.0))
    affine1[:3, 3] = centre - affine1[:3, :3] @ np.array([13.2, 15.7, 7.4])  # off-centre, off the voxel grid
    save_nifti(ball(shape0, affine0, centre, 6.0, 50.0), affine0, tmp_path / "c_0000.nii.gz")
    save_nifti(ball(shape1, affine1, centre, 6.0, 100.0), affine1, tmp_path / "c_0001.nii.gz")
    assert grid_difference(shape0, affine0, shape1, affine1)

    channels = Channels((str(tmp_path / "c_0000.nii.gz"), str(tmp_path / "c_0001.nii.gz")))
    image = LoadScand(["image"], channels=2)({"image": channels})["image"]

    assert tuple(image.shape) == (2,) + shape0
    np.testing.assert_allclose(np.asarray(image.affine), affine0, atol=1e-6)
    found = centroid_mm(image[1].numpy(), affine0, 50.0)
    assert np.linalg.norm(found - centre) < 1.0  # mm, on a 1x1x3 mm grid
    assert np.linalg.norm(centroid_mm(image[0].numpy(), affine0, 25.0) - centre) < 1.0


def test_onto_grid_identity_keeps_values():
    affine = make_affine("RAS")
    data = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    np.testing.assert_allclose(onto_grid(data, affine, data.shape, affine), data, atol=1e-5)


def test_channel_counts_are_checked(tmp_path):
    affine = make_affine("RAS")
    save_nifti(np.zeros((6, 5, 4, 2), np.float32), affine, tmp_path / "four_d.nii.gz")
    save_nifti(np.zeros((6, 5, 4), np.float32), affine, tmp_path / "three_d.nii.gz")
    with pytest.raises(InputError, match="expected a single 3D volume"):
        LoadScand(["image"])({"image": str(tmp_path / "four_d.nii.gz")})
    with pytest.raises(InputError, match=r"has 1 channel\(s\).*takes 2 \(FLAIR, T1c\)"):
        LoadScand(["image"], channels=2, channel_names=("FLAIR", "T1c"))({"image": str(tmp_path / "three_d.nii.gz")})
    with pytest.raises(InputError, match="has 2 channel"):
        LoadScand(["image"], channels=3)({"image": str(tmp_path / "four_d.nii.gz")})


def test_discovery_groups_channel_files_and_names_a_missing_channel(tmp_path):
    affine = make_affine("RAS")
    volume = np.zeros((6, 5, 4), np.float32)
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "sub/c_0000.nrrd", "sub/c_0001.nii.gz"):
        if name.endswith(".nrrd"):
            import SimpleITK as sitk

            (tmp_path / "sub").mkdir(exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(volume.T), str(tmp_path / name))
        else:
            save_nifti(volume, affine, tmp_path / name)
    save_nifti(np.zeros((6, 5, 4, 2), np.float32), affine, tmp_path / "d.nii.gz")

    single = discover(tmp_path)
    assert sorted(c.case_id for c in single.cases) == ["a", "a_2", "b", "d", "sub_c", "sub_c_2"]

    cases = {c.case_id: c for c in discover(tmp_path, channels=["FLAIR", "T1c"]).cases}
    assert sorted(cases) == ["a", "b", "d", "sub_c"]
    assert [s.split("/")[-1] for s in cases["a"].channels.sources] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert cases["a"].files == [str(tmp_path / "a_0000.nii.gz"), str(tmp_path / "a_0001.nii.gz")]
    assert cases["d"].channels is None  # one 4D file: read as all channels
    with pytest.raises(InputError, match=r"lacks channel 1 \(T1c\): expected .*b_0001\.nii\.gz"):
        LoadScand(["image"], channels=2)({"image": cases["b"].reader_input})
    image = LoadScand(["image"], channels=2)({"image": cases["sub_c"].reader_input})["image"]
    assert tuple(image.shape) == (2, 6, 5, 4)
