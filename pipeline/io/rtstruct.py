"""RTSTRUCT output (and read-back) for masks on the grid :class:`~pipeline.io.reader.ScanReader` gives a series.

Radiotherapy planning systems read RT Structure Sets, not SEG. :func:`write_rtstruct` writes one ROI per
label (ROI number = label value, so a mask with labels ``lesion`` and ``cyst`` gives two ROIs; or, with
``rois="lesion"``, one per connected lesion): on every
source image (slice, or frame of an enhanced multi-frame source) each connected piece of the label's
cross-section becomes closed planar contours in patient coordinates (LPS, mm), referencing that image's
SOP instance (and frame number), the series, the study and the frame of reference.

Contours follow the pixel edges of the mask (the outline of the voxels themselves, with collinear points
merged), so the area they enclose is exactly the voxels' area and a hole is its own contour. Filling them
back even-odd (a point is inside when a ray from it crosses the contours of its ROI on that image an odd
number of times, which is how planning systems treat holes) at the pixel centres gives the mask back
exactly: :func:`read_rtstruct` does that, and also reads other tools' contours (any polygon) onto the grid.

Pixel placement is :mod:`pipeline.io.dicom_seg`'s: pixel ``(r, c)`` of an image lies at
``IPP + c * col_spacing * row_cosine + r * row_spacing * col_cosine``; a pixel edge is half a pixel away.
"""

from __future__ import annotations

import datetime
import logging
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian, generate_uid

from pipeline.errors import InputError
from pipeline.io.atomic import atomic_path
from pipeline.io.dicom_seg import (
    PathLike,
    _check_single_series,
    _check_write_inputs,
    _dcmread_header,
    _default_series_number,
    _pipeline_version,
    _Plane,
    _read_header,
    _source_planes,
    code_item,
    lesion_codes,
)

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# the SOP class a Structure Set's RT Referenced Study Sequence names (Detached Study Management, by convention)
_STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_DATA = 0x30060050
_ROI_CONTOUR_SEQUENCE = 0x30060039
ROI_MODES = ("label", "lesion")  # one ROI per label, or per lesion (connected component)
PLANE_TOLERANCE_MM = 0.01  # how far a contour point may sit off its image's plane (ours: rounding only)
_COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (0, 200, 200), (200, 0, 200)]
# patient and study attributes copied from the source (type 2 ones written empty when the source lacks them)
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber")


# ---------------------------------------------------------------------------------------------------
# Contours of a 2D mask


def mask_contours(frame: np.ndarray) -> list[np.ndarray]:
    """Closed loops along the pixel edges of the foreground of ``frame`` (rows x columns, bool).

    Each loop is an ``(n, 2)`` array of ``(row, column)`` pixel coordinates of its corners (pixel centres
    are integers, so corners are at ``k - 0.5``), without the closing point repeated and without collinear
    points. Outer outlines run clockwise on screen, holes counter-clockwise; filling the loops even-odd at
    the pixel centres (:func:`fill_contours`) gives ``frame`` back.
    """
    frame = np.asarray(frame, bool)
    padded = np.pad(frame, 1)
    # Corner (i, j) is the top-left corner of pixel (i, j) (pixel coordinates (i - 0.5, j - 0.5)). Each
    # foreground pixel's edges run clockwise; an edge shared with a foreground neighbour cancels out.
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(starts_i, starts_j, di, dj):
        for i, j in zip(starts_i.tolist(), starts_j.tolist()):
            edges.setdefault((i, j), []).append((i + di, j + dj))

    inner = padded[1:-1, 1:-1]
    r, c = np.nonzero(inner & ~padded[:-2, 1:-1])  # top edge: background above, left to right
    add(r, c, 0, 1)
    r, c = np.nonzero(inner & ~padded[1:-1, 2:])  # right edge: downwards
    add(r, c + 1, 1, 0)
    r, c = np.nonzero(inner & ~padded[2:, 1:-1])  # bottom edge: right to left
    add(r + 1, c + 1, 0, -1)
    r, c = np.nonzero(inner & ~padded[1:-1, :-2])  # left edge: upwards
    add(r + 1, c, -1, 0)

    loops = []
    while edges:
        start = next(iter(edges))
        points, here, heading = [], start, None
        while True:  # in- and out-degrees are equal at every corner, so the walk returns to its start
            points.append(here)
            targets = edges[here]
            # two pixels touching at a corner only: turn right, so each keeps its own outline
            target = targets[0] if len(targets) == 1 else _turn(here, heading, targets)
            targets.remove(target)
            if not targets:
                del edges[here]
            heading = (target[0] - here[0], target[1] - here[1])
            here = target
            if here == start:
                break
        loops.append(_without_collinear(np.asarray(points, np.float64) - 0.5))
    return loops


def _turn(here, heading, targets):
    """The target a right turn from ``heading`` leads to (else the first)."""
    right = {(0, 1): (1, 0), (1, 0): (0, -1), (0, -1): (-1, 0), (-1, 0): (0, 1)}
    if heading is not None:
        for target in targets:
            if (target[0] - here[0], target[1] - here[1]) == right[heading]:
                return target
    return targets[0]


def _without_collinear(points: np.ndarray) -> np.ndarray:
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points - before)[:, 0] * (after - points)[:, 1] - (points - before)[:, 1] * (after - points)[:, 0]
    return points[np.abs(cross) > 1e-9]


def fill_contours(loops: Sequence[np.ndarray], rows: int, columns: int) -> np.ndarray:
    """Even-odd fill of closed polygons (``(n, 2)`` arrays of ``(row, column)`` pixel coordinates) at the
    pixel centres of a ``rows`` x ``columns`` image: a pixel is set when a ray from its centre along
    decreasing columns crosses the polygons' edges an odd number of times."""
    toggles = np.zeros((rows, columns + 1), np.uint8)
    edges = [(loop, np.roll(loop, -1, axis=0)) for loop in (np.asarray(v, np.float64) for v in loops) if len(loop) >= 3]
    if not edges:
        return np.zeros((rows, columns), bool)
    start = np.concatenate([e[0] for e in edges])
    end = np.concatenate([e[1] for e in edges])
    slanted = start[:, 0] != end[:, 0]  # an edge along a row crosses no ray
    start, end = start[slanted], end[slanted]
    low, high = np.minimum(start[:, 0], end[:, 0]), np.maximum(start[:, 0], end[:, 0])
    # pixel rows r with low <= r < high (half-open: a vertex on a ray counts once), inside the image
    first = np.maximum(np.ceil(low), 0).astype(np.int64)
    last = np.minimum(np.ceil(high) - 1, rows - 1).astype(np.int64)
    counts = np.maximum(last - first + 1, 0)
    edge = np.repeat(np.arange(len(first)), counts)
    row = first[edge] + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
    r0, c0, r1, c1 = start[edge, 0], start[edge, 1], end[edge, 0], end[edge, 1]
    crossing = c0 + (row - r0) * (c1 - c0) / (r1 - r0)
    # every pixel centre at a column > crossing sees the crossing on its ray towards lower columns
    column = np.clip(np.floor(crossing).astype(np.int64) + 1, 0, columns)
    np.bitwise_xor.at(toggles, (row, column), 1)
    return (np.bitwise_xor.accumulate(toggles, axis=1)[:, :columns] > 0)


# ---------------------------------------------------------------------------------------------------
# Writing


def write_rtstruct(
    labels: np.ndarray,
    affine: np.ndarray,
    source_files: Sequence[PathLike],
    out_path: PathLike,
    label_names: Sequence[str],
    *,
    algorithm_name: str = "medseg",
    algorithm_version: str | None = None,
    model_sha256: str = "",
    anatomic_region: str = "",
    rois: str = "label",
    series_number: int | None = None,
    series_description: str | None = None,
) -> Path:
    """Write ``labels`` as an RT Structure Set of the series ``source_files`` (classic single-frame files or
    one enhanced multi-frame file; a mosaic or legacy multi-frame file is refused with :class:`InputError`).

    ``labels``/``affine`` are the mask on the grid :class:`~pipeline.io.reader.ScanReader` gives the
    series (any file order). Label ``n >= 1`` becomes ROI ``n`` named ``label_names[n]``, with closed
    planar contours on every image it appears on (a label absent from the mask is an ROI without
    contours). ``rois="lesion"`` instead makes each lesion (26-connected component of a label) its own
    ROI, named ``<label name> <n>`` (n = 1 for the label's largest, as in ``lesions.csv``), numbered
    1, 2, ... label by label. ``anatomic_region``: an optional ``SCHEME:CODE:Meaning`` (e.g. ``SCT:10200004:Liver``)
    recorded with each ROI. The ROIs name the algorithm (``algorithm_name``, its version, by default
    the installed pipeline version, and ``model_sha256``). The file appears atomically at ``out_path``.
    """
    labels, affine, label_names = _check_write_inputs(labels, affine, source_files, label_names,
                                                      "write_rtstruct")
    headers = [_read_header(path) for path in source_files]
    _check_single_series(headers, source_files)
    images = _source_images(headers, source_files)
    version = algorithm_version or _pipeline_version()

    if rois not in ROI_MODES:
        raise InputError(f"write_rtstruct rois={rois!r}: expected one of {', '.join(ROI_MODES)}")
    roi_map, roi_names = (labels, label_names[1:]) if rois == "label" else _lesion_rois(labels, label_names)
    if not roi_names:  # no lesion at all: the labels' ROIs, without contours (a structure set needs an ROI)
        roi_map, roi_names = labels, label_names[1:]
    contours: dict[int, list[tuple[bytes, int, bytes]]] = {n: [] for n in range(1, len(roi_names) + 1)}
    covered = np.zeros(labels.shape, bool)
    for plane, reference in images:
        where = plane.locate(affine, labels.shape)
        frame = where.read(roi_map)
        where.write(covered, np.ones(frame.shape, bool))
        for number in np.unique(frame):
            if number == 0:
                continue
            for loop in mask_contours(frame == number):
                contours[int(number)].append(_contour_item(loop, plane, reference))
    if int(np.count_nonzero(covered)) != labels.size or len(images) * images[0][0].rows * images[0][0].columns \
            != labels.size:
        raise InputError(
            f"mask grid does not match the series: its {len(images)} image(s) cover "
            f"{int(np.count_nonzero(covered))} of the mask's {labels.size} voxels {labels.shape}. Expected the "
            "grid ScanReader gives exactly these files (same spacing, no resampling, every slice passed once)"
        )

    ds = _structure_set(headers[0], images, ["background", *roi_names], contours, algorithm_name, version, model_sha256,
                        anatomic_region, series_number, series_description)
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".dcm") as tmp:
        Path(tmp).write_bytes(_encode_file(ds, contours))
    log.debug("wrote RTSTRUCT %s: %d ROI(s), %d contour(s)", out_path, len(contours),
              sum(len(v) for v in contours.values()))
    return out_path


def _lesion_rois(labels: np.ndarray, label_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """One ROI per lesion: a map of ROI numbers (label by label, each label's lesions largest first, ties
    by position) and the ROI names."""
    from scipy import ndimage

    roi_map = np.zeros(labels.shape, np.int32)
    names: list[str] = []
    for value in range(1, len(label_names)):
        components, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3), bool))
        if not count:
            continue
        sizes = np.bincount(components.ravel())[1:]
        order = sorted(range(count), key=lambda n: -sizes[n])  # stable: ties keep scan order
        numbers = np.zeros(count + 1, np.int32)
        for rank, n in enumerate(order, start=1):
            numbers[n + 1] = len(names) + rank
        roi_map = np.where(components > 0, numbers[components], roi_map)
        names += [f"{label_names[value]} {rank}" for rank in range(1, count + 1)]
    return roi_map, names


def _source_images(headers, source_files) -> list[tuple[_Plane, Dataset]]:
    """Each source image's plane and its Contour Image Sequence item (SOP class/instance, frame number)."""
    images = []
    for path, header in zip(source_files, headers):
        planes = _source_planes(header, path)
        multi_frame = "PerFrameFunctionalGroupsSequence" in header
        for n, plane in enumerate(planes, start=1):
            item = Dataset()
            item.ReferencedSOPClassUID = header.SOPClassUID
            item.ReferencedSOPInstanceUID = header.SOPInstanceUID
            if multi_frame:
                item.ReferencedFrameNumber = n
            images.append((plane, item))
    return images


def _contour_item(loop: np.ndarray, plane: _Plane, reference: Dataset) -> tuple[bytes, int, bytes]:
    """One contour, encoded (Implicit VR Little Endian): its Contour Image Sequence, number of points
    and Contour Data; :func:`_encode_contours` adds the contour number. pydicom's own encoding of a
    contour costs ~1 ms, too slow for thousands of contours."""
    rows, columns = loop[:, 0:1], loop[:, 1:2]
    points = (plane.position + columns * plane.column_spacing * plane.row_cosine
              + rows * plane.row_spacing * plane.column_cosine)
    image = (_element(0x0008, 0x1150, _ui(reference.ReferencedSOPClassUID))
             + _element(0x0008, 0x1155, _ui(reference.ReferencedSOPInstanceUID)))
    if "ReferencedFrameNumber" in reference:
        image += _element(0x0008, 0x1160, _text(str(int(reference.ReferencedFrameNumber))))
    data = _text("\\".join(_ds_value(v) for v in points.reshape(-1).tolist()))
    return _element(0x3006, 0x0016, _item(image)), len(points), data


def _encode_contours(contours: list[tuple[bytes, int, bytes]]) -> bytes:
    """The Contour Sequence of an ROI from :func:`_contour_item`'s pieces, numbering the contours 1, 2, ..."""
    items = []
    for number, (image_sequence, count, data) in enumerate(contours, start=1):
        items.append(_item(image_sequence
                           + _element(0x3006, 0x0042, _text("CLOSED_PLANAR"))
                           + _element(0x3006, 0x0046, _text(str(count)))
                           + _element(0x3006, 0x0048, _text(str(number)))
                           + _element(0x3006, 0x0050, data)))
    return b"".join(items)


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _ui(uid) -> bytes:
    value = str(uid).encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def _text(text: str) -> bytes:
    value = text.encode("ascii")
    return value + b" " if len(value) % 2 else value


def _ds_value(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit), to 0.0001 mm where it fits."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]


def _contour_points(contour: Dataset) -> np.ndarray:
    """ContourData as an ``(n, 3)`` float array, parsed from the encoded value where it is still raw."""
    element = contour.get_item(_CONTOUR_DATA)
    if element is None:
        return np.zeros((0, 3))
    if isinstance(element, RawDataElement):
        text = (element.value or b"").decode("ascii").strip(" \x00")
        values = np.array(text.split("\\"), dtype=np.float64) if text else np.zeros(0)
    else:
        values = np.asarray([float(v) for v in element.value], np.float64)
    return values.reshape(-1, 3)


def _copy(item: Dataset) -> Dataset:
    out = Dataset()
    for element in item:
        out.add(element)
    return out


def _structure_set(source, images, label_names, contours, algorithm_name, version, model_sha256,
                   anatomic_region, series_number, series_description) -> Dataset:
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # Implicit VR: 4-byte lengths, so a long contour's Contour Data (DS) may pass 64 KiB
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if source.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for keyword in _COPIED:  # patient and general study modules, as the source has them
        if keyword in source:
            ds.add(source[keyword])
        elif keyword in _TYPE_2:
            setattr(ds, keyword, "")
    ds.FrameOfReferenceUID = source.FrameOfReferenceUID  # frame of reference module: the source's
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "") or ""
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number if series_number is not None else _default_series_number(source) + 1
    ds.SeriesDescription = (series_description or f"{algorithm_name} structures")[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    ds.Manufacturer = algorithm_name
    ds.ManufacturerModelName = algorithm_name
    ds.SoftwareVersions = version
    ds.DeviceSerialNumber = "0"
    ds.InstanceNumber = 1

    ds.StructureSetLabel = f"{algorithm_name}"[:16]
    ds.StructureSetName = f"{algorithm_name} {version}"[:64]
    ds.StructureSetDescription = f"{algorithm_name} {version} automatic segmentation"
    ds.StructureSetDate, ds.StructureSetTime = date, time

    frame_of_reference = Dataset()
    frame_of_reference.FrameOfReferenceUID = source.FrameOfReferenceUID
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_COMPONENT_CLASS
    study.ReferencedSOPInstanceUID = source.StudyInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence([_copy(reference) for _, reference in images])
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame_of_reference.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_of_reference])

    category, kind = lesion_codes()
    region = code_item(anatomic_region) if anatomic_region else None
    rois, observations = [], []
    for number, name in enumerate(label_names[1:], start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = source.FrameOfReferenceUID
        roi.ROIName = name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm_name} {version}"[:64]
        roi.ROIDerivationAlgorithmIdentificationSequence = DicomSequence(
            [_algorithm_item(algorithm_name, version, model_sha256)])
        rois.append(roi)


        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = ""  # an automatic finding, not a planning volume (GTV/PTV/...)
        observation.ROIInterpreter = ""
        observation.RTROIIdentificationCodeSequence = DicomSequence([kind])
        observation.SegmentedPropertyCategoryCodeSequence = DicomSequence([category])
        if region is not None:
            observation.AnatomicRegionSequence = DicomSequence([region])
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def _encode_file(ds: Dataset, contours: dict[int, list[tuple[bytes, int, bytes]]]) -> bytes:
    """The file: pydicom encodes everything but the ROI Contour Sequence (3006,0039), which is encoded
    here (pydicom re-parses raw sequences before writing them); it goes between the elements before it
    and the RT ROI Observations Sequence (3006,0080), the only top-level element after it."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    observations = Dataset()
    observations.RTROIObservationsSequence = ds.RTROIObservationsSequence
    del ds.RTROIObservationsSequence
    late = [tag for tag in ds.keys() if tag >= _ROI_CONTOUR_SEQUENCE]
    if late:  # the ROI Contour Sequence would not be in tag order
        raise RuntimeError(f"RTSTRUCT encoding: unexpected top-level elements {late} after (3006,0039)")
    head = DicomBytesIO()
    ds.save_as(head, enforce_file_format=True)
    tail = DicomBytesIO()
    tail.is_little_endian, tail.is_implicit_VR = True, True
    write_dataset(tail, observations)
    items = []
    for number in sorted(contours):
        colour = _COLOURS[(number - 1) % len(_COLOURS)]
        body = _element(0x3006, 0x002A, _text("\\".join(str(v) for v in colour)))
        if contours[number]:
            body += _element(0x3006, 0x0040, _encode_contours(contours[number]))
        body += _element(0x3006, 0x0084, _text(str(number)))
        items.append(_item(body))
    return head.getvalue() + _element(0x3006, 0x0039, b"".join(items)) + tail.getvalue()


def _algorithm_item(name: str, version: str, model_sha256: str) -> Dataset:
    from pipeline.io.dicom_seg import algorithm_family_item

    item = Dataset()
    item.AlgorithmFamilyCodeSequence = DicomSequence([algorithm_family_item()])
    item.AlgorithmName = name[:64]
    item.AlgorithmVersion = version[:64]
    if model_sha256:
        item.AlgorithmParameters = f"model_sha256={model_sha256}"
    return item


# ---------------------------------------------------------------------------------------------------
# Reading (rasterising the contours back onto the series grid)


def read_rtstruct(
    path: PathLike,
    source_files: Sequence[PathLike],
    affine: np.ndarray | None = None,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """An RT Structure Set's closed planar contours filled even-odd onto a series grid, as a uint8 map of
    ROI numbers (where ROIs overlap, the higher number wins).

    The grid is ``affine``/``shape``; without them, the grid :class:`~pipeline.io.reader.ScanReader`
    gives ``source_files``. Each contour is placed on the source image its Contour Image Sequence
    references (else on the image whose plane holds it) and must lie in that plane (within
    :data:`PLANE_TOLERANCE_MM` mm, or a tenth of a pixel for other tools' contours).
    """
    from pipeline.io.dicom_seg import _series_grid

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises many types for truncated or foreign files
        raise InputError(f"cannot read RTSTRUCT '{path}': {exc}") from None
    if ds.get("SOPClassUID") != RT_STRUCTURE_SET_STORAGE:
        raise InputError(f"'{path}' has SOP class {ds.get('SOPClassUID')}: expected an RT Structure Set "
                         f"({RT_STRUCTURE_SET_STORAGE})")
    if affine is None or shape is None:
        affine, shape = _series_grid(source_files)
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)

    planes: dict[tuple[str, int], _Plane] = {}
    for source in source_files:
        header = _read_header(source)
        for n, plane in enumerate(_source_planes(header, source), start=1):
            planes[(str(header.SOPInstanceUID), n)] = plane
    references = {}
    for item in ds.get("StructureSetROISequence", []):
        references[int(item.ROINumber)] = str(item.get("ReferencedFrameOfReferenceUID", ""))
    frames_of_reference = {str(_dcmread_header(s).get("FrameOfReferenceUID")) for s in source_files[:1]}

    out = np.zeros(shape, np.uint8)
    for roi in sorted(ds.get("ROIContourSequence", []), key=lambda r: int(r.ReferencedROINumber)):
        number = int(roi.ReferencedROINumber)
        if number > 255:
            raise InputError(f"'{path}' numbers ROIs above 255: a uint8 label map cannot hold them")
        if references.get(number) and references[number] not in frames_of_reference:
            raise InputError(f"ROI {number} of RTSTRUCT '{path}' is in frame of reference {references[number]}, "
                             f"the source series in {sorted(frames_of_reference)}: pass the series it was drawn on")
        loops: dict[tuple[str, int], list[np.ndarray]] = {}
        for contour in roi.get("ContourSequence", []):
            if contour.get("ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
                continue  # points and open polylines enclose no area
            points = _contour_points(contour)
            key = _contour_image(contour, points, planes, path)
            plane = planes[key]
            offset = points - plane.position
            normal = np.cross(plane.row_cosine, plane.column_cosine)
            off_plane = float(np.abs(offset @ normal).max())
            tolerance = max(PLANE_TOLERANCE_MM, 0.1 * min(plane.row_spacing, plane.column_spacing))
            if off_plane > tolerance:
                raise InputError(f"a contour of ROI {number} in RTSTRUCT '{path}' lies {off_plane:.3f} mm off the "
                                 f"plane of the image it references ({plane.what}; tolerance {tolerance:.3f} mm)")
            rows = offset @ plane.column_cosine / plane.row_spacing
            columns = offset @ plane.row_cosine / plane.column_spacing
            loops.setdefault(key, []).append(np.stack([rows, columns], axis=1))
        for key, image_loops in loops.items():
            plane = planes[key]
            filled = fill_contours(image_loops, plane.rows, plane.columns)
            where = plane.locate(affine, shape)
            previous = where.read(out)
            where.write(out, np.where(filled, np.uint8(number), previous))
    return out


def _contour_image(contour: Dataset, points: np.ndarray, planes: dict, path) -> tuple[str, int]:
    images = contour.get("ContourImageSequence") or []
    if images:
        item = images[0]
        key = (str(item.ReferencedSOPInstanceUID), int(item.get("ReferencedFrameNumber", 1) or 1))
        if key not in planes:
            raise InputError(f"a contour in RTSTRUCT '{path}' references image {key[0]} (frame {key[1]}), which "
                             "is not among the source files: pass the series the structures were drawn on")
        return key
    centre = points.mean(axis=0)  # no reference: the image whose plane holds the contour
    distances = {key: abs(float((centre - p.position) @ np.cross(p.row_cosine, p.column_cosine)))
                 for key, p in planes.items()}
    key = min(distances, key=distances.get)
    plane = planes[key]
    if distances[key] > 0.1 * min(plane.row_spacing, plane.column_spacing):
        raise InputError(f"a contour in RTSTRUCT '{path}' references no image and lies on no source image's "
                         f"plane (nearest {distances[key]:.2f} mm away): pass the series it was drawn on")
    return key
