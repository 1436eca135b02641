"""DICOM discovery, grouping and stacking on synthetic pydicom-written series with known answers.

Orientations (axial, sagittal, coronal, oblique), head-first and feet-first, shuffled file names,
duplicate and missing slices, gantry tilt, several series / echoes / time points / image types in one
folder, non-image objects, selection rules and PHI-free case ids.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.cli import main
from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.io.dicom_stack import stack
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.discover import discover
from pipeline.io.geometry import closest_canonical
from pipeline.io.reader import ScanReader
from tests.conftest import make_affine
from tests.helpers import hu_volume

SHAPE = (20, 16, 10)


def _affine(name: str) -> np.ndarray:
    """Axial (head first / feet first), sagittal, coronal and oblique acquisitions, anisotropic voxels."""
    if name in ("RAS", "LPS", "oblique", "feet_first"):
        return make_affine(name)
    spacing = np.diag([0.7, 0.9, 3.0])
    directions = {  # RAS unit vectors of increasing i, j, k
        "sagittal": [(0, 1, 0), (0, 0, -1), (-1, 0, 0)],  # rows anterior, columns inferior, slices to the left
        "coronal": [(1, 0, 0), (0, 0, -1), (0, 1, 0)],  # rows right, columns inferior, slices anterior
    }[name]
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions, float).T @ spacing
    affine[:3, 3] = (-20.0, 35.0, 10.0)
    return affine


def _write(folder: Path, volume=None, affine=None, **kwargs) -> list[Path]:
    volume = hu_volume(SHAPE) if volume is None else volume
    affine = make_affine("LPS") if affine is None else affine
    return write_dicom_series(volume, affine, folder, uid_entropy=[str(folder)], **kwargs)


def _edit(paths, new_uids: bool = True, **attributes) -> None:
    """Set header attributes on each file (and give each a new SOPInstanceUID)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for key, value in attributes.items():
            setattr(ds, key, value)
        if new_uids:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path)


def _read(case):
    reader = ScanReader()
    return reader.get_data(reader.read(case.reader_input))


def _expected(volume, affine):
    return closest_canonical(volume, affine)


# --- orientations and file order -------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "feet_first", "oblique", "sagittal", "coronal"])
def test_orientations_read_back_exactly_in_world_coordinates(tmp_path, orientation):
    volume, affine = hu_volume(SHAPE, seed=3), _affine(orientation)
    _write(tmp_path / "in" / "series", volume, affine)

    found = discover(tmp_path / "in")
    assert [c.case_id for c in found.cases] == ["series"]
    array, meta = _read(found.cases[0])

    want_array, want_affine = _expected(volume, affine)
    np.testing.assert_array_equal(array, want_array)
    np.testing.assert_allclose(meta["affine"], want_affine, atol=1e-4)


def test_shuffled_file_names_without_extension_stack_by_position(tmp_path):
    volume, affine = hu_volume(SHAPE, seed=4), make_affine("oblique")
    paths = _write(tmp_path / "in" / "s", volume, affine)
    names = list(range(len(paths)))
    random.Random(0).shuffle(names)
    for path, n in zip(paths, names):
        path.rename(path.with_name(f"IMG{n:04d}"))  # InstanceNumber no longer follows the file names
    _edit(sorted((tmp_path / "in" / "s").iterdir()), new_uids=False, InstanceNumber=1)

    array, meta = _read(discover(tmp_path / "in").cases[0])

    want_array, want_affine = _expected(volume, affine)
    np.testing.assert_array_equal(array, want_array)
    np.testing.assert_allclose(meta["affine"], want_affine, atol=1e-4)


# --- inconsistent series ---------------------------------------------------------------------------


def test_missing_slice_is_refused_by_default_and_resampled_on_request(tmp_path):
    volume = hu_volume(SHAPE, seed=5)
    paths = _write(tmp_path / "in" / "gap", volume, make_affine("LPS"))
    paths[4].unlink()

    case = discover(tmp_path / "in").cases[0]
    with pytest.raises(InputError, match=r"case gap: CT series 1.*9 files.*not uniform.*input.on_missing_slices=resample"):
        _read(case)

    case = discover(tmp_path / "in", InputConfig(on_missing_slices="resample")).cases[0]
    array, meta = _read(case)
    want_array, want_affine = _expected(volume, make_affine("LPS"))
    assert array.shape == want_array.shape  # the regular grid of the complete series
    np.testing.assert_allclose(meta["affine"], want_affine, atol=1e-4)
    kept = [k for k in range(SHAPE[2]) if k != 4]
    np.testing.assert_array_equal(array[..., kept], want_array[..., kept])
    np.testing.assert_allclose(array[..., 4], (want_array[..., 3].astype(float) + want_array[..., 5]) / 2, atol=0.5)


def test_duplicate_slice_is_refused_by_default_and_dropped_on_request(tmp_path):
    volume = hu_volume(SHAPE, seed=6)
    paths = _write(tmp_path / "in" / "dup", volume, make_affine("RAS"))
    copy = paths[3].with_name("copy_of_3.dcm")
    shutil.copy(paths[3], copy)
    _edit([copy], AcquisitionTime="130000")  # a second acquisition at the same position

    case = discover(tmp_path / "in").cases[0]
    with pytest.raises(InputError, match=r"1 slice position\(s\) occur more than once.*on_duplicate_slices=drop"):
        _read(case)

    case = discover(tmp_path / "in", InputConfig(on_duplicate_slices="drop")).cases[0]
    array, _ = _read(case)
    np.testing.assert_array_equal(array, _expected(volume, make_affine("RAS"))[0])


def test_identical_copy_of_an_instance_is_used_once(tmp_path):
    paths = _write(tmp_path / "in" / "s", hu_volume(SHAPE), make_affine("RAS"))
    shutil.copy(paths[2], tmp_path / "in" / "s" / "same_instance_again.dcm")
    found = discover(tmp_path / "in")
    assert len(found.cases) == 1
    assert _read(found.cases[0])[0].shape == SHAPE


def _tilted_series(tmp_path, volume):
    """Axial slices whose positions move one pixel along the row direction per slice (gantry tilt)."""
    affine = make_affine("RAS", spacing=(1.0, 1.0, 2.0))
    paths = _write(tmp_path / "in" / "tilt", volume, affine)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        row_dir = np.asarray(ds.ImageOrientationPatient[:3], float)
        ds.ImagePositionPatient = list(np.asarray(ds.ImagePositionPatient, float) + k * 1.0 * row_dir)
        ds.GantryDetectorTilt = 26.6
        ds.save_as(path)
    return affine


def test_gantry_tilt_is_refused_by_default(tmp_path):
    _tilted_series(tmp_path, hu_volume(SHAPE))
    with pytest.raises(InputError, match=r"gantry tilt of about 26\.6 degrees.*on_gantry_tilt=resample"):
        _read(discover(tmp_path / "in").cases[0])


def test_gantry_tilt_resampled_onto_an_orthogonal_grid(tmp_path):
    volume = hu_volume(SHAPE, seed=7)
    _tilted_series(tmp_path, volume)
    case = discover(tmp_path / "in", InputConfig(on_gantry_tilt="resample")).cases[0]

    array, affine = stack(case.volume)  # before re-orientation: [column, row, slice]

    # Slice k's pixel column c sits at grid column c + k; the grid is orthogonal (no shear).
    for k in range(SHAPE[2]):
        np.testing.assert_array_equal(array[k:, :, k], volume[: SHAPE[0] - k, :, k])
        assert np.all(array[:k, :, k] == volume.min())
    linear = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(linear.T @ linear, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.0, 1.0, 2.0], atol=1e-6)


# --- several volumes in one series or folder -------------------------------------------------------


def test_two_echoes_of_one_series_become_two_cases(tmp_path):
    uid = generate_uid()
    first = _write(tmp_path / "a", hu_volume(SHAPE, seed=1), make_affine("LPS"), series_uid=uid, modality="MR")
    second = _write(tmp_path / "b", hu_volume(SHAPE, seed=2), make_affine("LPS"), series_uid=uid, modality="MR")
    _edit(first, EchoNumbers=1)
    _edit(second, EchoNumbers=2)
    folder = tmp_path / "in" / "mr"
    folder.mkdir(parents=True)
    for n, path in enumerate(first + second):
        shutil.move(path, folder / f"f{n:03d}")

    cases = discover(tmp_path / "in").cases

    assert [(c.case_id, c.echo_number, len(c.files)) for c in cases] == [("mr_e1", "1", 10), ("mr_e2", "2", 10)]
    np.testing.assert_array_equal(_read(cases[1])[0], _expected(hu_volume(SHAPE, seed=2), make_affine("LPS"))[0])


def test_repeated_positions_split_into_time_points_in_acquisition_order(tmp_path):
    uid = generate_uid()
    late = _write(tmp_path / "a", hu_volume(SHAPE, seed=1), make_affine("RAS"), series_uid=uid)
    early = _write(tmp_path / "b", hu_volume(SHAPE, seed=2), make_affine("RAS"), series_uid=uid)
    _edit(late, AcquisitionTime="120500")
    _edit(early, AcquisitionTime="120000")
    folder = tmp_path / "in" / "dyn"
    folder.mkdir(parents=True)
    for n, path in enumerate(late + early):
        shutil.move(path, folder / f"{n:03d}.dcm")

    cases = discover(tmp_path / "in").cases

    assert [c.case_id for c in cases] == ["dyn_t1", "dyn_t2"]
    np.testing.assert_array_equal(_read(cases[0])[0], _expected(hu_volume(SHAPE, seed=2), make_affine("RAS"))[0])
    np.testing.assert_array_equal(_read(cases[1])[0], _expected(hu_volume(SHAPE, seed=1), make_affine("RAS"))[0])


def test_magnitude_and_phase_split_by_image_type(tmp_path):
    uid = generate_uid()
    mag = _write(tmp_path / "a", hu_volume(SHAPE, seed=1), make_affine("RAS"), series_uid=uid, modality="MR")
    pha = _write(tmp_path / "b", hu_volume(SHAPE, seed=2), make_affine("RAS"), series_uid=uid, modality="MR")
    _edit(mag, ImageType=["ORIGINAL", "PRIMARY", "M", "ND"])
    _edit(pha, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"])
    folder = tmp_path / "in" / "swi"
    folder.mkdir(parents=True)
    for n, path in enumerate(mag + pha):
        shutil.move(path, folder / f"{n:03d}")

    cases = discover(tmp_path / "in").cases
    assert [(c.case_id, c.image_type) for c in cases] == [
        ("swi_m", "ORIGINAL\\PRIMARY\\M\\ND"), ("swi_p", "ORIGINAL\\PRIMARY\\P\\ND")]


def test_three_plane_localizer_is_split_by_orientation_and_skipped_by_default(tmp_path):
    uid = generate_uid()
    folder = tmp_path / "in" / "loc"
    folder.mkdir(parents=True)
    planes = {"RAS": make_affine("RAS"), "sagittal": _affine("sagittal"), "coronal": _affine("coronal")}
    for name, affine in planes.items():
        for path in _write(tmp_path / name, hu_volume((16, 16, 3)), affine, series_uid=uid):
            shutil.move(path, folder / f"{name}_{path.name}")
    _edit(sorted(folder.iterdir()), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])

    found = discover(tmp_path / "in")
    assert found.cases == []
    assert sorted(s.case_id for s in found.skipped) == ["loc_ax", "loc_cor", "loc_sag"]
    assert all("LOCALIZER" in s.reason and "input.exclude_image_type" in s.reason for s in found.skipped)

    cases = discover(tmp_path / "in", InputConfig(exclude_image_type=[])).cases
    assert [(c.case_id, len(c.files)) for c in cases] == [("loc_ax", 3), ("loc_cor", 3), ("loc_sag", 3)]


def test_series_across_subfolders_is_one_volume(tmp_path):
    volume = hu_volume(SHAPE, seed=8)
    paths = _write(tmp_path / "x", volume, make_affine("LPS"))
    for n, path in enumerate(paths):
        target = tmp_path / "in" / "study" / f"part{n % 2}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
    cases = discover(tmp_path / "in").cases
    assert [c.case_id for c in cases] == ["study"]
    np.testing.assert_array_equal(_read(cases[0])[0], _expected(volume, make_affine("LPS"))[0])


# --- what is skipped, selection, case ids ----------------------------------------------------------


def _non_image(path: Path, sop_class: str, with_pixels: bool) -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    if with_pixels:
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated = 1
        ds.PixelData = b"\0\0"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_non_images_text_files_and_empty_folders_are_skipped_with_reasons(tmp_path):
    _write(tmp_path / "in" / "ct", hu_volume(SHAPE), make_affine("RAS"))
    other = tmp_path / "in" / "objects"
    other.mkdir()
    _non_image(other / "report", "1.2.840.10008.5.1.4.1.1.88.11", with_pixels=False)  # Basic Text SR
    _non_image(other / "seg", "1.2.840.10008.5.1.4.1.1.66.4", with_pixels=True)  # Segmentation
    (other / "notes.txt").write_text("not a scan")
    (tmp_path / "in" / "empty").mkdir()
    (tmp_path / "in" / "ct" / "DICOMDIR").write_bytes((tmp_path / "in" / "ct" / "IM_0001.dcm").read_bytes())

    found = discover(tmp_path / "in")

    assert [c.case_id for c in found.cases] == ["ct"]
    reasons = " | ".join(s.reason for s in found.skipped)
    assert "no pixel data (Basic Text SR Storage)" in reasons
    assert "segmentation (SEG) object" in reasons
    assert "notes.txt" in reasons and "not recognised as a scan" in reasons
    assert "empty folder" in reasons
    assert len(found.cases[0].files) == SHAPE[2]  # DICOMDIR not counted as a slice


def test_selection_rules_list_reasons(tmp_path):
    _write(tmp_path / "in" / "ct", hu_volume(SHAPE), make_affine("RAS"), series_description="Abdomen 1.0 B30f")
    _write(tmp_path / "in" / "mr", hu_volume(SHAPE), make_affine("RAS"), modality="MR", series_description="T2 ax")

    found = discover(tmp_path / "in", InputConfig(modalities=["CT"], min_slices=5))
    assert [c.case_id for c in found.cases] == ["ct"]
    assert [s.case_id for s in found.skipped] == ["mr"] and "modality MR not in input.modalities" in found.skipped[0].reason

    found = discover(tmp_path / "in", InputConfig(min_slices=11))
    assert found.cases == [] and all("fewer than input.min_slices=11" in s.reason for s in found.skipped)

    found = discover(tmp_path / "in", InputConfig(series_description="b30f"))
    assert [c.case_id for c in found.cases] == ["ct"]
    found = discover(tmp_path / "in", InputConfig(exclude_series_description="^T2"))
    assert [c.case_id for c in found.cases] == ["ct"]


def test_case_ids_are_stable_and_free_of_patient_identifiers(tmp_path):
    _write(tmp_path / "in" / "DOE_JOHN" / "series", hu_volume(SHAPE), make_affine("RAS"), patient_id="DOE^JOHN")
    _write(tmp_path / "in" / "ROE_JANE" / "series", hu_volume(SHAPE), make_affine("RAS"), patient_id="ROE^JANE",
           series_uid=generate_uid())
    ids = [c.case_id for c in discover(tmp_path / "in").cases]
    assert len(ids) == 2 and all(i.startswith("patient-") and i.endswith("_series") for i in ids)
    assert not any("DOE" in i.upper() or "ROE" in i.upper() for i in ids) and ids[0] != ids[1]
    assert ids == [c.case_id for c in discover(tmp_path / "in").cases]  # stable


# --- convert ---------------------------------------------------------------------------------------


def test_convert_writes_nifti_and_index_with_failed_and_skipped_rows(tmp_path):
    import csv

    import nibabel as nib

    volume, affine = hu_volume(SHAPE, seed=9), make_affine("oblique")
    _write(tmp_path / "in" / "good", volume, affine, series_number=7, series_description="good one")
    paths = _write(tmp_path / "in" / "gappy", hu_volume(SHAPE), make_affine("RAS"))
    paths[5].unlink()
    (tmp_path / "in" / "readme.txt").write_text("hello")

    code = main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "-q"])

    assert code == 1  # one volume failed, one converted
    rows = {r["case_id"] or r["source"]: r for r in csv.DictReader(open(tmp_path / "out" / "index.csv"))}
    good = rows["good"]
    assert good["status"] == "converted" and good["nifti"] == "good.nii.gz" and good["series_number"] == "7"
    assert good["series_description"] == "good one" and good["modality"] == "CT" and good["n_files"] == "10"
    assert good["shape"] == "x".join(map(str, _expected(volume, affine)[0].shape))
    for column in ("case_id", "nifti", "series_uid", "series_number", "series_description", "modality",
                   "echo_number", "image_type", "n_files", "shape", "spacing_mm", "status", "reason"):
        assert column in good
    assert rows["gappy"]["status"] == "failed" and "not uniform" in rows["gappy"]["reason"]
    assert any(r["status"] == "skipped" and "readme.txt" in r["reason"] for r in rows.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz", "index.csv"]  # nothing partial

    image = nib.load(str(tmp_path / "out" / "good.nii.gz"))
    want_array, want_affine = _expected(volume, affine)
    np.testing.assert_array_equal(np.asarray(image.dataobj), want_array)
    np.testing.assert_allclose(image.affine, want_affine, atol=1e-4)

    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out2"), "input.on_missing_slices=resample",
                 "-q"]) == 0


def test_convert_of_a_folder_without_scans_fails(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x")
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "-q"]) == 2


@pytest.mark.parametrize("damage", ["truncated", "unsupported_syntax"])
def test_undecodable_slice_names_the_case_and_the_file(tmp_path, damage):
    from pydicom.encaps import encapsulate

    paths = _write(tmp_path / "in" / "s", hu_volume(SHAPE), make_affine("RAS"))
    if damage == "truncated":
        paths[3].write_bytes(paths[3].read_bytes()[:-100])  # header intact, pixel data cut short
    else:  # MPEG-2 video: no decoder for it
        ds = pydicom.dcmread(paths[3])
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"
        ds.save_as(paths[3], enforce_file_format=True)

    case = discover(tmp_path / "in").cases[0]
    with pytest.raises(InputError, match=rf"cannot decode case s: CT series 1 .*10 files.*first bad file: {paths[3].name}"):
        _read(case)
