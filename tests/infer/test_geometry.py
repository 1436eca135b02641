"""Masks land exactly on the source grid: a stand-in model that returns the ground-truth label must
write back exactly that label, voxel for voxel, for RAS, LPS and oblique NIfTI and for DICOM series."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.batch import segment_folder
from pipeline.config import load_config
from pipeline.infer import Segmenter
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.geometry import closest_canonical
from tests.conftest import blob_label, make_affine, save_nifti


class LabelEcho(torch.nn.Module):
    """Stand-in network: the input *is* the label (window [0, 1] keeps 0/1); logits pick it back."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x):
        return torch.cat([(0.5 - x) * 20, (x - 0.5) * 20], dim=1)


def echo_config(spacing):
    return load_config(None, [
        f"preprocess.spacing={spacing}",
        "preprocess.intensity.window=[0, 1]",
        "preprocess.crop_foreground=true",
        "preprocess.crop_margin=2",
        "inference.roi_size=[16, 16, 8]",
        "inference.overlap=0.25",
        "inference.min_component_mm3=0",
    ])


def world_points(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask > 0)
    return (affine[:3, :3] @ ijk.T).T + affine[:3, 3]


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique", "feet_first"])
@pytest.mark.parametrize("spacing", ["null", "[0.8, 0.9, 2.5]"])
def test_nifti_label_comes_back_exactly(tmp_path, orientation, spacing):
    label = blob_label()
    affine = make_affine(orientation)
    save_nifti(label, affine, tmp_path / "in" / "case_0000.nii.gz")

    results = segment_folder(tmp_path / "in", tmp_path / "out", Segmenter(LabelEcho(), echo_config(spacing), "cpu"))

    assert [r.status for r in results] == ["done"]
    out = nib.load(str(tmp_path / "out" / "case_seg.nii.gz"))
    assert out.shape == label.shape
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    assert out.header["sform_code"] == 1 and out.header["qform_code"] == 1
    np.testing.assert_array_equal(np.asarray(out.dataobj), label)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique", "feet_first"])
def test_dicom_label_comes_back_in_dcm2niix_geometry(tmp_path, orientation):
    label = blob_label()
    affine = make_affine(orientation)
    write_dicom_series(label.astype(np.int16), affine, tmp_path / "in" / "series")
    expected, expected_affine = closest_canonical(label, affine)

    results = segment_folder(tmp_path / "in", tmp_path / "out", Segmenter(LabelEcho(), echo_config("null"), "cpu"))

    assert [r.status for r in results] == ["done"]
    out = nib.load(str(tmp_path / "out" / "series_seg.nii.gz"))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.affine, expected_affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)
    # The same voxels in world coordinates as the label in its original (non-canonical) grid.
    got = world_points(np.asarray(out.dataobj), out.affine)
    want = world_points(label, affine)
    np.testing.assert_allclose(got[np.lexsort(got.T)], want[np.lexsort(want.T)], atol=1e-3)


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_resampled_prediction_stays_in_place(tmp_path, orientation):
    """With resampling to a coarser grid the mask cannot be exact, but it must not move."""
    affine = make_affine(orientation)
    shape = (48, 44, 14)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ [21.3, 23.7, 6.2] + affine[:3, 3]
    label = (np.linalg.norm(world - centre, axis=1) < 8.5).reshape(shape).astype(np.uint8)  # a 17 mm ball
    save_nifti(label, affine, tmp_path / "in" / "case.nii.gz")

    segment_folder(tmp_path / "in", tmp_path / "out",
                   Segmenter(LabelEcho(), echo_config("[1.3, 1.45, 2.5]"), "cpu"))

    out = nib.load(str(tmp_path / "out" / "case_seg.nii.gz"))
    mask = np.asarray(out.dataobj)
    dice = 2 * (mask & label).sum() / (mask.sum() + label.sum())
    assert dice > 0.9
    centroid_error = np.linalg.norm(world_points(mask, affine).mean(0) - world_points(label, affine).mean(0))
    assert centroid_error < 0.3  # mm; a one-voxel shift would be >= 0.8 mm
