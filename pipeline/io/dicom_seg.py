"""DICOM SEG output (and input) for masks on the grid :class:`~pipeline.io.reader.ScanReader` gives a series.

The mask is never assumed to share the series' file or axis order. Each source image's pixels are
placed in world space from its own header (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing) and mapped to mask indices through the mask's affine, so the SEG holds one frame per
source instance (or source frame, for an enhanced multi-frame source) and segment, pixel-for-pixel with
it. Reading walks the other way: each
SEG frame is placed through its plane position/orientation/pixel measures (per-frame or shared
functional groups) onto the caller's grid.

Pixel ``(r, c)`` of a frame lies at ``IPP + c * col_spacing * row_cosine + r * row_spacing * col_cosine``
(LPS), where ImageOrientationPatient's first triplet is the direction along a row (increasing
column) and PixelSpacing is ``[row spacing, column spacing]``. Every pixel must land within
:data:`INDEX_TOLERANCE` voxel of a grid point inside the mask, and (when writing) every mask voxel
must lie under exactly one source pixel, else the grids do not match and :class:`InputError` says so.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pipeline.errors import InputError
from pipeline.io.atomic import atomic_path
from pipeline.io.geometry import LPS_TO_RAS

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
INDEX_TOLERANCE = 0.01  # voxels: how far a pixel centre may sit from a grid point of the mask
_PLANE_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
# where each of _PLANE_KEYWORDS sits in a SEG's functional groups
_PLANE_GROUPS = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
_DISTRIBUTION = "medseg-pipeline"


class _Plane:
    """Where the pixels of one 2D frame lie in world space (LPS), from DICOM plane attributes."""

    def __init__(self, position, orientation, spacing, rows: int, columns: int, what: str):
        try:
            self.position = np.asarray([float(v) for v in position], dtype=np.float64)
            orientation = np.asarray([float(v) for v in orientation], dtype=np.float64)
            spacing = np.asarray([float(v) for v in spacing], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(
                f"{what} has unreadable plane geometry (ImagePositionPatient {position!r}, "
                f"ImageOrientationPatient {orientation!r}, PixelSpacing {spacing!r}): expected 3, 6 and 2 "
                "numbers. The file is not a valid cross-sectional image; re-export it"
            ) from None
        if self.position.shape != (3,) or orientation.shape != (6,) or spacing.shape != (2,):
            raise InputError(
                f"{what} has ImagePositionPatient/ImageOrientationPatient/PixelSpacing with "
                f"{self.position.size}/{orientation.size}/{spacing.size} values: expected 3/6/2"
            )
        self.row_cosine, self.column_cosine = orientation[:3], orientation[3:]
        self.row_spacing, self.column_spacing = spacing
        self.rows, self.columns = int(rows), int(columns)
        self.what = what

    def locate(self, affine: np.ndarray, shape: Sequence[int]) -> _FrameIndex:
        """Where this plane's pixels sit in a volume of ``shape`` whose grid is ``affine`` (RAS).

        Raises :class:`InputError` when a pixel is off the grid (by more than :data:`INDEX_TOLERANCE`
        voxel) or outside the volume.
        """
        world_to_index = np.linalg.inv(affine) @ LPS_TO_RAS  # LPS world -> volume index
        linear, offset = world_to_index[:3, :3], world_to_index[:3, 3]
        origin = linear @ self.position + offset  # index of pixel (0, 0)
        down = linear @ (self.column_cosine * self.row_spacing)  # index step to the next row
        along = linear @ (self.row_cosine * self.column_spacing)  # index step to the next column
        start, whole_down, whole_along = np.rint(origin), np.rint(down), np.rint(along)
        # Pixel (r, c) is at origin + r*down + c*along; its distance to the grid point start + r*whole_down
        # + c*whole_along is affine in (r, c), so it is largest at a corner pixel: checking the four
        # corners checks every pixel.
        last_row, last_column = self.rows - 1, self.columns - 1
        corners = np.array([[0, 0], [0, last_column], [last_row, 0], [last_row, last_column]])
        exact = origin + corners[:, :1] * down + corners[:, 1:] * along
        whole = start + corners[:, :1] * whole_down + corners[:, 1:] * whole_along
        off_grid = np.abs(exact - whole).max(axis=0)
        axis = int(off_grid.argmax())
        if off_grid[axis] > INDEX_TOLERANCE:
            raise InputError(
                f"mask grid does not match {self.what}: its pixels fall up to {off_grid[axis]:.3f} voxel "
                f"between grid points along mask axis {axis} (tolerance {INDEX_TOLERANCE}). Expected a "
                "mask on the grid ScanReader gives this series (same spacing and orientation, no "
                "resampling); pass the affine of that grid"
            )
        for axis in range(3):
            low, high = int(whole[:, axis].min()), int(whole[:, axis].max())
            if low < 0 or high >= shape[axis]:
                raise InputError(
                    f"mask grid does not match {self.what}: its pixels reach indices {low}..{high} along "
                    f"mask axis {axis}, outside the mask's 0..{shape[axis] - 1}. Expected a mask covering "
                    "the whole series (not cropped); pass the mask and affine of the full series grid"
                )
        to_int = lambda v: v.astype(np.intp)  # noqa: E731
        return _FrameIndex(to_int(start), to_int(whole_down), to_int(whole_along), self.rows, self.columns)


class _FrameIndex:
    """The voxels under a frame's pixels: ``volume[index]`` (transposed where needed) is the frame.

    A frame along the grid axes (always, for a mask in the series' own grid) is a slice view, much
    faster to gather and scatter than one index per pixel, which other frames fall back to.
    """

    def __init__(self, start: np.ndarray, down: np.ndarray, along: np.ndarray, rows: int, columns: int):
        (row_axes,), (column_axes,) = np.nonzero(down), np.nonzero(along)
        if len(row_axes) == 1 and len(column_axes) == 1 and row_axes[0] != column_axes[0] and (
            abs(down[row_axes[0]]) == abs(along[column_axes[0]]) == 1
        ):
            index: list = [int(v) for v in start]  # the through-plane axis stays an integer
            for axis, step, count in ((row_axes[0], down, rows), (column_axes[0], along, columns)):
                stop = int(start[axis] + step[axis] * count)
                index[axis] = slice(int(start[axis]), stop if stop >= 0 else None, int(step[axis]))
            self.index, self.transpose = tuple(index), bool(row_axes[0] > column_axes[0])
        else:
            r, c = np.arange(rows)[:, None], np.arange(columns)[None, :]
            self.index = tuple(start[a] + r * down[a] + c * along[a] for a in range(3))
            self.transpose = False

    def read(self, volume: np.ndarray) -> np.ndarray:
        """The frame ``(rows, columns)`` of ``volume`` (a view where possible)."""
        region = volume[self.index]
        return region.T if self.transpose else region

    def write(self, volume: np.ndarray, frame: np.ndarray) -> None:
        volume[self.index] = frame.T if self.transpose else frame


# ---------------------------------------------------------------------------------------------------
# Writing


def write_dicom_seg(
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
    series_number: int | None = None,
    series_description: str | None = None,
) -> Path:
    """Write ``labels`` as a BINARY DICOM SEG of the series ``source_files``: classic single-frame files,
    or one enhanced multi-frame file (each frame placed by its own functional groups). A Siemens mosaic
    or a legacy multi-frame file (frames without positions of their own) is refused with
    :class:`InputError`: their slices have no plane of their own for a SEG frame to reference.

    ``labels`` (integers ``0..len(label_names) - 1``, 0 = background) and ``affine`` (4x4 RAS) are the
    mask on the grid :class:`~pipeline.io.reader.ScanReader` gives the series; any file order works.
    Label ``n >= 1`` becomes segment ``n``, labelled ``label_names[n]`` (category "Morphologically
    abnormal structure", type "Lesion", automatic, AI algorithm ``algorithm_name``/``algorithm_version``,
    by default the installed pipeline version, parameters ``model_sha256=...`` when given; anatomic region
    ``anatomic_region``, ``SCHEME:CODE:Meaning`` such as ``SCT:10200004:Liver``, when given). A source whose
    dataset lacks SOPInstanceUID/SOPClassUID (anonymised exports) is referenced by its file meta's
    MediaStorageSOPInstanceUID/ClassUID. Empty frames are omitted; a mask without any foreground
    keeps every (empty) frame, so the SEG still references the whole series. The file appears
    atomically at ``out_path``, which is returned.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels, affine, label_names = _check_write_inputs(labels, affine, source_files, label_names)
    headers = [_read_header(path) for path in source_files]
    _check_single_series(headers, source_files)

    frames = _gather_frames(labels, affine, headers, source_files)

    version = algorithm_version or _pipeline_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence,
        parameters={"model_sha256": model_sha256} if model_sha256 else None,
    )
    region = code_item(anatomic_region) if anatomic_region else None
    region_code = hd.sr.CodedConcept(region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning) \
        if region is not None else None
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[region_code] if region_code is not None else None,
        )
        for number, name in enumerate(label_names[1:], start=1)
    ]
    if not frames.any():  # a SEG needs frames: keep every (empty) frame so it references the series
        log.info("the mask has no foreground: writing a SEG whose frames are all empty")
    with warnings.catch_warnings():
        # highdicom questions the source's one-component patient names; they are copied as they are
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = _segmentation(hd, headers, frames, descriptions, algorithm_name, version, series_number)
    seg.SeriesDescription = (series_description or f"{algorithm_name} segmentation")[:64]

    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    log.debug("wrote DICOM SEG %s: %d frames, %d segments", out_path, seg.NumberOfFrames, len(descriptions))
    return out_path


def _gather_frames(labels, affine, headers, source_files) -> np.ndarray:
    """One frame per source image: the mask under each of its pixels (pixel-for-pixel)."""
    planes = [plane for path, header in zip(source_files, headers) for plane in _source_planes(header, path)]
    frames = np.zeros((len(planes), headers[0].Rows, headers[0].Columns), np.uint8)
    covered = np.zeros(labels.shape, bool)
    for n, plane in enumerate(planes):
        where = plane.locate(affine, labels.shape)
        frames[n] = where.read(labels)
        where.write(covered, np.ones(frames.shape[1:], bool))
    hit = int(np.count_nonzero(covered))
    if hit != labels.size or frames.size != labels.size:
        raise InputError(
            f"mask grid does not match the series: its {len(planes)} image(s) of {frames.shape[1]}x"
            f"{frames.shape[2]} pixels cover {hit} of the mask's {labels.size} voxels {labels.shape} "
            f"({frames.size - hit} pixel(s) on an already covered voxel). Expected the grid ScanReader "
            "gives exactly these files (same spacing, no resampling, every slice passed once)"
        )
    return frames


def _segmentation(hd, headers, frames, descriptions, algorithm_name, version, series_number):
    return hd.seg.Segmentation(
        source_images=_shared_orientation([_with_shared_plane(h) for h in headers]),
        pixel_array=frames,  # label-map style: pixel value n is segment n
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number if series_number is not None else _default_series_number(headers[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=algorithm_name,
        manufacturer_model_name=algorithm_name,
        software_versions=version,
        device_serial_number="0",
        omit_empty_frames=bool(frames.any()),
        content_label="SEGMENTATION",
        content_description=f"{algorithm_name} {version}"[:64],
        specific_character_set=_character_set(headers[0]),
    )


def _shared_orientation(headers: list[Dataset]) -> list[Dataset]:
    """Single-frame sources whose ImageOrientationPatient differ only by rounding (GE writes each slice's
    to 13 digits, differing around the 8th) get the first one's, which highdicom requires to be shared;
    a real difference (over 1e-4) is left for highdicom to refuse."""
    first = headers[0].get("ImageOrientationPatient")
    if first is None or len(headers) < 2:
        return headers
    reference = np.asarray([float(v) for v in first])
    out = []
    for header in headers:
        value = header.get("ImageOrientationPatient")
        if value is not None and value != first and np.abs(np.asarray([float(v) for v in value]) - reference).max() < 1e-4:
            header = copy.copy(header)  # a shallow copy: only this element changes
            header.ImageOrientationPatient = first
        out.append(header)
    return out


def _character_set(source: Dataset):
    """The source's SpecificCharacterSet where highdicom knows it; none (ASCII) when empty; else UTF-8."""
    from highdicom.enum import SpecificCharacterSetValues

    value = source.get("SpecificCharacterSet")
    values = [value] if isinstance(value, str) else list(value or [])
    values = [v for v in values if v]
    if not values:
        return None
    known = {member.value for member in SpecificCharacterSetValues}
    if all(v in known for v in values):
        return values[0] if len(values) == 1 else values
    log.warning("source SpecificCharacterSet %s unknown to highdicom: writing the SEG as UTF-8", values)
    return "ISO_IR 192"


def _check_write_inputs(labels, affine, source_files, label_names, what: str = "write_dicom_seg"):
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=np.float64)
    label_names = [str(name) for name in label_names]
    if labels.ndim != 3:
        raise InputError(f"{what} expected a 3D label map [i, j, k], found shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(
            f"{what} expected integer labels, found dtype {labels.dtype}. Threshold or argmax "
            "the prediction first"
        )
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{what} expected an invertible 4x4 RAS affine, found {affine.tolist()}")
    if not 2 <= len(label_names) <= 256:
        raise InputError(
            f"{what} expected names for background and 1 to 255 labels, "
            f"found {len(label_names)} name(s): {label_names}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(label_names)):
        raise InputError(
            f"{what} found label values {int(labels.min())}..{int(labels.max())} but only "
            f"{len(label_names)} label names {label_names} (values 0..{len(label_names) - 1}). Pass a name "
            "for every label value"
        )
    if len(source_files) == 0:
        raise InputError(f"{what} expected the DICOM files of the source series, found none")
    return labels.astype(np.uint8, copy=False), affine, label_names


def _dcmread_header(path: PathLike) -> Dataset:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for truncated or foreign files
        raise InputError(f"cannot read DICOM file '{path}': {exc}. Pass the source series' files") from None


def _read_header(path: PathLike) -> Dataset:
    """A source image's header, checked to be a single-frame image of a series or an enhanced multi-frame
    image whose frames carry their own planes."""
    header = _dcmread_header(path)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    if "MOSAIC" in image_type:
        raise InputError(
            f"source image '{path}' is a Siemens mosaic: its slices are tiles of one image, which a DICOM SEG "
            "frame cannot reference. The NIfTI mask holds the segmentation"
        )
    if frames > 1 and "PerFrameFunctionalGroupsSequence" not in header:
        raise InputError(
            f"source image '{path}' is a legacy multi-frame image ({frames} frames without per-frame "
            "functional groups): its frames have no plane of their own for a DICOM SEG to reference. The "
            "NIfTI mask holds the segmentation"
        )
    _uids_from_file_meta(header, path)
    required = ("SOPInstanceUID", "SOPClassUID", "Rows", "Columns", "FrameOfReferenceUID")
    missing = [keyword for keyword in required if keyword not in header]
    if missing:
        raise InputError(f"source image '{path}' lacks {', '.join(missing)}: expected a CT/MR slice")
    return header


def _uids_from_file_meta(header: Dataset, path: PathLike) -> None:
    """Fill an empty dataset-level SOPInstanceUID/SOPClassUID from the file meta (anonymisers that blank
    the dataset's UIDs keep MediaStorageSOPInstanceUID/ClassUID, which name the same instance); refuse a
    file where neither holds one: a reference to it would not name an instance."""
    meta = getattr(header, "file_meta", None) or Dataset()
    for keyword, meta_keyword in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                                  ("SOPClassUID", "MediaStorageSOPClassUID")):
        if str(header.get(keyword, "") or "").strip():
            continue
        value = str(meta.get(meta_keyword, "") or "").strip()
        if not value:
            raise InputError(
                f"source image '{path}' has no {keyword}, neither in the dataset nor as {meta_keyword} in its "
                "file meta: a DICOM SEG or RTSTRUCT cannot reference it. Re-export the series keeping the "
                "instance UIDs (the NIfTI mask holds the segmentation)"
            )
        log.info("source image '%s': empty %s, using the file meta's %s", path, keyword, meta_keyword)
        setattr(header, keyword, value)


def lesion_codes() -> tuple[Dataset, Dataset]:
    """The coded concepts of a lesion segment or ROI: category SCT 49755003 "Morphologically abnormal
    structure", type SCT 52988006 "Lesion" (as Code Sequence items)."""
    return code_item("SCT:49755003:Morphologically abnormal structure"), code_item("SCT:52988006:Lesion")


def algorithm_family_item() -> Dataset:
    """DCM 113037 "Artificial Intelligence" (CID 7162), the algorithm family of medseg's outputs."""
    return code_item("DCM:113037:Artificial Intelligence")


def code_item(text: str) -> Dataset:
    """A Code Sequence item from ``SCHEME:CODE:Meaning`` (e.g. ``SCT:10200004:Liver``), else InputError."""
    parts = [part.strip() for part in str(text).split(":", 2)]
    if len(parts) != 3 or not all(parts):
        raise InputError(f"coded concept {text!r} is not SCHEME:CODE:Meaning: expected e.g. SCT:10200004:Liver")
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = parts[1], parts[0], parts[2][:64]
    return item


def _check_single_series(headers: list[Dataset], paths: Sequence[PathLike]) -> None:
    def key(h):
        return (h.get("SeriesInstanceUID"), h.FrameOfReferenceUID, int(h.Rows), int(h.Columns))

    first = key(headers[0])
    for path, header in zip(paths, headers):
        if key(header) != first:
            raise InputError(
                f"source image '{path}' has (series, frame of reference, rows, columns) {key(header)}, "
                f"expected {first} like '{paths[0]}'. Pass the files of one series only"
            )
    uids = [str(header.SOPInstanceUID) for header in headers]
    if len(set(uids)) != len(uids):
        repeated = next(uid for uid in uids if uids.count(uid) > 1)
        where = [str(path) for path, uid in zip(paths, uids) if uid == repeated]
        raise InputError(
            f"source files list the same SOP instance more than once ({len(uids) - len(set(uids))} repeat(s), "
            f"e.g. {where[:2]}): pass each slice once")
    if len(headers) > 1 and any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
        raise InputError(
            f"the volume's frames come from {len(headers)} multi-frame files: a DICOM SEG references one "
            "multi-frame source image. The NIfTI mask holds the segmentation"
        )


def _with_shared_plane(header: Dataset) -> Dataset:
    """An enhanced source whose frames all share one orientation and pixel spacing, with them in the shared
    functional groups (highdicom reads them only there; scanners such as Siemens XA put them per frame).
    Other headers are returned as they are."""
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return header
    shared = header.get("SharedFunctionalGroupsSequence")
    missing = [g for g in ("PlaneOrientationSequence", "PixelMeasuresSequence") if not shared or g not in shared[0]]
    if not missing:
        return header
    from pydicom.sequence import Sequence as DicomSequence

    header = copy.deepcopy(header)
    if not header.get("SharedFunctionalGroupsSequence"):
        header.SharedFunctionalGroupsSequence = DicomSequence([Dataset()])
    shared_item = header.SharedFunctionalGroupsSequence[0]
    for group in missing:
        items = [frame[group][0] for frame in header.PerFrameFunctionalGroupsSequence if group in frame]
        if len(items) != len(header.PerFrameFunctionalGroupsSequence) or any(i != items[0] for i in items[1:]):
            raise InputError(f"the frames of source image '{header.get('filename', '')}' differ in {group}: "
                             "a DICOM SEG of it is not supported. The NIfTI mask holds the segmentation")
        setattr(shared_item, group, DicomSequence([copy.deepcopy(items[0])]))
        for frame in header.PerFrameFunctionalGroupsSequence:
            del frame[group]
    return header


def _source_planes(header: Dataset, path: PathLike) -> list[_Plane]:
    """The planes of a source image: one for a single-frame file, one per frame of an enhanced file."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in header:
        return [_source_plane(header, f"source image '{path}'")]
    planes = []
    for n in range(frames):
        what = f"frame {n + 1} of source image '{path}'"
        values = []
        for keyword, group in zip(_PLANE_KEYWORDS, _PLANE_GROUPS):
            item = _group_item(header, n, group)
            if item is None or keyword not in item:
                raise InputError(f"{what} has no {keyword} in its functional groups: cannot place it")
            values.append(item[keyword].value)
        planes.append(_Plane(*values, header.Rows, header.Columns, what))
    return planes


def _source_plane(header: Dataset, what: str) -> _Plane:
    missing = [k for k in _PLANE_KEYWORDS if k not in header]
    if missing:
        raise InputError(f"{what} lacks {', '.join(missing)}: expected a cross-sectional (CT/MR) image")
    position, orientation, spacing = (header[k].value for k in _PLANE_KEYWORDS)
    return _Plane(position, orientation, spacing, header.Rows, header.Columns, what)


def _pipeline_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(_DISTRIBUTION)
    except PackageNotFoundError:
        return "0"


def _default_series_number(source: Dataset) -> int:
    """The source series number + 1000, so viewers list the SEG beside its series."""
    try:
        return int(source.get("SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        return 1000


# ---------------------------------------------------------------------------------------------------
# Reading


def read_dicom_seg(
    seg_path: PathLike,
    source_files: Sequence[PathLike],
    affine: np.ndarray | None = None,
    shape: Sequence[int] | None = None,
) -> np.ndarray:
    """A DICOM SEG (ours or another tool's) as a uint8 label map (segment number per voxel).

    The map is on the grid ``affine``/``shape``; without them, on the grid
    :class:`~pipeline.io.reader.ScanReader` gives ``source_files`` (which reads the whole series). Each
    frame is placed by its own plane position, orientation and pixel measures; a frame without a plane
    position takes its referenced source image's. BINARY, FRACTIONAL (thresholded at half the maximum)
    and LABELMAP SEGs are read; where segments overlap, the higher segment number wins.
    """
    seg = _read_seg(seg_path)
    headers = {}
    for path in source_files:
        header = _dcmread_header(path)
        headers[str(header.get("SOPInstanceUID"))] = (path, header)
    _check_seg_matches_series(seg, seg_path, [h for _, h in headers.values()])
    if affine is None or shape is None:
        affine, shape = _series_grid(source_files)
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)

    pixels = _frames(seg, seg_path)
    label_map = seg.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE or seg.get("SegmentationType") == "LABELMAP"
    out = np.zeros(shape, np.uint8)
    overlaps = 0
    for n in range(pixels.shape[0]):
        where = _seg_frame_plane(seg, n, headers, seg_path).locate(affine, shape)
        frame = pixels[n]
        if label_map:
            values = frame.astype(np.uint8)
        else:
            number = np.uint8(_segment_number(seg, n, seg_path))
            values = np.where(frame > _threshold(seg), number, np.uint8(0))
        previous = where.read(out)
        overlaps += int(np.count_nonzero((previous > 0) & (values > 0) & (previous != values)))
        where.write(out, np.maximum(previous, values))
    if overlaps:
        log.warning("%s: %d voxel(s) in several segments; kept the highest number", seg_path, overlaps)
    return out


def _read_seg(seg_path: PathLike) -> Dataset:
    try:
        seg = pydicom.dcmread(str(seg_path))
    except Exception as exc:  # pydicom raises many types for truncated or foreign files
        raise InputError(f"cannot read DICOM SEG '{seg_path}': {exc}") from None
    if seg.get("SOPClassUID") not in (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE):
        raise InputError(
            f"'{seg_path}' has SOP class {seg.get('SOPClassUID')}: expected a DICOM Segmentation "
            f"({SEGMENTATION_STORAGE} or {LABEL_MAP_SEGMENTATION_STORAGE})"
        )
    numbers = [int(item.SegmentNumber) for item in seg.get("SegmentSequence", [])]
    if max(numbers, default=0) > 255:
        raise InputError(f"'{seg_path}' numbers segments above 255: a uint8 label map cannot hold them")
    return seg


def _check_seg_matches_series(seg: Dataset, seg_path: PathLike, headers: list[Dataset]) -> None:
    if not headers:
        raise InputError(f"read_dicom_seg expected the files of the series '{seg_path}' segments, found none")
    frames_of_reference = {str(h.get("FrameOfReferenceUID")) for h in headers}
    if str(seg.get("FrameOfReferenceUID")) not in frames_of_reference:
        raise InputError(
            f"DICOM SEG '{seg_path}' is in frame of reference {seg.get('FrameOfReferenceUID')}, the source "
            f"series in {sorted(frames_of_reference)}: its positions cannot be placed on this series. Pass "
            "the series the SEG was drawn on"
        )


def _series_grid(source_files: Sequence[PathLike]) -> tuple[np.ndarray, tuple[int, ...]]:
    from pipeline.io.reader import ScanReader

    reader = ScanReader()
    array, meta = reader.get_data(reader.read([str(p) for p in source_files]))
    return np.asarray(meta["affine"], dtype=np.float64), array.shape


def _frames(seg: Dataset, seg_path: PathLike) -> np.ndarray:
    try:
        pixels = seg.pixel_array
    except Exception as exc:  # missing decoder plugin, truncated pixel data, ...
        raise InputError(f"cannot decode the pixel data of DICOM SEG '{seg_path}': {exc}") from None
    return pixels.reshape(-1, int(seg.Rows), int(seg.Columns))


def _group_item(seg: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The functional group item ``sequence`` of ``frame``: per-frame first, else shared."""
    per_frame = seg.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame) and sequence in per_frame[frame]:
        return per_frame[frame][sequence][0]
    shared = seg.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        return shared[0][sequence][0]
    return None


def _seg_frame_plane(seg: Dataset, n: int, headers: dict, seg_path: PathLike) -> _Plane:
    """Frame ``n``'s plane from its functional groups; what they lack, from its referenced source image."""
    what = f"frame {n + 1} of DICOM SEG '{seg_path}'"
    source = _referenced_source(seg, n, headers)
    values = []
    for keyword, group in zip(_PLANE_KEYWORDS, _PLANE_GROUPS):
        item = _group_item(seg, n, group)
        if item is not None and keyword in item:
            values.append(item[keyword].value)
        elif source is not None and keyword in source[1]:
            values.append(source[1][keyword].value)
        else:
            raise InputError(
                f"{what} has no {keyword} and references no image of the given source files that has: "
                "cannot place it. Pass the series the SEG was drawn on"
            )
    return _Plane(*values, seg.Rows, seg.Columns, what)


def _referenced_source(seg: Dataset, n: int, headers: dict):
    derivation = _group_item(seg, n, "DerivationImageSequence")
    if derivation is None:
        return None
    for item in derivation.get("SourceImageSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID"))
        if uid in headers:
            return headers[uid]
    return None


def _segment_number(seg: Dataset, n: int, seg_path: PathLike) -> int:
    item = _group_item(seg, n, "SegmentIdentificationSequence")
    if item is None or "ReferencedSegmentNumber" not in item:
        raise InputError(f"frame {n + 1} of DICOM SEG '{seg_path}' has no SegmentIdentificationSequence")
    return int(item.ReferencedSegmentNumber)


def _threshold(seg: Dataset) -> float:
    if seg.get("SegmentationType") == "FRACTIONAL":
        return float(seg.get("MaximumFractionalValue", 255)) / 2
    return 0.0
