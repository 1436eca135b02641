"""NaN/Inf voxels fail a scan with their count. SimpleITK (niftilib) reads them in a NIfTI as 0 — checked
here so that the day it stops, the raw-bytes check can go — so float NIfTI files are counted from
their own bytes where the array read holds zeros."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.io.read_scan import _nonfinite_in_file, read_scan
from tests.conftest import make_affine, save_nifti


def _volume(bad_values=()) -> np.ndarray:
    volume = np.random.default_rng(0).normal(40, 10, size=(20, 18, 7)).astype(np.float32)
    volume[:3] = 0.0  # exact zeros: where a NaN read as 0 could hide
    for k, value in enumerate(bad_values):
        volume[5 + k, 4, 3] = value
    return volume


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_simpleitk_reads_nan_nifti_voxels_as_zero(tmp_path, suffix):
    import SimpleITK as sitk

    path = save_nifti(_volume([np.nan, np.inf]), make_affine("RAS"), tmp_path / f"scan{suffix}")
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T
    assert np.isfinite(voxels).all() and voxels[5, 4, 3] == 0 and voxels[6, 4, 3] == 0


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nan_and_inf_fail_the_scan_with_their_count(tmp_path, suffix):
    path = save_nifti(_volume([np.nan, np.inf, -np.inf]), make_affine("RAS"), tmp_path / f"scan{suffix}")
    with pytest.raises(InputError, match=r"holds 3 NaN/Inf voxel\(s\)"):
        read_scan(str(path))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_finite_float_scans_with_zeros_are_read(tmp_path, suffix):
    volume = _volume()
    path = save_nifti(volume, make_affine("RAS"), tmp_path / f"scan{suffix}")
    np.testing.assert_array_equal(read_scan(str(path)).array, volume)


def test_the_raw_count_streams_a_large_gzip(tmp_path):
    import nibabel as nib

    volume = np.zeros((64, 64, 300), np.float32)  # 4.9 MB: more than one read chunk
    volume[63, 63, 299] = np.nan
    volume[0, 0, 0] = np.inf
    path = save_nifti(volume, make_affine("RAS"), tmp_path / "scan.nii.gz")
    assert _nonfinite_in_file(path, nib.load(str(path))) == 2
