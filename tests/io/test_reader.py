"""Reading scans (NIfTI and DICOM series), writing masks, and discovering cases under a folder."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.discover import discover_cases
from pipeline.io.geometry import closest_canonical
from pipeline.io.reader import ScanReader
from pipeline.io.write import write_mask
from pipeline.transforms.load import LoadScand
from tests.conftest import make_affine, save_nifti
from tests.helpers import assert_corners_at_same_world_position, hu_volume, merge_series

SHAPE = (24, 20, 12)
ORIENTATIONS = ["RAS", "LPS", "oblique", "feet_first"]


def read_direct(source):
    reader = ScanReader()
    return reader.get_data(reader.read(source))


def load(source):
    return LoadScand(["image"])({"image": source})["image"]


# --- NIfTI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_nifti_round_trip_through_loadscand(tmp_path, orientation):
    volume, affine = hu_volume(SHAPE), make_affine(orientation)
    path = save_nifti(volume, affine, tmp_path / "scan.nii.gz")

    image = load(str(path))

    assert tuple(image.shape) == (1, *SHAPE)
    assert image.dtype == torch.int16  # the file's dtype: preprocessing converts to float32
    np.testing.assert_allclose(np.asarray(image.meta["affine"]), nib.load(str(path)).affine, atol=1e-6)
    np.testing.assert_array_equal(image[0].numpy(), volume)
    assert image.meta["source_format"] == "nifti"
    assert image.meta["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(np.asarray(image.meta["spatial_shape"]), SHAPE)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_nifti_read_directly_keeps_file_grid(tmp_path, orientation):
    volume, affine = hu_volume(SHAPE, seed=1), make_affine(orientation)
    path = save_nifti(volume, affine, tmp_path / "scan.nii")

    array, meta = read_direct(path)

    assert array.shape == SHAPE and array.dtype == np.int16
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-6)
    np.testing.assert_allclose(meta["original_affine"], affine, atol=1e-6)
    assert meta["source_format"] == "nifti"


def test_nifti_with_singleton_fourth_axis_is_3d(tmp_path):
    volume = hu_volume(SHAPE)
    path = save_nifti(volume[..., None], make_affine("RAS"), tmp_path / "scan.nii.gz")
    array, _ = read_direct(path)
    assert array.shape == SHAPE
    np.testing.assert_array_equal(array, volume)


# --- DICOM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_dicom_matches_nifti_of_same_volume(tmp_path, orientation):
    volume, affine = hu_volume(SHAPE, seed=2), make_affine(orientation)
    write_dicom_series(volume, affine, tmp_path / "series")
    nifti = save_nifti(volume, affine, tmp_path / "scan.nii.gz")

    dicom_image = load(str(tmp_path / "series"))
    nifti_image = load(str(nifti))
    expected, expected_affine = closest_canonical(
        nifti_image[0].numpy(), np.asarray(nifti_image.meta["affine"])
    )

    assert dicom_image.meta["source_format"] == "dicom"
    assert tuple(dicom_image.shape[1:]) == expected.shape
    np.testing.assert_allclose(np.asarray(dicom_image.meta["affine"]), expected_affine, atol=1e-4)
    np.testing.assert_array_equal(dicom_image[0].numpy(), expected)


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_dicom_voxels_sit_at_the_same_world_position(tmp_path, orientation):
    volume, affine = hu_volume(SHAPE, seed=3), make_affine(orientation)
    write_dicom_series(volume, affine, tmp_path / "series")
    array, meta = read_direct(tmp_path / "series")
    read_affine = meta["affine"]
    assert_corners_at_same_world_position(volume, affine, array, read_affine)


def test_dicom_hu_values_survive_the_intercept(tmp_path):
    volume = hu_volume(SHAPE, seed=4)
    write_dicom_series(volume, make_affine("RAS"), tmp_path / "series", rescale_intercept=-1024.0)
    array, meta = read_direct(tmp_path / "series")
    assert array.min() == -1024 and array.max() == 3071
    np.testing.assert_array_equal(array, volume)  # RAS input: the canonical grid is the input grid


def test_dicom_list_of_files_reads_like_the_folder(tmp_path):
    volume, affine = hu_volume(SHAPE, seed=5), make_affine("LPS")
    paths = write_dicom_series(volume, affine, tmp_path / "series")
    from_folder, meta_folder = read_direct(tmp_path / "series")
    from_files, meta_files = read_direct([str(p) for p in paths])
    np.testing.assert_array_equal(from_files, from_folder)
    np.testing.assert_allclose(meta_files["affine"], meta_folder["affine"])


def test_two_series_in_one_folder_is_refused(tmp_path):
    write_dicom_series(hu_volume(SHAPE), make_affine("RAS"), tmp_path / "a", uid_entropy=["a"])
    write_dicom_series(
        hu_volume(SHAPE), make_affine("RAS"), tmp_path / "b", uid_entropy=["b"], series_number=2
    )
    merge_series([tmp_path / "a", tmp_path / "b"], tmp_path / "both")
    with pytest.raises(InputError) as info:
        read_direct(tmp_path / "both")
    assert "2 DICOM volumes" in str(info.value) and str(tmp_path / "both") in str(info.value)


# --- errors ----------------------------------------------------------------------------------------


def _truncated(tmp_path):
    path = save_nifti(hu_volume((40, 40, 20)), make_affine("RAS"), tmp_path / "cut.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI header at all" * 20))
    return path


def _plain_garbage(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_text("hello, I am a text file")
    return path


def _empty_folder(tmp_path):
    folder = tmp_path / "no_dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("nothing here")
    return folder


def _four_d(tmp_path):
    return save_nifti(np.zeros((*SHAPE, 2), np.int16), make_affine("RAS"), tmp_path / "two_volumes.nii.gz")


def _missing(tmp_path):
    return tmp_path / "missing.nii.gz"


@pytest.mark.parametrize(
    "make, fragment",
    [
        (_missing, "scan not found"),
        (_truncated, "cannot read NIfTI"),
        (_garbage, "cannot read NIfTI"),
        (_plain_garbage, "cannot read NIfTI"),
        (_empty_folder, "no DICOM images found"),
        (_four_d, "expected a single 3D volume"),
    ],
)
@pytest.mark.parametrize("via", ["reader", "loadscand"])
def test_bad_input_raises_input_error_naming_the_path(tmp_path, make, fragment, via):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        if via == "reader":
            read_direct(path)
        else:
            load(str(path))
    message = str(info.value)
    assert fragment in message
    assert str(path) in message
    assert "\n" not in message


def test_4d_error_reports_the_shape(tmp_path):
    with pytest.raises(InputError, match=r"\(24, 20, 12, 2\)"):
        read_direct(_four_d(tmp_path))


# --- write_mask ------------------------------------------------------------------------------------


def _mask(seed=0):
    return (np.random.default_rng(seed).random(SHAPE) > 0.7).astype(np.int64)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_write_mask_without_source(tmp_path, orientation):
    mask, affine = _mask(), make_affine(orientation)
    out = write_mask(mask, affine, tmp_path / "out" / "case_seg.nii.gz")
    image = nib.load(str(out))
    assert out == tmp_path / "out" / "case_seg.nii.gz"
    assert image.shape == SHAPE and image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(image.dataobj), mask)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case_seg.nii.gz"]


@pytest.mark.parametrize("sform_code, qform_code", [(2, 1), (1, 0), (4, 2)])
def test_write_mask_keeps_nifti_source_header_codes(tmp_path, sform_code, qform_code):
    affine = make_affine("oblique")
    source_image = nib.Nifti1Image(hu_volume(SHAPE).astype(np.float32), affine)
    source_image.set_sform(affine, code=sform_code)
    source_image.set_qform(affine, code=qform_code)
    source = tmp_path / "scan.nii.gz"
    nib.save(source_image, str(source))
    mask = _mask(1)

    out = write_mask(mask, affine, tmp_path / "out" / "scan_seg.nii.gz", source=source)

    image = nib.load(str(out))
    assert image.get_data_dtype() == np.uint8 and image.shape == SHAPE
    assert int(image.header["sform_code"]) == sform_code
    assert int(image.header["qform_code"]) == qform_code
    np.testing.assert_allclose(image.affine, nib.load(str(source)).affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(image.dataobj), mask)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scan_seg.nii.gz"]


def test_write_mask_ignores_source_of_other_shape(tmp_path):
    affine = make_affine("LPS")
    source_image = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), affine)
    source_image.set_sform(affine, code=2)
    nib.save(source_image, str(tmp_path / "small.nii.gz"))
    out = write_mask(_mask(), affine, tmp_path / "m.nii.gz", source=tmp_path / "small.nii.gz")
    image = nib.load(str(out))
    assert image.shape == SHAPE and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)


def test_write_mask_overwrites_atomically(tmp_path):
    affine = make_affine("RAS")
    out = tmp_path / "m.nii.gz"
    write_mask(np.zeros(SHAPE, np.uint8), affine, out)
    write_mask(np.ones(SHAPE, np.uint8), affine, out)
    assert np.asarray(nib.load(str(out)).dataobj).min() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]


@pytest.mark.parametrize("shape", [(24, 20), (24, 20, 12, 1)])
def test_write_mask_refuses_non_3d(tmp_path, shape):
    out = tmp_path / "m.nii.gz"
    with pytest.raises(InputError) as info:
        write_mask(np.zeros(shape, np.uint8), make_affine("RAS"), out)
    assert "3D" in str(info.value) and str(out) in str(info.value) and str(shape) in str(info.value)
    assert not out.exists()


# --- discover_cases --------------------------------------------------------------------------------


def test_discover_nifti_case_ids(tmp_path):
    affine = make_affine("RAS")
    save_nifti(np.zeros((4, 4, 4), np.int16), affine, tmp_path / "in" / "liver_007_0000.nii.gz")
    save_nifti(np.zeros((4, 4, 4), np.int16), affine, tmp_path / "in" / "brain.nii")
    save_nifti(np.zeros((4, 4, 4), np.int16), affine, tmp_path / "in" / "sub" / "x_0000.nii.gz")

    cases = discover_cases(tmp_path / "in")

    assert [(c.case_id, c.kind) for c in cases] == [
        ("brain", "nifti"), ("liver_007", "nifti"), ("sub_x", "nifti")
    ]
    assert cases[1].source == str(tmp_path / "in" / "liver_007_0000.nii.gz")


def test_discover_dicom_by_content_without_extension(tmp_path):
    paths = write_dicom_series(hu_volume(SHAPE), make_affine("RAS"), tmp_path / "in" / "ct_series")
    for p in paths:
        p.rename(p.with_suffix(""))
    (tmp_path / "in" / "ct_series" / "DICOMDIR").write_bytes(paths[0].with_suffix("").read_bytes())
    (tmp_path / "in" / "ct_series" / "notes.txt").write_text("not a scan")
    (tmp_path / "in" / "ct_series" / "junk.bin").write_bytes(bytes(range(256)) * 2)

    cases = discover_cases(tmp_path / "in")

    assert len(cases) == 1
    case = cases[0]
    assert case.case_id == "ct_series" and case.kind == "dicom"
    assert sorted(case.files) == sorted(str(p.with_suffix("")) for p in paths)
    assert case.display_source == str(tmp_path / "in" / "ct_series")
    array, meta = read_direct(case.source)  # the discovered file list reads as one volume
    assert array.shape == SHAPE and meta["source_format"] == "dicom"


def test_discover_two_series_in_one_folder(tmp_path):
    write_dicom_series(
        hu_volume(SHAPE), make_affine("RAS"), tmp_path / "a", uid_entropy=["a"], series_number=3
    )
    write_dicom_series(hu_volume((24, 20, 8)), make_affine("LPS"), tmp_path / "b", uid_entropy=["b"],
                       series_number=5)
    merge_series([tmp_path / "a", tmp_path / "b"], tmp_path / "in" / "study")

    cases = discover_cases(tmp_path / "in")

    assert [c.case_id for c in cases] == ["study_s3", "study_s5"]
    assert [len(c.files) for c in cases] == [12, 8]
    assert cases[0].series_uid != cases[1].series_uid
    assert read_direct(cases[1].source)[0].shape == (24, 20, 8)


def test_discover_two_series_with_same_number_get_distinct_ids(tmp_path):
    write_dicom_series(hu_volume(SHAPE), make_affine("RAS"), tmp_path / "a", uid_entropy=["a"])
    write_dicom_series(hu_volume(SHAPE), make_affine("RAS"), tmp_path / "b", uid_entropy=["b"])
    merge_series([tmp_path / "a", tmp_path / "b"], tmp_path / "in" / "study")
    ids = [c.case_id for c in discover_cases(tmp_path / "in")]
    assert len(ids) == 2 and len(set(ids)) == 2


def test_discover_ignores_junk_and_empty_folders(tmp_path):
    (tmp_path / "in" / "empty").mkdir(parents=True)
    (tmp_path / "in" / "README").write_text("read me")
    (tmp_path / "in" / "short").write_bytes(b"DICM")
    assert discover_cases(tmp_path / "in") == []


def test_discover_single_file(tmp_path):
    path = save_nifti(np.zeros((4, 4, 4), np.int16), make_affine("RAS"), tmp_path / "one_0000.nii.gz")
    cases = discover_cases(path)
    assert [(c.case_id, c.source) for c in cases] == [("one", str(path))]


def test_discover_missing_folder(tmp_path):
    with pytest.raises(InputError) as info:
        discover_cases(tmp_path / "nowhere")
    assert "input folder not found" in str(info.value) and str(tmp_path / "nowhere") in str(info.value)


def test_discover_does_not_mistake_a_copy_for_a_new_series(tmp_path):
    """A DICOMDIR beside the slices is an index, not a slice: the series keeps its slice count."""
    paths = write_dicom_series(hu_volume(SHAPE), make_affine("RAS"), tmp_path / "in" / "s")
    shutil.copy(paths[0], tmp_path / "in" / "s" / "DICOMDIR")
    cases = discover_cases(tmp_path / "in")
    assert [len(c.files) for c in cases] == [SHAPE[2]]


@pytest.mark.parametrize("keep", [400, 0.5, 0.95])
def test_truncated_nifti_gz_is_refused_not_read_as_zeros(tmp_path, keep):
    """SimpleITK reads a truncated .nii.gz without an error: the reader must notice and refuse it."""
    path = save_nifti(hu_volume(SHAPE), make_affine("RAS"), tmp_path / "scan.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(InputError, match="cannot read NIfTI"):
        read_direct(path)


def test_nifti_gz_without_its_trailer_is_read_only_if_every_voxel_is_there(tmp_path):
    volume = hu_volume(SHAPE)
    path = save_nifti(volume, make_affine("RAS"), tmp_path / "scan.nii.gz")
    path.write_bytes(path.read_bytes()[:-10])  # the gzip trailer and the stream's last bytes
    try:
        array, _ = read_direct(path)
    except InputError:
        return
    np.testing.assert_array_equal(array, volume)


@pytest.mark.parametrize("dtype, slope", [(np.int16, 1.0), (np.int16, 0.5), (np.float32, 1.0), (np.uint8, 1.0)])
def test_nifti_voxels_equal_nibabel(tmp_path, dtype, slope):
    """The fast (SimpleITK) voxel path gives nibabel's values, scaling included, in the [i, j, k] grid."""
    rng = np.random.default_rng(3)
    volume = (rng.integers(0, 200, SHAPE) if dtype != np.float32 else rng.normal(size=SHAPE)).astype(dtype)
    image = nib.Nifti1Image(volume, make_affine("oblique"))
    image.header.set_slope_inter(slope, -3.0 if slope != 1.0 else 0.0)
    path = tmp_path / "scan.nii.gz"
    nib.save(image, str(path))
    array, meta = read_direct(path)
    np.testing.assert_allclose(array, np.asarray(nib.load(str(path)).dataobj), atol=1e-5)
    np.testing.assert_allclose(meta["affine"], nib.load(str(path)).affine, atol=1e-6)
