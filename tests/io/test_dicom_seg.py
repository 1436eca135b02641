"""DICOM SEG export/import: frames match the source instances pixel for pixel, in any file and axis order."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from pipeline.errors import InputError
from pipeline.io.dicom_seg import SEGMENTATION_STORAGE, read_dicom_seg, write_dicom_seg
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.geometry import affine_from_sitk, closest_canonical
from pipeline.io.reader import ScanReader
from tests.conftest import make_affine
from tests.dicom_validate import assert_valid

WRITER_SHAPE = (18, 14, 7)  # rows * columns = 252, not a multiple of 8: 1-bit frames share bytes
LABEL_NAMES = ["background", "lesion", "cyst"]


def _sagittal_affine() -> np.ndarray:
    """Slices stacked along R-L, rows running S->I, columns A->P (a PIR sagittal series)."""
    affine = np.eye(4)
    affine[:3, :3] = [[0.0, 0.0, 1.2], [-0.9, 0.0, 0.0], [0.0, -0.9, 0.0]]
    affine[:3, 3] = (-20.0, 15.0, 60.0)
    return affine


AFFINES = {
    "LPS-axial": make_affine("LPS"),
    "RAS-axial": make_affine("RAS"),
    "oblique": make_affine("oblique"),
    "feet-first": make_affine("feet_first"),
    "sagittal-PIR": _sagittal_affine(),
}


def _two_label_mask(shape, seed=0) -> np.ndarray:
    """Label 1: an off-centre box; label 2: a ball elsewhere. Asymmetric, so flips/transposes show."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    mask[2:7, 1:5, 1:4] = 1
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centre = np.array(shape) * [0.65, 0.6, 0.55] + rng.uniform(-0.5, 0.5, 3)
    mask[((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2) < 7] = 2
    return mask


def _read_scan(source):
    reader = ScanReader()
    return reader.get_data(reader.read(source))


def _series(tmp_path, orientation):
    """A synthetic CT series; returns its files (slice order k), writer-grid affine, and reader grid."""
    volume = np.random.default_rng(1).integers(-200, 200, WRITER_SHAPE).astype(np.int16)
    files = write_dicom_series(volume, AFFINES[orientation], tmp_path / "series", uid_entropy=[orientation])
    array, meta = _read_scan(tmp_path / "series")
    return files, array.shape, np.asarray(meta["affine"])


def _shuffled(files, seed=3):
    order = np.random.default_rng(seed).permutation(len(files))
    return [str(files[n]) for n in order]


def _place_on_grid(array, affine, grid_affine, grid_shape) -> np.ndarray:
    """Put ``array`` onto another grid holding the same voxel centres (checked), via world coordinates."""
    index_map = np.linalg.inv(grid_affine) @ affine
    ijk = np.indices(array.shape).reshape(3, -1).astype(np.float64)
    target = index_map[:3, :3] @ ijk + index_map[:3, 3:4]
    rounded = np.rint(target)
    np.testing.assert_allclose(target, rounded, atol=0.01)
    rounded = rounded.astype(np.intp)
    assert all((rounded[a] >= 0).all() and (rounded[a] < grid_shape[a]).all() for a in range(3))
    out = np.zeros(grid_shape, array.dtype)
    out[tuple(rounded)] = array.reshape(-1)
    return out


def _check_references(seg, files):
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = {s.SOPInstanceUID for s in sources}
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.Modality == "SEG"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    (series_ref,) = seg.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series_ref.ReferencedInstanceSequence} == uids
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (source_ref,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert source_ref.ReferencedSOPInstanceUID in uids


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_write_then_read_round_trip(tmp_path, orientation):
    files, shape, affine = _series(tmp_path, orientation)
    writer_mask = _two_label_mask(WRITER_SHAPE)
    # The writer maps pixel (row, column) of file k to writer voxel (column, row, k); the reader's grid
    # is closest_canonical of the writer's. This is the oracle for both the grid and each frame.
    mask, expected_affine = closest_canonical(writer_mask, AFFINES[orientation])
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)
    assert mask.shape == shape

    out = write_dicom_seg(mask, affine, _shuffled(files), tmp_path / "out" / "seg.dcm", LABEL_NAMES)

    assert out == tmp_path / "out" / "seg.dcm"
    assert [p.name for p in out.parent.iterdir()] == ["seg.dcm"]  # no temporary file left
    seg = pydicom.dcmread(out)
    _check_references(seg, files)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == LABEL_NAMES[1:]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert seg.SegmentationType == "BINARY"

    k_of_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(files)}
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    stored = set()
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        k = k_of_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame, (writer_mask[:, :, k].T == number).astype(np.uint8))
        stored.add((k, number))
    expected_stored = {
        (k, n) for k in range(WRITER_SHAPE[2]) for n in (1, 2) if np.any(writer_mask[..., k] == n)
    }
    assert stored == expected_stored  # empty frames are omitted, none is missing

    back = read_dicom_seg(out, _shuffled(files, seed=4), affine, shape)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)
    # highdicom reads it back: per source instance (file k), segment n's frame is label n in slice k
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = hd.seg.segread(out).get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    for k in range(WRITER_SHAPE[2]):
        for n in (1, 2):
            np.testing.assert_array_equal(pixels[k, :, :, n - 1], writer_mask[:, :, k].T == n)
    assert_valid(out)


def test_read_without_grid_uses_the_scan_reader_grid(tmp_path):
    files, shape, affine = _series(tmp_path, "oblique")
    mask = _two_label_mask(shape)
    write_dicom_seg(mask, affine, [str(f) for f in files], tmp_path / "seg.dcm", LABEL_NAMES)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", files), mask)


def test_empty_mask_keeps_every_frame(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    out = write_dicom_seg(np.zeros(shape, np.uint8), affine, files, tmp_path / "seg.dcm", LABEL_NAMES)
    seg = pydicom.dcmread(out)
    _check_references(seg, files)
    assert int(seg.NumberOfFrames) == len(files) * 2  # every frame of every segment
    assert not seg.pixel_array.any()
    assert not read_dicom_seg(out, files, affine, shape).any()
    assert_valid(out)


def test_algorithm_identification(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    mask = _two_label_mask(shape)
    out = write_dicom_seg(
        mask, affine, files, tmp_path / "seg.dcm", LABEL_NAMES, algorithm_name="unet", algorithm_version="9.9"
    )
    (algorithm,) = pydicom.dcmread(out).SegmentSequence[1].SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("unet", "9.9")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"


# --- grids that do not match the series -----------------------------------------------------------


def _shifted(affine, voxels):
    moved = affine.copy()
    moved[:3, 3] += affine[:3, :3] @ np.asarray(voxels, dtype=np.float64)
    return moved


@pytest.mark.parametrize(
    "change, message",
    [
        ("half-voxel shift", "between grid points"),
        ("cropped", "outside the mask"),
        ("finer spacing", "cover .* of the mask's"),
        ("a slice missing", "cover .* of the mask's"),
    ],
)
def test_mask_grid_not_matching_the_series_is_rejected(tmp_path, change, message):
    files, shape, affine = _series(tmp_path, "oblique")
    if change == "half-voxel shift":
        shape, affine = shape, _shifted(affine, [0.5, 0, 0])
    elif change == "cropped":
        shape, affine = (shape[0] - 2, shape[1], shape[2]), _shifted(affine, [2, 0, 0])
    elif change == "finer spacing":
        affine = affine @ np.diag([0.5, 0.5, 1.0, 1.0])
        shape = (shape[0] * 2, shape[1] * 2, shape[2])
    else:
        files = files[:3] + files[4:]
    mask = _two_label_mask(shape)
    with pytest.raises(InputError, match=f"mask grid does not match (source image|the series).*{message}"):
        write_dicom_seg(mask, affine, files, tmp_path / "seg.dcm", LABEL_NAMES)
    assert not (tmp_path / "seg.dcm").exists()
    assert list(tmp_path.glob(".seg.dcm*")) == []


def test_reading_onto_a_mismatched_grid_is_rejected(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    write_dicom_seg(_two_label_mask(shape), affine, files, tmp_path / "seg.dcm", LABEL_NAMES)
    with pytest.raises(InputError, match="mask grid does not match frame 1 of DICOM SEG"):
        read_dicom_seg(tmp_path / "seg.dcm", files, _shifted(affine, [0, 0.3, 0]), shape)


def test_label_without_a_name_is_rejected(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    with pytest.raises(InputError, match="label values 0..2 but only 2 label names"):
        write_dicom_seg(_two_label_mask(shape), affine, files, tmp_path / "seg.dcm", LABEL_NAMES[:2])


def test_legacy_multi_frame_source_is_rejected(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    legacy = pydicom.dcmread(files[0])
    legacy.NumberOfFrames = 2  # frames without functional groups: no plane of their own
    legacy.save_as(tmp_path / "legacy.dcm")
    sources = [tmp_path / "legacy.dcm"]
    with pytest.raises(InputError, match="legacy multi-frame image .* no plane of their own"):
        write_dicom_seg(_two_label_mask(shape), affine, sources, tmp_path / "seg.dcm", LABEL_NAMES)


def _copy_sample(shared_data, relative: str, folder: Path) -> Path:
    source = shared_data / relative
    if not source.is_file():
        pytest.skip(f"sample not present: {source}")
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source, folder / source.name))


def test_enhanced_multi_frame_source_round_trips(shared_data, tmp_path):
    """A real Siemens XA10 enhanced MR volume (orientation and spacing per frame, not shared): one SEG
    frame per source frame, read back onto the reader's grid exactly."""
    path = _copy_sample(shared_data, "dicom/dcm_qa_enh/In/Siemens/XA10/6_1.dcm", tmp_path / "in")
    reader = ScanReader()
    image, meta = reader.get_data(reader.read([str(path)]))
    mask = (image > np.percentile(image, 80)).astype(np.uint8)
    mask[: image.shape[0] // 2] *= 2  # two labels
    write_dicom_seg(mask, meta["affine"], [path], tmp_path / "seg.dcm", LABEL_NAMES)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and int(seg.NumberOfFrames) <= 2 * image.shape[2]
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", [path], meta["affine"], image.shape), mask)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", [path]), mask)
    assert_valid(tmp_path / "seg.dcm")


def test_mosaic_source_is_rejected_with_its_reason(shared_data, tmp_path):
    path = _copy_sample(shared_data, "dicom/dcm_qa_12bit/In/12bitUnsigned.dcm", tmp_path / "in")
    reader = ScanReader()
    image, meta = reader.get_data(reader.read([str(path)]))
    with pytest.raises(InputError, match="Siemens mosaic"):
        write_dicom_seg(np.zeros(image.shape, np.uint8), meta["affine"], [path], tmp_path / "seg.dcm", LABEL_NAMES)
    assert not (tmp_path / "seg.dcm").exists()


def test_seg_of_another_frame_of_reference_is_rejected(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    write_dicom_seg(_two_label_mask(shape), affine, files, tmp_path / "seg.dcm", LABEL_NAMES)
    other = write_dicom_series(np.zeros(WRITER_SHAPE), AFFINES["LPS-axial"], tmp_path / "other")
    with pytest.raises(InputError, match="frame of reference"):
        read_dicom_seg(tmp_path / "seg.dcm", other, affine, shape)


# --- a SEG written by another tool (dcmqi) ---------------------------------------------------------


def test_dcmqi_reference_seg(tmp_path, shared_data):
    root = shared_data / "seg" / "dcmqi"
    if not root.is_dir():
        pytest.skip(f"dcmqi reference SEG not found at {root}")
    files = sorted(str(p) for p in (root / "ct-3slice").glob("*.dcm"))
    array, meta = _read_scan(root / "ct-3slice")
    affine = np.asarray(meta["affine"])

    liver = read_dicom_seg(root / "liver.dcm", files, affine, array.shape)

    reference = sitk.ReadImage(str(root / "liver_seg.nrrd"))
    expected = _place_on_grid(
        sitk.GetArrayFromImage(reference).transpose(2, 1, 0), affine_from_sitk(reference), affine, array.shape
    )
    assert int(np.count_nonzero(expected)) == 107_098
    np.testing.assert_array_equal(liver, expected.astype(np.uint8))

    out = write_dicom_seg(liver, affine, files[::-1], tmp_path / "liver.dcm", ["background", "liver"])
    _check_references(pydicom.dcmread(out), files)
    np.testing.assert_array_equal(read_dicom_seg(out, files, affine, array.shape), liver)
    # highdicom's own reader sees the same frame per source instance in ours as in dcmqi's
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    ours = hd.seg.segread(out).get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    theirs = hd.seg.segread(root / "liver.dcm").get_pixels_by_source_instance(
        uids, assert_missing_frames_are_empty=True, ignore_spatial_locations=True  # dcmqi omits the flag
    )
    np.testing.assert_array_equal(ours, theirs)
    assert_valid(out)


@pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name")
@pytest.mark.parametrize("segmentation_type", ["BINARY", "FRACTIONAL", "LABELMAP"])
def test_read_seg_written_by_highdicom(tmp_path, segmentation_type):
    """A SEG built by highdicom itself, frame k = pixels of file k: read back onto the reader's grid."""

    files, shape, affine = _series(tmp_path, "sagittal-PIR")
    writer_mask = _two_label_mask(WRITER_SHAPE)
    frames = np.stack([writer_mask[:, :, k].T for k in range(WRITER_SHAPE[2])])
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type="MANUAL",
        )
        for n, name in enumerate(LABEL_NAMES[1:], start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(f) for f in files],
        pixel_array=frames,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=5,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(tmp_path / "seg.dcm")
    expected, _ = closest_canonical(writer_mask, AFFINES["sagittal-PIR"])
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", files, affine, shape), expected)


@pytest.mark.parametrize("seed", range(6))
def test_frame_index_gathers_and_scatters_like_per_pixel_indexing(seed):
    """The slice fast path (unit steps along two grid axes) and the per-pixel fallback agree."""
    from pipeline.io.dicom_seg import _FrameIndex

    rng = np.random.default_rng(seed)
    shape, rows, columns = (9, 8, 7), 4, 3
    volume = rng.integers(0, 255, shape).astype(np.uint8)
    row_axis, column_axis = rng.permutation(3)[:2]
    down, along = np.zeros(3, np.intp), np.zeros(3, np.intp)
    down[row_axis] = rng.choice([-1, 1]) * (2 if seed == 5 else 1)  # seed 5: a step of 2, the fallback
    along[column_axis] = rng.choice([-1, 1])
    start = np.array([rng.integers(0, s) for s in shape])
    start[row_axis] = 0 if down[row_axis] > 0 else shape[row_axis] - 1
    start[column_axis] = 0 if along[column_axis] > 0 else shape[column_axis] - 1
    expected = np.array(
        [[volume[tuple(start + r * down + c * along)] for c in range(columns)] for r in range(rows)]
    )
    where = _FrameIndex(start, down, along, rows, columns)
    assert any(isinstance(index, slice) for index in where.index) == (seed != 5)
    np.testing.assert_array_equal(where.read(volume), expected)

    frame = rng.integers(0, 255, (rows, columns)).astype(np.uint8)
    written = volume.copy()
    for r in range(rows):
        for c in range(columns):
            written[tuple(start + r * down + c * along)] = frame[r, c]
    where.write(volume, frame)
    np.testing.assert_array_equal(volume, written)


# --- sources the SEG must still reference: anonymised exports, rounding-level orientation noise ----------


def _blank_dataset_uids(files, meta_too=False):
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID, ds.SOPClassUID = "", ""
        if meta_too:
            ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(path, enforce_file_format=False)


def test_anonymised_source_is_referenced_by_its_file_meta_uids(tmp_path):
    """Dataset-level SOPInstanceUID/SOPClassUID empty, only the file meta holding them: the SEG references
    the file meta's UIDs (it used to fail with 'the same SOP instance more than once')."""
    files, shape, affine = _series(tmp_path, "feet-first")
    meta = [pydicom.dcmread(f, stop_before_pixels=True).file_meta for f in files]
    _blank_dataset_uids(files)
    mask = _two_label_mask(shape)
    out = write_dicom_seg(mask, affine, files, tmp_path / "seg.dcm", LABEL_NAMES, model_sha256="ab" * 32,
                          anatomic_region="SCT:10200004:Liver")
    seg = pydicom.dcmread(out)
    (series_ref,) = seg.ReferencedSeriesSequence
    assert {i.ReferencedSOPInstanceUID for i in series_ref.ReferencedInstanceSequence} == \
        {m.MediaStorageSOPInstanceUID for m in meta}
    assert {i.ReferencedSOPClassUID for i in series_ref.ReferencedInstanceSequence} == \
        {m.MediaStorageSOPClassUID for m in meta}
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmParameters == "model_sha256=" + "ab" * 32
    assert seg.SegmentSequence[0].AnatomicRegionSequence[0].CodeMeaning == "Liver"
    assert seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    np.testing.assert_array_equal(read_dicom_seg(out, files, affine, shape), mask)
    assert_valid(out)


def test_source_without_instance_uid_anywhere_is_refused(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    _blank_dataset_uids(files, meta_too=True)
    with pytest.raises(InputError, match="has no SOPInstanceUID, neither in the dataset nor as "
                                         "MediaStorageSOPInstanceUID in its file meta"):
        write_dicom_seg(_two_label_mask(shape), affine, files, tmp_path / "seg.dcm", LABEL_NAMES)
    assert not (tmp_path / "seg.dcm").exists()


def test_orientation_rounding_noise_between_slices_is_accepted(tmp_path):
    """GE writes each slice's ImageOrientationPatient with its own rounding (~1e-8 apart)."""
    files, shape, affine = _series(tmp_path, "oblique")
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [f"{float(v) + 1e-9 * n:.13f}" for v in ds.ImageOrientationPatient]
        ds.save_as(path)
    mask = _two_label_mask(shape)
    out = write_dicom_seg(mask, affine, files, tmp_path / "seg.dcm", LABEL_NAMES)
    np.testing.assert_array_equal(read_dicom_seg(out, files, affine, shape), mask)
    assert_valid(out)


def test_bad_anatomic_region_is_refused(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    with pytest.raises(InputError, match="not SCHEME:CODE:Meaning"):
        write_dicom_seg(_two_label_mask(shape), affine, files, tmp_path / "seg.dcm", LABEL_NAMES,
                        anatomic_region="liver")
