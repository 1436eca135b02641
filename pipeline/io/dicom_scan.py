"""Header-only scanning of DICOM files: is it DICOM, is it an image, and one record per 2D frame.

A record (:class:`Frame`) holds what grouping and stacking need — geometry, series identity, echo,
image type, acquisition order — read with ``stop_before_pixels``, so scanning thousands of files never
decodes pixel data. Classic single-frame files give one record; enhanced multi-frame files give one
per frame (per-frame functional groups); a Siemens mosaic gives one record for the whole file (it is
one volume, unpacked when read; :attr:`Frame.mosaic_slices` holds its slice count).

Records say where their geometry came from, and never guess silently: a missing PixelSpacing leaves
``spacing_tag`` empty (or ``"ImagerPixelSpacing"`` when only that detector-plane spacing is there) with
a 1 x 1 mm placeholder, and ``thickness_tag`` names the tag ``thickness`` came from. Whether a volume
with such a gap is refused or read under a stated assumption is decided when it is stacked
(``input.on_missing_spacing``, :func:`pipeline.io.dicom_stack.check_layout`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pipeline.errors import first_line

log = logging.getLogger(__name__)

# SOP classes that hold pixel data but are not scans to segment.
_NOT_SCANS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation (SEG) object, not a scan",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT dose grid, not a scan",
    "1.2.840.10008.1.3.10": "a DICOMDIR (media directory), not a scan",
}
_PLACEHOLDER_SPACING = (1.0, 1.0)  # where no spacing tag is present; refused unless input.on_missing_spacing=assume


@dataclass(frozen=True)
class SeriesInfo:
    """What identifies and describes a series; shared by all its frames (no patient identifiers)."""

    series_uid: str
    series_number: int
    series_description: str
    modality: str
    study_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sequence_name: str = ""  # SequenceName, else ScanningSequence (for input.channels rules)
    contrast_agent: str = ""  # ContrastBolusAgent ("" when none is recorded)


@dataclass(frozen=True)
class Frame:
    """One 2D image: a classic file, one frame of a multi-frame file, or a whole mosaic file."""

    path: str
    frame: Optional[int]  # index in a multi-frame file (0-based); None for single-frame files
    n_frames_in_file: int
    series: SeriesInfo
    position: tuple[float, float, float]  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction, then column direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm; see spacing_tag
    rows: int
    columns: int
    sop_uid: str
    instance_number: int
    order: tuple  # acquisition order within one position: temporal index, times, instance, frame
    echo: str  # EchoNumbers (or effective echo time for enhanced MR); "" when absent
    image_type: tuple[str, ...]
    rescale: Optional[tuple[float, float]]  # per-frame (slope, intercept) for multi-frame files
    gantry_tilt: float  # GantryDetectorTilt, degrees
    thickness: float = 0.0  # SpacingBetweenSlices or SliceThickness (used for single-slice volumes), mm
    mosaic: bool = False
    spacing_tag: str = "PixelSpacing"  # where pixel_spacing came from: PixelSpacing | ImagerPixelSpacing | "" (none)
    thickness_tag: str = ""  # where thickness came from: SpacingBetweenSlices | SliceThickness | "" (none)
    derived_position: bool = False  # legacy multi-frame: position = first + frame x thickness along the normal
    mosaic_slices: int = 0  # slices tiled in a Siemens mosaic (0: unknown)
    # PatientName/PatientID/AccessionNumber: read only to keep them out of ids and outputs
    private: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def normal(self) -> np.ndarray:
        return _normal(self.orientation)


def _normal(orientation) -> np.ndarray:
    """Unit slice normal: row direction × column direction."""
    normal = np.cross(np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:6], dtype=float))
    return normal / (np.linalg.norm(normal) or 1.0)


@dataclass
class ScanResult:
    """Frames read from one file, or the reason the file is not used."""

    frames: list[Frame]
    skip_reason: str = ""
    is_dicom: bool = True


def looks_like_dicom(path: Path) -> bool:
    """DICOM by content: the ``DICM`` marker after the 128-byte preamble, or (for preamble-less files)
    a first element in group 0002 or 0008, which a parse then confirms."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] < b"\x20\x00"


def scan_file(path: Path) -> ScanResult:
    """Header-only read of one DICOM file into frame records (or a reason to skip it)."""

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=not _has_marker(path))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        return ScanResult([], f"unreadable DICOM header ({type(exc).__name__}: {first_line(exc)})")
    except Exception as exc:  # pydicom raises many types on broken files
        return ScanResult([], f"unreadable DICOM header ({type(exc).__name__}: {first_line(exc)})")
    if "PerFrameFunctionalGroupsSequence" not in ds:
        ds = _Header(ds)
    sop_class = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", ""))
    if not sop_class and "ImagePositionPatient" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ScanResult([], "not a DICOM image (no SOP class, no image geometry)", is_dicom=False)
    if sop_class in _NOT_SCANS:
        return ScanResult([], _NOT_SCANS[sop_class])
    if not _has_pixels(ds):
        return ScanResult([], f"no pixel data ({_sop_name(sop_class)})")
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        frames = _multiframe_records(path, ds, sop_class)
    else:
        frames = _classic_records(path, ds, sop_class)
    if not frames:
        return ScanResult([], f"no patient geometry (ImagePositionPatient/ImageOrientationPatient) in "
                              f"{_sop_name(sop_class)}: a secondary capture or screenshot, not a scan")
    return ScanResult(frames)


# --- classic single-frame files (and Siemens mosaics) -------------------------------------------


def _classic_records(path: Path, ds, sop_class: str) -> list[Frame]:
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
        return []
    image_type = _image_type(ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    mosaic = "MOSAIC" in image_type and (0x0029, 0x1010) in ds
    pixel_spacing, spacing_tag = _spacing(ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing"))
    thickness, thickness_tag = _thickness(ds.get("SpacingBetweenSlices"), ds.get("SliceThickness"))
    common = dict(
        series=_series_info(ds, sop_class),
        orientation=tuple(float(v) for v in orientation),
        pixel_spacing=pixel_spacing,
        spacing_tag=spacing_tag,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        instance_number=_int(ds.get("InstanceNumber")),
        echo=_echo(ds),
        image_type=image_type,
        gantry_tilt=_float(ds.get("GantryDetectorTilt"), 0.0),
        thickness=thickness,
        thickness_tag=thickness_tag,
        mosaic=mosaic,
        mosaic_slices=_mosaic_slices(ds) if mosaic else 0,
        private=_names(ds),
    )
    order = (_int(ds.get("TemporalPositionIdentifier")), _time(ds.get("AcquisitionDate"), ds.get("AcquisitionTime")),
             _time(ds.get("ContentDate"), ds.get("ContentTime")), _int(ds.get("InstanceNumber")), str(path))
    if n_frames > 1:  # a legacy multi-frame file with one geometry: frames follow each other along the normal
        # The step is only certain from SpacingBetweenSlices; SliceThickness (or 1 mm without either) is an
        # assumption that check_layout refuses or records (input.on_missing_spacing).
        step = thickness or 1.0
        start = np.asarray(position, dtype=float)
        normal = _normal(common["orientation"])
        rescale = (_float(ds.get("RescaleSlope"), 1.0), _float(ds.get("RescaleIntercept"), 0.0))
        return [
            Frame(path=str(path), frame=f, n_frames_in_file=n_frames,
                  position=tuple(float(v) for v in start + f * step * normal),
                  order=order + (f,), rescale=rescale, derived_position=True, **common)
            for f in range(n_frames)
        ]
    rescale = (_float(ds.get("RescaleSlope"), 1.0), _float(ds.get("RescaleIntercept"), 0.0))
    return [Frame(path=str(path), frame=None, n_frames_in_file=1, position=tuple(float(v) for v in position),
                  order=order, rescale=rescale, **common)]


# --- enhanced multi-frame files -------------------------------------------------------------------


def _multiframe_records(path: Path, ds, sop_class: str) -> list[Frame]:
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    n_frames = int(ds.get("NumberOfFrames", len(per_frame) or 1) or 1)
    series = _series_info(ds, sop_class)
    image_type = _image_type(ds)
    frames = []
    for f in range(n_frames):
        group = per_frame[f] if f < len(per_frame) else None
        position = _functional(group, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        if position is None or orientation is None:
            return []
        pixel_spacing, spacing_tag = _spacing(_functional(group, shared, "PixelMeasuresSequence", "PixelSpacing"),
                                              ds.get("ImagerPixelSpacing"))
        thickness, thickness_tag = _thickness(
            _functional(group, shared, "PixelMeasuresSequence", "SpacingBetweenSlices"),
            _functional(group, shared, "PixelMeasuresSequence", "SliceThickness"))
        slope = _functional(group, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(group, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        temporal = _functional(group, shared, "FrameContentSequence", "TemporalPositionIndex")
        acquired = _functional(group, shared, "FrameContentSequence", "FrameAcquisitionDateTime")
        echo_time = _functional(group, shared, "MREchoSequence", "EffectiveEchoTime")
        frame_type = _functional(group, shared, "MRImageFrameTypeSequence", "FrameType") or \
            _functional(group, shared, "CTImageFrameTypeSequence", "FrameType")
        frames.append(Frame(
            path=str(path), frame=f, n_frames_in_file=n_frames, series=series,
            position=tuple(float(v) for v in position),
            orientation=tuple(float(v) for v in orientation),
            pixel_spacing=pixel_spacing,
            spacing_tag=spacing_tag,
            rows=int(ds.Rows), columns=int(ds.Columns),
            sop_uid=str(ds.get("SOPInstanceUID", "")),
            instance_number=_int(ds.get("InstanceNumber")),
            order=(_int(temporal), str(acquired or ""), _int(ds.get("InstanceNumber")), str(path), f),
            echo=_echo(ds) if echo_time is None else f"{float(echo_time):g}",
            image_type=tuple(str(v).upper() for v in frame_type) if frame_type else image_type,
            rescale=(_float(slope, 1.0), _float(intercept, 0.0)) if slope is not None or intercept is not None else None,
            gantry_tilt=0.0,
            thickness=thickness,
            thickness_tag=thickness_tag,
            private=_names(ds),
        ))
    return frames


def _functional(group, shared, sequence: str, keyword: str):
    for source in (group, shared):
        if source is None or sequence not in source or not source[sequence].value:
            continue
        item = source[sequence][0]
        if keyword in item:
            return item[keyword].value
    return None


# --- small helpers --------------------------------------------------------------------------------

_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI", "LT", "ST", "UT", "PN"}


class _Header:
    """Fast read-only access to a header's values.

    pydicom converts each element on first access (DSfloat objects, validation), which costs more than
    reading the file. Plain text elements are decoded here straight from the raw bytes; everything
    else (sequences, binary values, big-endian files) goes through pydicom.
    """

    def __init__(self, ds):
        self.ds = ds
        encoding = getattr(ds, "original_encoding", (None, True))
        self._raw_ok = encoding[1] is not False

    def __contains__(self, keyword) -> bool:
        return keyword in self.ds

    def get(self, keyword, default=None):
        tag = tag_for_keyword(keyword) if isinstance(keyword, str) else keyword
        if tag is None:  # not a data element keyword (e.g. file_meta)
            return getattr(self.ds, keyword, default)
        elem = self.ds._dict.get(tag)
        if elem is None:
            return default
        if self._raw_ok and isinstance(elem, RawDataElement) and elem.value is not None:
            vr = elem.VR or _safe_vr(dictionary_VR, tag)
            if vr in _TEXT_VRS:
                text = elem.value.decode("latin-1").rstrip("\x00 ").strip()
                if vr in ("DS", "IS") or "\\" in text:
                    parts = [p.strip() for p in text.split("\\")]
                    if vr in ("DS", "IS"):
                        try:
                            values = [float(p) if vr == "DS" else int(float(p)) for p in parts if p != ""]
                        except ValueError:
                            return self.ds.get(keyword, default)
                        return values[0] if len(values) == 1 else (values or default)
                    return parts
                return text
        value = self.ds.get(keyword, default)
        return default if value is None else value

    def __getattr__(self, keyword):
        value = self.get(keyword)
        if value is None:
            raise AttributeError(keyword)
        return value


def _safe_vr(dictionary_vr, tag) -> str:
    try:
        return dictionary_vr(tag)
    except KeyError:
        return ""



def _series_info(ds, sop_class: str) -> SeriesInfo:
    return SeriesInfo(
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        sop_class_uid=sop_class,
        sequence_name=_joined(ds.get("SequenceName")) or _joined(ds.get("ScanningSequence")),
        contrast_agent=str(ds.get("ContrastBolusAgent", "") or "").strip(),
    )


def _joined(value) -> str:
    """A (possibly multi-valued) string attribute as DICOM writes it: values joined by backslashes."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _names(ds) -> dict:
    """Patient name, ID and accession number, kept only so ids and paths can avoid them (never written)."""
    names = {}
    for keyword in ("PatientName", "PatientID", "AccessionNumber"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            names[keyword] = value
    return names


def _has_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _has_pixels(ds) -> bool:
    """``stop_before_pixels`` drops PixelData; the file had it when the parse stopped early."""
    if any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return True
    return "Rows" in ds and "Columns" in ds and "BitsAllocated" in ds


def _image_type(ds) -> tuple[str, ...]:
    value = ds.get("ImageType", None)
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\"))
    return tuple(str(v).strip().upper() for v in value)


def _echo(ds) -> str:
    value = ds.get("EchoNumbers", None)
    if value is None or value == "":
        return ""
    if not isinstance(value, (str, int, float)):
        value = "_".join(str(v) for v in value)
    return str(value)


def _spacing(pixel_spacing, imager_spacing) -> tuple[tuple[float, float], str]:
    """In-plane spacing and the tag it came from: PixelSpacing (in the patient), else ImagerPixelSpacing
    (at the detector: a projection's magnification is not in it), else a placeholder and ``""``."""
    for value, tag in ((pixel_spacing, "PixelSpacing"), (imager_spacing, "ImagerPixelSpacing")):
        pair = _positive_pair(value)
        if pair is not None:
            return pair, tag
    return _PLACEHOLDER_SPACING, ""


def _positive_pair(value) -> Optional[tuple[float, float]]:
    try:
        if value is None or isinstance(value, (str, bytes)) or len(value) != 2:
            return None
        pair = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    return pair if all(np.isfinite(pair)) and min(pair) > 0 else None


def _thickness(spacing_between, slice_thickness) -> tuple[float, str]:
    """Slice step or extent and its tag: SpacingBetweenSlices, else SliceThickness, else ``(0, "")``."""
    for value, tag in ((spacing_between, "SpacingBetweenSlices"), (slice_thickness, "SliceThickness")):
        number = _float(value, 0.0)
        if np.isfinite(number) and number > 0:
            return number, tag
    return 0.0, ""


def _mosaic_slices(ds) -> int:
    """Slices in a Siemens mosaic: NumberOfImagesInMosaic from the CSA image header (0 when unreadable)."""
    import warnings

    raw = getattr(ds, "ds", ds)  # the pydicom dataset under a _Header
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel.nicom warns that its DICOM readers are experimental
            from nibabel.nicom import csareader

            return int(csareader.get_n_mosaic(csareader.get_csa_header(raw, "image")) or 0)
    except Exception as exc:  # a private header in an unexpected layout
        log.debug("cannot read NumberOfImagesInMosaic from %s: %s", getattr(raw, "filename", "?"), exc)
        return 0


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _float(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _time(date, time) -> str:
    return f"{date or ''}{time or ''}"


def _sop_name(uid: str) -> str:
    name = UID(uid).name if uid else "unknown SOP class"
    return name or uid
