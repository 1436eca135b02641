"""Round trip: write_dicom_series, then SimpleITK + closest_canonical gives the same voxels in world space."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.errors import InputError
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.geometry import LPS_TO_RAS, affine_from_sitk, closest_canonical
from pipeline.synth.grid import rotation
from tests.helpers import assert_corners_at_same_world_position

SHAPE = (12, 10, 6)


def _affine(linear: np.ndarray, origin=(-31.5, 12.25, -80.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "RAS": _affine(np.diag([0.8, 0.8, 2.5])),
    "LPS": _affine(np.diag([-0.7, -0.9, 2.0])),
    "oblique": _affine(rotation(0, 15) @ rotation(1, 15) @ np.diag([0.8, 0.8, 2.5])),
    "feet-first": _affine(np.diag([0.8, -0.8, -2.5])),
    "sagittal-PIR": _affine(np.array([[0.0, 0.0, 1.2], [-0.9, 0.0, 0.0], [0.0, -0.9, 0.0]])),
}


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, 2000, size=SHAPE).astype(np.int16)
    volume[0, 0, 0] = -1024  # the lowest value the default intercept stores as 0
    volume[-1, -1, -1] = 3071
    return volume


def _read(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine_from_sitk(image)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_round_trip_matches_source_geometry(tmp_path, name):
    volume, affine = _volume(), AFFINES[name]
    paths = write_dicom_series(volume, affine, tmp_path / "series")
    assert [p.name for p in paths] == [f"IM_{k:04d}.dcm" for k in range(1, SHAPE[2] + 1)]

    array, read_affine = closest_canonical(*_read(tmp_path / "series"))
    expected, expected_affine = closest_canonical(volume, affine)
    np.testing.assert_allclose(read_affine, expected_affine, atol=1e-4)
    assert array.shape == expected.shape
    np.testing.assert_array_equal(array.astype(np.int32), expected.astype(np.int32))


def test_world_position_of_every_corner_voxel(tmp_path):
    volume, affine = _volume(1), AFFINES["oblique"]
    write_dicom_series(volume, affine, tmp_path / "s")
    array, read_affine = _read(tmp_path / "s")
    assert_corners_at_same_world_position(volume, affine, array, read_affine)


def test_header_fields(tmp_path):
    volume, affine = _volume(), AFFINES["oblique"]
    paths = write_dicom_series(volume, affine, tmp_path / "s", patient_id="P7", series_number=3)
    ds = pydicom.dcmread(paths[2])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[0])
    assert (ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (1, 16, 16, 15)
    assert ds.PatientID == "P7" and ds.SeriesNumber == 3 and ds.InstanceNumber == 3
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.8, 0.8])
    assert float(ds.SliceThickness) == pytest.approx(2.5)
    lps = LPS_TO_RAS @ affine
    position = lps[:3, :3] @ [0, 0, 2] + lps[:3, 3]  # voxel (0, 0, k=2)
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], position, atol=1e-6)
    np.testing.assert_allclose(
        [float(v) for v in ds.ImageOrientationPatient],
        [*(lps[:3, 0] / 0.8), *(lps[:3, 1] / 0.8)],
        atol=1e-9,
    )
    # stored values = HU - intercept; pixel_array rows run along j, columns along i
    np.testing.assert_array_equal(ds.pixel_array, (volume[:, :, 2].astype(np.int32) + 1024).T)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, volume[:, :, 2].T)


def test_float_volume_with_slope_is_rounded(tmp_path):
    volume = np.full(SHAPE, 12.6)
    volume[0] = -3.2
    paths = write_dicom_series(
        volume, AFFINES["RAS"], tmp_path / "s", rescale_intercept=0.0, rescale_slope=0.5
    )
    ds = pydicom.dcmread(paths[0])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.full(SHAPE[:2], 12.5)
    expected[0] = -3.0  # -3.2 / 0.5 = -6.4 is stored as -6
    np.testing.assert_array_equal(hu.T, expected)


def test_uids_are_deterministic_and_unique(tmp_path):
    volume, affine = _volume(), AFFINES["RAS"]
    a = write_dicom_series(volume, affine, tmp_path / "a", uid_entropy=["seed", "0"])
    b = write_dicom_series(volume, affine, tmp_path / "b", uid_entropy=["seed", "0"])
    c = write_dicom_series(volume, affine, tmp_path / "c", uid_entropy=["seed", "1"])
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    sops = {pydicom.dcmread(p).SOPInstanceUID for p in a + c}
    assert len(sops) == 2 * SHAPE[2]
    first = pydicom.dcmread(a[0])
    assert first.SeriesInstanceUID != pydicom.dcmread(c[0]).SeriesInstanceUID
    assert len({first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID}) == 3


def test_explicit_uids_are_used(tmp_path):
    paths = write_dicom_series(
        _volume(), AFFINES["RAS"], tmp_path / "s", study_uid="1.2.3", series_uid="1.2.3.4"
    )
    ds = pydicom.dcmread(paths[-1])
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3", "1.2.3.4")


def test_series_of_one_study_can_share_a_frame_of_reference(tmp_path):
    kwargs = {"study_uid": "1.2.3", "frame_of_reference_uid": "1.2.3.9", "modality": "MR",
              "rescale_intercept": 0.0}
    a = write_dicom_series(_volume(), AFFINES["RAS"], tmp_path / "a", series_uid="1.2.3.4", **kwargs)
    b = write_dicom_series(_volume(), AFFINES["RAS"], tmp_path / "b", series_uid="1.2.3.5", **kwargs)
    first, second = pydicom.dcmread(a[0]), pydicom.dcmread(b[0])
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID == "1.2.3.9"
    assert first.SeriesInstanceUID != second.SeriesInstanceUID and first.Modality == "MR"


@pytest.mark.parametrize(
    "volume, affine, message",
    [
        (np.zeros((4, 4)), AFFINES["RAS"], "3D volume"),
        (np.full(SHAPE, 40000.0), AFFINES["RAS"], "int16"),
        (np.zeros(SHAPE), _affine(np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]])), "orthogonal"),
    ],
)
def test_bad_input_is_rejected(tmp_path, volume, affine, message):
    with pytest.raises(InputError, match=message):
        write_dicom_series(volume, affine, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_refuses_non_empty_folder(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="empty folder"):
        write_dicom_series(_volume(), AFFINES["RAS"], tmp_path / "s")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["keep.txt"]
