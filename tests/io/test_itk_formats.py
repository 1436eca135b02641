"""NRRD and MHA/MHD scans, read through ``ScanReader`` and found by discovery: every voxel sits at the
world point SimpleITK gives it (``TransformIndexToPhysicalPoint``, LPS, flipped to RAS), for synthetic
oblique volumes and for the real pyradiomics NRRDs (../shared/data; skipped when absent)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from pipeline.io.discover import discover
from pipeline.io.reader import ScanReader

SHAPE = (7, 9, 5)  # i, j, k
SPACING = (0.7, 1.3, 2.9)
ORIGIN = (-12.5, 40.25, 7.75)  # LPS mm


def _oblique_image(mirror: bool) -> tuple[sitk.Image, np.ndarray]:
    """A float32 volume, array ``[i, j, k]``, with an oblique (optionally left-handed) direction."""
    rng = np.random.default_rng(1)
    array = rng.normal(size=SHAPE).astype(np.float32)
    direction = Rotation.from_euler("zyx", [23, -11, 37], degrees=True).as_matrix()
    if mirror:
        direction = direction @ np.diag([1.0, -1.0, 1.0])
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))  # sitk wants [k, j, i]
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction.ravel().tolist())
    return image, array


def _ras_point(image: sitk.Image, index) -> np.ndarray:
    x, y, z = image.TransformIndexToPhysicalPoint(tuple(int(v) for v in index))
    return np.array([-x, -y, z])


def _probe_indices(shape) -> list[tuple[int, int, int]]:
    corners = list(itertools.product(*[(0, s - 1) for s in shape]))
    return corners + [tuple(s // 2 for s in shape), (1, 2, 3) if min(shape) > 3 else (0, 0, 0)]


def _assert_same_world(read_array, read_affine, image: sitk.Image, array=None) -> None:
    reference = sitk.GetArrayFromImage(image).transpose(2, 1, 0) if array is None else array
    assert read_array.shape == reference.shape
    for index in _probe_indices(reference.shape):
        world = np.asarray(read_affine) @ np.array([*index, 1.0])
        np.testing.assert_allclose(world[:3], _ras_point(image, index), atol=1e-4, err_msg=str(index))
        assert read_array[index] == reference[index]


def _read(source):
    reader = ScanReader()
    return reader.get_data(reader.read(source))


@pytest.mark.parametrize("mirror", [False, True], ids=["rotation", "rotation+flip"])
@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_itk_file_voxels_at_simpleitk_world_points(tmp_path, suffix, mirror):
    image, array = _oblique_image(mirror)
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    written = sitk.ReadImage(str(path))  # what the file holds (NRRD/MHA store geometry in text)
    assert np.allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)

    read_array, meta = _read(str(path))
    _assert_same_world(read_array, meta["affine"], written, array)
    assert meta["source_format"] == "itk"


def test_itk_files_found_by_discovery_and_read_in_world_coordinates(tmp_path):
    image, array = _oblique_image(mirror=False)
    for name in ("a/scan_0000.nrrd", "b/scan.mha", "c/scan.mhd"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(tmp_path / "in" / name))
    found = discover(tmp_path / "in")
    assert [(c.case_id, c.kind) for c in found.cases] == [("a_scan", "itk"), ("b_scan", "itk"), ("c_scan", "itk")]
    assert found.skipped == []  # the .raw beside the .mhd is its pixel file, not an unknown file
    for case in found.cases:
        read_array, meta = _read(case.reader_input)
        _assert_same_world(read_array, meta["affine"], sitk.ReadImage(case.source), array)


# --- real NRRDs: pyradiomics images and lesion labels ----------------------------------------------------


@pytest.fixture
def pyradiomics(shared_data) -> Path:
    folder = shared_data / "labelled" / "pyradiomics"
    if not (folder / "brain1_image.nrrd").is_file():
        pytest.skip(f"pyradiomics sample NRRDs not present: {folder}")
    return folder


@pytest.mark.parametrize("case", ["brain1", "breast1"])
def test_real_nrrd_image_and_label_share_one_grid_in_world_coordinates(pyradiomics, tmp_path, case):
    for part in ("image", "label"):
        shutil.copy(pyradiomics / f"{case}_{part}.nrrd", tmp_path / f"{case}_{part}.nrrd")
    image_path, label_path = tmp_path / f"{case}_image.nrrd", tmp_path / f"{case}_label.nrrd"

    image, image_meta = _read(str(image_path))
    label, label_meta = _read(str(label_path))
    assert image.shape == label.shape
    np.testing.assert_allclose(image_meta["affine"], label_meta["affine"], atol=1e-4)
    assert label.max() > 0  # a real lesion label
    for array, meta, path in ((image, image_meta, image_path), (label, label_meta, label_path)):
        _assert_same_world(array, meta["affine"], sitk.ReadImage(str(path)))

    found = discover(tmp_path)
    assert sorted(c.case_id for c in found.cases) == [f"{case}_image", f"{case}_label"]
    for found_case in found.cases:
        array, meta = _read(found_case.reader_input)
        _assert_same_world(array, meta["affine"], sitk.ReadImage(found_case.source))


def test_real_nrrd_spacing_is_the_documented_one(pyradiomics):
    _, meta = _read(str(pyradiomics / "brain1_image.nrrd"))
    spacing = np.linalg.norm(np.asarray(meta["affine"])[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [0.78, 0.78, 6.5], atol=0.01)  # shared/data/README.md
