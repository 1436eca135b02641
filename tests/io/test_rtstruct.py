"""RTSTRUCT output: closed planar contours in patient coordinates on the series' own slices, which fill
back (even-odd) to the mask, per orientation; every file written passes dciodvfy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath
from scipy import ndimage

from pipeline.errors import InputError
from pipeline.io.dicom_write import write_dicom_series
from pipeline.io.geometry import LPS_TO_RAS, voxel_spacing
from pipeline.io.reader import ScanReader
from pipeline.io.rtstruct import (
    RT_STRUCTURE_SET_STORAGE,
    fill_contours,
    mask_contours,
    read_rtstruct,
    write_rtstruct,
)
from tests.conftest import make_affine
from tests.dicom_validate import assert_valid

SHAPE = (30, 26, 9)  # writer grid: columns x rows x slices, 0.8 x 0.9 x 2.5 mm
NAMES = ["background", "lesion", "cyst"]
SHA = "0123456789abcdef" * 4
ORIENTATIONS = {"RAS-axial": "RAS", "LPS-axial": "LPS", "feet-first": "feet_first", "oblique": "oblique"}


def _series(tmp_path, orientation):
    volume = np.random.default_rng(2).integers(-200, 200, SHAPE).astype(np.int16)
    files = write_dicom_series(volume, make_affine(ORIENTATIONS[orientation]), tmp_path / "series",
                               uid_entropy=[orientation])
    reader = ScanReader()
    array, meta = reader.get_data(reader.read(tmp_path / "series"))
    return [str(f) for f in files], array.shape, np.asarray(meta["affine"])


def _lesions(shape) -> np.ndarray:
    """Label 1: a ball, a ring (box with a hole through it) and two boxes touching at a corner only (one
    lesion); label 2: a small box. Every lesion is at least 5 mm across."""
    mask = np.zeros(shape, np.uint8)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    spacing = np.array([0.8, 0.9, 2.5])
    centre = np.array([7.0, 7.0, 4.0])
    distance = np.sqrt((((np.stack([ii, jj, kk], -1) - centre) * spacing) ** 2).sum(-1))
    mask[distance < 4.5] = 1  # ball, 9 mm across
    mask[16:25, 2:10, 1:4] = 1  # ring: 9 x 8 voxels with a 3 x 2 hole
    mask[19:22, 5:7, 1:4] = 0
    mask[3:10, 15:22, 5:8] = 1  # two boxes meeting at one corner in every slice
    mask[10:17, 22:25, 5:8] = 1
    mask[20:27, 15:22, 6:9] = 2
    return mask


def _on_grid(mask_writer, affine_writer, affine, shape):
    """The writer-grid mask moved onto the reader's grid (same voxel centres) through world space."""
    index = np.linalg.inv(affine) @ affine_writer
    ijk = np.indices(mask_writer.shape).reshape(3, -1)
    target = np.rint(index[:3, :3] @ ijk + index[:3, 3:4]).astype(np.intp)
    out = np.zeros(shape, np.uint8)
    out[tuple(target)] = mask_writer.reshape(-1)
    return out


def _dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _per_lesion_dice(mask, back, affine) -> list[float]:
    """Dice of each connected lesion (>= 5 mm across) against the read-back mask near it."""
    scores = []
    for value in np.unique(mask[mask > 0]):
        components, count = ndimage.label(mask == value, structure=np.ones((3, 3, 3)))
        for n in range(1, count + 1):
            lesion = components == n
            extent = (np.ptp(np.argwhere(lesion), axis=0) + 1) * voxel_spacing(affine)
            assert extent.max() >= 5.0
            near = ndimage.binary_dilation(lesion, iterations=2)
            scores.append(_dice(lesion, (back == value) & near))
    return scores


def _independent_fill(ds, affine, shape) -> np.ndarray:
    """Fill the contours without the module: map each point to voxel indices through the reader's affine
    (RAS) and fill even-odd with matplotlib, contour by contour (XOR)."""
    to_index = np.linalg.inv(affine) @ LPS_TO_RAS
    out = np.zeros(shape, np.uint8)
    centres = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    for roi in ds.ROIContourSequence:
        inside = np.zeros(shape, bool)
        for contour in roi.get("ContourSequence", []):
            lps = np.asarray(contour.ContourData, np.float64).reshape(-1, 3)
            ijk = (to_index[:3, :3] @ lps.T + to_index[:3, 3:4]).T
            spread = np.ptp(ijk, axis=0)
            (normal_axis,) = np.nonzero(spread < 1e-3)  # the contour is in one slice of the grid
            plane = int(np.rint(ijk[0, normal_axis[0]]))
            np.testing.assert_allclose(ijk[:, normal_axis[0]], plane, atol=1e-3)
            in_plane = [a for a in range(3) if a != normal_axis[0]]
            # pixel-edge contours: corners half a voxel from the voxel centres
            np.testing.assert_allclose(np.abs(ijk[:, in_plane] % 1 - 0.5), 0, atol=1e-3)
            on_plane = centres[:, normal_axis[0]] == plane
            hit = PolygonPath(ijk[:, in_plane]).contains_points(centres[on_plane][:, in_plane])
            flat = inside.reshape(-1)
            index = np.flatnonzero(on_plane)
            flat[index] ^= hit
        out[inside] = int(roi.ReferencedROINumber)
    return out


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_contours_fill_back_to_the_mask(tmp_path, orientation):
    files, shape, affine = _series(tmp_path, orientation)
    mask = _on_grid(_lesions(SHAPE), make_affine(ORIENTATIONS[orientation]), affine, shape)
    out = write_rtstruct(mask, affine, files[::-1], tmp_path / "out" / "rt.dcm", NAMES, model_sha256=SHA)
    assert [p.name for p in out.parent.iterdir()] == ["rt.dcm"]

    back = read_rtstruct(out, files, affine, shape)
    scores = _per_lesion_dice(mask, back, affine)
    assert len(scores) == 4 and min(scores) >= 0.95
    print(f"{orientation}: per-lesion Dice {[round(float(s), 4) for s in scores]}")  # shown with pytest -s
    np.testing.assert_array_equal(back, mask)  # pixel-edge contours: exact
    np.testing.assert_array_equal(read_rtstruct(out, files), mask)  # on the reader's own grid
    ds = pydicom.dcmread(out)
    np.testing.assert_array_equal(_independent_fill(ds, affine, shape), mask)
    assert_valid(out)


def test_references_and_codes(tmp_path):
    files, shape, affine = _series(tmp_path, "oblique")
    mask = _on_grid(_lesions(SHAPE), make_affine("oblique"), affine, shape)
    out = write_rtstruct(mask, affine, files, tmp_path / "rt.dcm", NAMES, model_sha256=SHA,
                         algorithm_version="1.2", anatomic_region="SCT:10200004:Liver")
    ds = pydicom.dcmread(out)
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    first = next(iter(sources.values()))
    assert ds.SOPClassUID == RT_STRUCTURE_SET_STORAGE and ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.SeriesInstanceUID != first.SeriesInstanceUID
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == set(sources)
    assert [r.ROIName for r in ds.StructureSetROISequence] == NAMES[1:]
    assert [int(r.ROINumber) for r in ds.StructureSetROISequence] == [1, 2]
    (algorithm,) = ds.StructureSetROISequence[0].ROIDerivationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("medseg", "1.2")
    assert algorithm.AlgorithmParameters == f"model_sha256={SHA}"
    observation = ds.RTROIObservationsSequence[0]
    assert observation.RTROIIdentificationCodeSequence[0].CodeValue == "52988006"
    assert observation.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert observation.AnatomicRegionSequence[0].CodeMeaning == "Liver"
    # every contour lies in the plane of the slice it references, on that slice's pixel-edge grid
    contours = [c for roi in ds.ROIContourSequence for c in roi.ContourSequence]
    assert len(contours) >= 2 * 3 + 3  # ball slices, ring outline + hole on 3 slices, ...
    for contour in contours:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        source = sources[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        assert int(contour.NumberOfContourPoints) == len(points) >= 4
        row, column = np.asarray(source.ImageOrientationPatient[:3]), np.asarray(source.ImageOrientationPatient[3:])
        offset = points - np.asarray(source.ImagePositionPatient, float)
        np.testing.assert_allclose(offset @ np.cross(row, column), 0, atol=1e-3)
        in_pixels = offset @ row / float(source.PixelSpacing[1])
        np.testing.assert_allclose(np.abs(in_pixels % 1 - 0.5), 0, atol=1e-3)
    assert_valid(out)


def test_empty_mask_and_absent_label(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    out = write_rtstruct(np.zeros(shape, np.uint8), affine, files, tmp_path / "rt.dcm", NAMES)
    ds = pydicom.dcmread(out)
    assert len(ds.StructureSetROISequence) == 2
    assert all("ContourSequence" not in roi for roi in ds.ROIContourSequence)
    assert not read_rtstruct(out, files, affine, shape).any()
    assert_valid(out)


def test_mask_not_on_the_series_grid_is_rejected(tmp_path):
    files, shape, affine = _series(tmp_path, "RAS-axial")
    with pytest.raises(InputError, match="cover .* of the mask's"):
        write_rtstruct(np.zeros(shape, np.uint8), affine, files[1:], tmp_path / "rt.dcm", NAMES)
    assert not (tmp_path / "rt.dcm").exists()


@pytest.mark.parametrize("seed", range(4))
def test_pixel_edge_loops_fill_back_even_odd(seed):
    """Random 2D masks (holes, corner-touching pixels, islands in holes) round-trip exactly."""
    frame = np.random.default_rng(seed).random((13, 11)) < 0.45
    loops = mask_contours(frame)
    np.testing.assert_array_equal(fill_contours(loops, *frame.shape), frame)
    for loop in loops:  # closed, axis-aligned steps between corners, no collinear points left
        steps = np.diff(np.vstack([loop, loop[:1]]), axis=0)
        assert ((steps == 0).sum(axis=1) == 1).all()


def test_hole_is_its_own_contour():
    frame = np.zeros((7, 7), bool)
    frame[1:6, 1:6] = True
    frame[3, 3] = False
    loops = sorted(mask_contours(frame), key=lambda loop: np.ptp(loop[:, 0]))
    assert [len(loop) for loop in loops] == [4, 4]
    np.testing.assert_array_equal(loops[0].min(axis=0), [2.5, 2.5])  # the hole: one pixel's outline
    np.testing.assert_array_equal(loops[1].min(axis=0), [0.5, 0.5])
    np.testing.assert_array_equal(fill_contours(loops, 7, 7), frame)


def test_rasteriser_fills_other_tools_polygons():
    """A diamond with vertices off the pixel grid: pixel centres strictly inside are set."""
    diamond = np.array([[5.0, 1.2], [8.8, 5.0], [5.0, 8.8], [1.2, 5.0]])
    filled = fill_contours([diamond], 11, 11)
    r, c = np.indices((11, 11))
    np.testing.assert_array_equal(filled, np.abs(r - 5) + np.abs(c - 5) < 3.8)


# --- real series -----------------------------------------------------------------------------------


REAL = {
    "ct-3slice": ("seg/dcmqi/ct-3slice", "*.dcm"),
    "GE-MR-axial": ("dicom/dcm_qa_ge/In/05_3D_Ax_T1_MP_RAGE_R22", "*"),
    "Siemens-sagittal": ("dicom/dcm_qa_frag/In/5001_anat-T1w_acq-tfl", "*"),
    "Siemens-XA10-enhanced": ("dicom/dcm_qa_enh/In/Siemens/XA10", "6_1.dcm"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_series_rtstruct_and_seg_validate(shared_data, tmp_path, name):
    from pipeline.io.dicom_seg import read_dicom_seg, write_dicom_seg

    folder, pattern = REAL[name]
    sources = sorted(p for p in (shared_data / folder).glob(pattern) if p.is_file())
    if not sources:
        pytest.skip(f"sample not present: {shared_data / folder}")
    copies = [Path(shutil.copy(p, tmp_path / f"{n:04d}.dcm")) for n, p in enumerate(sources)]
    reader = ScanReader()
    image, meta = reader.get_data(reader.read([str(p) for p in copies]))
    affine = np.asarray(meta["affine"])
    mask = (image > np.percentile(image, 97)).astype(np.uint8)
    mask = ndimage.binary_opening(mask, iterations=1).astype(np.uint8)
    assert mask.any()

    rt = write_rtstruct(mask, affine, copies, tmp_path / "out" / "rt.dcm", NAMES[:2], model_sha256=SHA)
    np.testing.assert_array_equal(read_rtstruct(rt, copies, affine, image.shape), mask)
    contours = [c for roi in pydicom.dcmread(rt).ROIContourSequence for c in roi.ContourSequence]
    frames = [c.ContourImageSequence[0].get("ReferencedFrameNumber") for c in contours]
    if name.endswith("enhanced"):  # one multi-frame file: each contour names its frame
        count = int(pydicom.dcmread(copies[0], stop_before_pixels=True).NumberOfFrames)
        assert len(copies) == 1 and all(f is not None and 1 <= int(f) <= count for f in frames)
    else:
        assert all(f is None for f in frames)
    seg = write_dicom_seg(mask, affine, copies, tmp_path / "out" / "seg.dcm", NAMES[:2], model_sha256=SHA)
    np.testing.assert_array_equal(read_dicom_seg(seg, copies, affine, image.shape), mask)
    assert_valid(rt)
    assert_valid(seg)


def test_contour_longer_than_64_kib_is_written_whole(tmp_path):
    """A comb-shaped outline of thousands of points: its Contour Data passes the 16-bit length an
    explicit-VR DS could hold, so the file is Implicit VR Little Endian and reads back exactly."""
    shape = (384, 384, 2)
    volume = np.zeros(shape, np.int16)
    files = write_dicom_series(volume, make_affine("oblique", spacing=(0.7123, 0.6871, 2.0)), tmp_path / "series")
    reader = ScanReader()
    array, meta = reader.get_data(reader.read(tmp_path / "series"))
    affine = np.asarray(meta["affine"])
    mask = np.zeros(array.shape, np.uint8)
    mask[4:-4, 4:-4, 0] = 1
    mask[2:4, 4:-4:2, 0] = mask[-4:-2, 4:-4:2, 0] = 1  # teeth on all four sides
    mask[4:-4:2, 2:4, 0] = mask[4:-4:2, -4:-2, 0] = 1
    out = write_rtstruct(mask, affine, files, tmp_path / "rt.dcm", NAMES[:2])
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    (contour,) = ds.ROIContourSequence[0].ContourSequence
    assert contour.get_item(0x30060050).length > 65535  # the encoded Contour Data
    assert int(contour.NumberOfContourPoints) > 3000
    np.testing.assert_array_equal(read_rtstruct(out, files, affine, array.shape), mask)
    assert_valid(out)


def test_label_without_a_name_is_rejected(tmp_path):
    files, shape, affine = _series(tmp_path, "LPS-axial")
    mask = np.zeros(shape, np.uint8)
    mask[2:5, 2:5, 2] = 2
    with pytest.raises(InputError, match="write_rtstruct found label values 0..2 but only 2 label names"):
        write_rtstruct(mask, affine, files, tmp_path / "rt.dcm", NAMES[:2])


def test_one_roi_per_lesion(tmp_path):
    files, shape, affine = _series(tmp_path, "oblique")
    mask = _on_grid(_lesions(SHAPE), make_affine("oblique"), affine, shape)
    out = write_rtstruct(mask, affine, files, tmp_path / "rt.dcm", NAMES, rois="lesion")
    ds = pydicom.dcmread(out)
    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names == ["lesion 1", "lesion 2", "lesion 3", "cyst 1"]
    back = read_rtstruct(out, files, affine, shape)
    label_of_roi = np.array([0, 1, 1, 1, 2], np.uint8)
    np.testing.assert_array_equal(label_of_roi[back], mask)  # together, the ROIs are the mask
    sizes = [int(np.count_nonzero(back == n)) for n in (1, 2, 3)]
    assert sizes == sorted(sizes, reverse=True)  # lesion 1 is the largest
    for n in range(1, 5):  # each ROI is one lesion (26-connected)
        assert ndimage.label(back == n, structure=np.ones((3, 3, 3)))[1] == 1
    assert_valid(out)

    empty = write_rtstruct(np.zeros(shape, np.uint8), affine, files, tmp_path / "empty.dcm", NAMES, rois="lesion")
    assert [r.ROIName for r in pydicom.dcmread(empty).StructureSetROISequence] == NAMES[1:]
    assert_valid(empty)
    with pytest.raises(InputError, match="rois='organ': expected one of label, lesion"):
        write_rtstruct(mask, affine, files, tmp_path / "x.dcm", NAMES, rois="organ")
