"""Stacking a :class:`~pipeline.io.dicom_series.DicomVolume` into one array and its affine.

* Frames are already sorted by the projection of ImagePositionPatient on the slice normal (never by
  InstanceNumber). The slice axis is the vector from the first to the last position / (n - 1).
* The geometry is checked before any pixel is decoded: repeated positions, missing slices or uneven
  spacing, and gantry tilt (positions drifting across the slice plane). Each is refused with an
  :class:`InputError` naming the series, unless the config (``input.on_*``) asks for a repair, which
  is logged as a warning: ``drop`` keeps the first acquired frame of a repeated position; ``resample``
  shifts tilted slices onto a grid orthogonal to them and/or interpolates linearly onto regular spacing.
* The voxel size is never guessed silently. A missing PixelSpacing, a legacy multi-frame file whose slice
  step is not given by SpacingBetweenSlices, or a single slice without SpacingBetweenSlices or
  SliceThickness is refused, naming the series and the tag, unless ``input.on_missing_spacing=assume``:
  then ImagerPixelSpacing (else 1 x 1 mm) in-plane and SliceThickness (else 1 mm) along the normal are
  used, with a warning, and each assumption is recorded in :attr:`DicomVolume.assumptions`.
* Pixels are decoded by SimpleITK/GDCM (every common compressed syntax, RescaleSlope/Intercept
  applied, signed and 12-bit data), or by pydicom for enhanced multi-frame files it can decode
  (per-frame rescale from the functional groups), or by nibabel for Siemens mosaics. A classic series
  whose RescaleSlope/Intercept differ between slices is decoded file by file (GDCM's series reader would
  cast every slice to the first one's pixel type) and kept in float32.

Returns ``[i, j, k]`` arrays (i along a row, j down the columns, k along the normal) and RAS affines
before :func:`~pipeline.io.geometry.closest_canonical` is applied by the reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError, last_line
from pipeline.io.dicom_scan import Frame
from pipeline.io.dicom_series import DicomVolume
from pipeline.io.geometry import LPS_TO_RAS
from pipeline.io.sitk_view import array_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackPolicy:
    """What to do with inconsistent geometry (mirrors ``InputConfig``)."""

    on_duplicate_slices: str = "error"  # error | drop
    on_missing_slices: str = "error"  # error | resample
    on_gantry_tilt: str = "error"  # error | resample
    slice_tolerance: float = 0.05  # mm
    on_missing_spacing: str = "error"  # error | assume

    @classmethod
    def from_config(cls, cfg) -> StackPolicy:
        return cls(cfg.on_duplicate_slices, cfg.on_missing_slices, cfg.on_gantry_tilt, cfg.slice_tolerance,
                   cfg.on_missing_spacing)


@dataclass
class Layout:
    """Where the slices sit: regular (``spacing`` along the normal) or needing repairs."""

    spacing: float  # mm between regular slices along the normal
    lateral: np.ndarray  # (n, 2) in-plane offset of each slice from the first, in (column, row) pixels
    along: np.ndarray  # (n,) position of each slice along the normal, relative to the first, mm
    tilted: bool
    irregular: bool


def check_layout(volume: DicomVolume, policy: StackPolicy) -> Layout:
    """Check (and decide how to repair) the slice geometry; raises for what the policy refuses."""
    volume.assumptions = []
    _check_in_plane_spacing(volume, policy)
    _check_slice_step(volume, policy)
    if volume.duplicates:
        worst = max(volume.duplicates, key=len)
        message = (f"{volume.describe()}: {len(volume.duplicates)} slice position(s) occur more than once "
                   f"(e.g. {len(worst)} frames at {_fmt(worst[0].position)} mm, files "
                   f"{', '.join(_name(f) for f in worst[:3])}) while other positions occur once")
        if policy.on_duplicate_slices != "drop":
            raise InputError(f"{message}. Remove the duplicate files, or set input.on_duplicate_slices=drop "
                             "to keep the first acquired frame at each position")
        log.warning("%s; keeping the first acquired frame at each (input.on_duplicate_slices=drop)", message)
    frames = volume.frames
    first = frames[0]
    normal = first.normal
    row_dir, col_dir = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    offsets = np.array([f.position for f in frames]) - np.asarray(first.position)
    along = offsets @ normal
    lateral_mm = offsets - along[:, None] * normal[None, :]
    lateral = np.stack([lateral_mm @ row_dir / first.pixel_spacing[1], lateral_mm @ col_dir / first.pixel_spacing[0]], 1)
    n = len(frames)
    if n == 1:
        return Layout(_single_slice_spacing(volume, policy), lateral, along, False, False)
    steps = np.diff(along)
    spacing = float(np.median(steps))
    tol = max(policy.slice_tolerance, 0.02 * spacing)
    tilted = bool(np.abs(lateral_mm).max() > tol)
    expected = along[0] + np.arange(n) * (along[-1] - along[0]) / (n - 1)
    irregular = bool(np.abs(along - expected).max() > tol)
    if tilted:
        drift = float(np.linalg.norm(lateral_mm[-1]))
        angle = float(np.degrees(np.arctan2(drift, along[-1]))) if along[-1] else 0.0
        message = (f"{volume.describe()}: slice positions drift {drift:.2f} mm across the slice plane over "
                   f"{n} slices (gantry tilt of about {angle:.1f} degrees; GantryDetectorTilt "
                   f"{first.gantry_tilt:g})")
        if policy.on_gantry_tilt != "resample":
            raise InputError(f"{message}. Stacking it as is would shear the volume; set "
                             "input.on_gantry_tilt=resample to shift each slice onto an orthogonal grid")
        log.warning("%s; resampling onto a grid orthogonal to the slices (input.on_gantry_tilt=resample)", message)
    if irregular:
        gaps = np.flatnonzero(np.abs(steps - spacing) > tol)
        message = (f"{volume.describe()}: slice spacing is not uniform (median {spacing:.3f} mm; steps of "
                   f"{', '.join(f'{steps[g]:.3f}' for g in gaps[:4])} mm after slices "
                   f"{', '.join(str(int(g)) for g in gaps[:4])}): missing or uneven slices")
        if policy.on_missing_slices != "resample":
            raise InputError(f"{message}. Re-export the complete series, or set input.on_missing_slices=resample "
                             "to interpolate onto a regular grid")
        log.warning("%s; interpolating linearly onto a regular grid (input.on_missing_slices=resample)", message)
    else:
        spacing = float((along[-1] - along[0]) / (n - 1))
    return Layout(spacing, lateral, along, tilted, irregular)


def stack(volume: DicomVolume, policy: StackPolicy | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode and stack ``volume``: ``[i, j, k]`` array and RAS affine (slices along the normal).

    ``policy`` defaults to the one discovery attached to the volume (from ``input.*``), else refusal.
    """
    if volume.kind == "mosaic":
        return _read_mosaic(volume.frames[0])
    layout = check_layout(volume, policy or volume.policy or StackPolicy())
    pixels = decode_frames(volume)  # (n, rows, columns)
    first = volume.frames[0]
    if layout.tilted:
        pixels = _shift_slices(pixels, layout.lateral)
    if layout.irregular:
        pixels = _regular_along(pixels, layout.along, layout.spacing)
    array = pixels.transpose(2, 1, 0)  # a view: (k, row, column) in C order is [i, j, k] in Fortran order
    return array, _affine(first, layout.spacing)


def _affine(first: Frame, spacing: float) -> np.ndarray:
    row_dir, col_dir = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    affine = np.eye(4)
    affine[:3, 0] = row_dir * first.pixel_spacing[1]  # i: along a row (column index), column spacing
    affine[:3, 1] = col_dir * first.pixel_spacing[0]  # j: down a column (row index), row spacing
    affine[:3, 2] = first.normal * spacing
    affine[:3, 3] = first.position
    return LPS_TO_RAS @ affine


def _single_slice_spacing(volume: DicomVolume, policy: StackPolicy) -> float:
    """The extent of a lone slice along its normal: SpacingBetweenSlices, else SliceThickness; without
    either, 1 mm under ``input.on_missing_spacing=assume``."""
    frame = volume.frames[0]
    if frame.thickness_tag:
        return frame.thickness
    _assume_or_refuse(volume, policy, "a single slice without SpacingBetweenSlices (0018,0088) or SliceThickness "
                                      "(0018,0050)", "slice thickness 1 mm (no SpacingBetweenSlices/SliceThickness)")
    return 1.0


# --- spacing that the headers do not give -----------------------------------------------------------


def _check_in_plane_spacing(volume: DicomVolume, policy: StackPolicy) -> None:
    first = volume.frames[0]
    if first.spacing_tag == "PixelSpacing":
        return
    rows, columns = first.pixel_spacing
    if first.spacing_tag == "ImagerPixelSpacing":
        found = (f"no PixelSpacing (0028,0030); only ImagerPixelSpacing (0018,1164), {rows:g} x {columns:g} mm "
                 "at the detector, not in the patient")
        assumption = f"in-plane spacing {rows:g} x {columns:g} mm from ImagerPixelSpacing (no PixelSpacing)"
    else:
        found = "no PixelSpacing (0028,0030) nor ImagerPixelSpacing (0018,1164)"
        assumption = "in-plane spacing 1 x 1 mm (no PixelSpacing)"
    _assume_or_refuse(volume, policy, found, assumption)


def _check_slice_step(volume: DicomVolume, policy: StackPolicy) -> None:
    """Legacy multi-frame files: frame positions were derived from a step that only SpacingBetweenSlices
    gives for certain."""
    first = volume.frames[0]
    if not first.derived_position or first.thickness_tag == "SpacingBetweenSlices":
        return
    if first.thickness_tag == "SliceThickness":
        found = (f"a multi-frame file without per-frame positions or SpacingBetweenSlices (0018,0088); "
                 f"only SliceThickness (0018,0050), {first.thickness:g} mm, which need not be the slice step")
        assumption = f"slice step {first.thickness:g} mm from SliceThickness (no SpacingBetweenSlices)"
    else:
        found = ("a multi-frame file without per-frame positions, SpacingBetweenSlices (0018,0088) or "
                 "SliceThickness (0018,0050)")
        assumption = "slice step 1 mm (no SpacingBetweenSlices/SliceThickness)"
    _assume_or_refuse(volume, policy, found, assumption)


def _assume_or_refuse(volume: DicomVolume, policy: StackPolicy, found: str, assumption: str) -> None:
    """Raise, naming the series, what is missing and the key that allows the assumption; or warn and record."""
    message = f"{volume.describe()}: {found}"
    if policy.on_missing_spacing != "assume":
        raise InputError(f"{message}, so its voxel size is unknown. Fix the headers, or set "
                         f"input.on_missing_spacing=assume to read it with {assumption}")
    log.warning("%s; assuming %s (input.on_missing_spacing=assume)", message, assumption)
    volume.assumptions.append(assumption)


# --- decoding -------------------------------------------------------------------------------------


def decode_frames(volume: DicomVolume) -> np.ndarray:
    """Pixel data of the volume's frames, in stacking order, rescaled: (n, rows, columns)."""
    if volume.kind == "multiframe" or any(f.frame is not None for f in volume.frames):
        return _decode_multiframe(volume)
    if len({f.rescale for f in volume.frames}) > 1:
        return _decode_each_file(volume)
    return _decode_classic([f.path for f in volume.frames], volume)


def _sitk():
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _decode_classic(paths: list[str], volume: DicomVolume) -> np.ndarray:
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(paths)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        culprit = _first_undecodable(paths)
        where = f" (first bad file: {Path(culprit).name})" if culprit else ""
        raise InputError(
            f"cannot decode {volume.describe()}{where}: {last_line(exc)}. A file may be truncated or use an "
            "unsupported transfer syntax; remove it or re-export the series"
        ) from None
    array = array_view(image)  # no copy: the view keeps the image alive
    if array.ndim == 2:
        array = array[None]
    if array.shape[0] != len(paths):
        raise InputError(f"cannot decode {volume.describe()}: expected {len(paths)} slices, decoded {array.shape[0]}")
    return array


def _decode_each_file(volume: DicomVolume) -> np.ndarray:
    """Slices whose RescaleSlope/Intercept differ: GDCM's series reader decodes every slice into the first
    one's pixel type (an integer slope-1 first slice truncates or wraps the others), so each file is
    decoded on its own, with its own rescale, into float32."""
    sitk = _sitk()
    slopes = sorted({f.rescale for f in volume.frames})
    log.info("%s: %d different RescaleSlope/Intercept pairs (e.g. %s); decoding slice by slice in float32",
             volume.describe(), len(slopes), ", ".join(f"{a:g}/{b:g}" for a, b in slopes[:3]))
    out = None
    for index, frame in enumerate(volume.frames):
        try:
            plane = sitk.GetArrayFromImage(sitk.ReadImage(frame.path, sitk.sitkFloat32))
        except RuntimeError as exc:
            raise InputError(
                f"cannot decode {volume.describe()} (first bad file: {Path(frame.path).name}): {last_line(exc)}. "
                "A file may be truncated or use an unsupported transfer syntax; remove it or re-export the series"
            ) from None
        plane = plane.reshape(plane.shape[-2:])
        if out is None:
            out = np.empty((len(volume.frames), *plane.shape), dtype=np.float32)
        if plane.shape != out.shape[1:]:
            raise InputError(f"cannot decode {volume.describe()}: {Path(frame.path).name} has {plane.shape} "
                             f"pixels, expected {out.shape[1:]}")
        out[index] = plane
    return out


def _first_undecodable(paths: list[str]) -> str:
    """The first file GDCM cannot decode on its own (only looked for after a series failed)."""
    sitk = _sitk()
    for path in paths:
        try:
            sitk.ReadImage(path)
        except RuntimeError:
            return path
    return ""


def _decode_multiframe(volume: DicomVolume) -> np.ndarray:
    """Frames from (possibly several) multi-frame files, each file decoded once."""
    by_file: dict[str, tuple[np.ndarray, bool]] = {}
    out = None
    for index, frame in enumerate(volume.frames):
        if frame.path not in by_file:
            by_file[frame.path] = _decode_file_frames(frame.path, volume)
        pixels, rescaled = by_file[frame.path]
        rescale = None if rescaled else frame.rescale
        plane = pixels[frame.frame or 0].astype(np.float64 if rescale else pixels.dtype, copy=False)
        if rescale and rescale != (1.0, 0.0):
            plane = plane * rescale[0] + rescale[1]
        if out is None:
            out = np.empty((len(volume.frames), *plane.shape), dtype=plane.dtype)
        out[index] = plane
    return _narrow(out)


def _decode_file_frames(path: str, volume: DicomVolume) -> tuple[np.ndarray, bool]:
    """Every frame of one file and whether it is already rescaled: stored values from pydicom when it
    can decode the syntax, else GDCM's output (which applies the rescale itself)."""
    import pydicom

    try:
        pixels = pydicom.dcmread(path).pixel_array
        return (pixels if pixels.ndim == 3 else pixels[None]), False
    except Exception as exc:  # no pydicom decoder for this syntax
        log.debug("pydicom cannot decode %s (%s); using GDCM", path, exc)
    sitk = _sitk()
    try:
        pixels = sitk.GetArrayFromImage(sitk.ReadImage(path))
        return (pixels if pixels.ndim == 3 else pixels[None]), True
    except RuntimeError as exc:
        raise InputError(f"cannot decode '{path}' of {volume.describe()}: {last_line(exc)}") from None


def _read_mosaic(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """A Siemens mosaic: one file, tiles unpacked into slices (nibabel reads the CSA header)."""
    import pydicom
    from nibabel.nicom import dicomwrappers

    try:
        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(frame.path))
        data = np.asarray(wrapper.get_data())  # [row, column, slice], rescaled
        affine = np.asarray(wrapper.affine, dtype=np.float64)  # LPS, for that index order
    except Exception as exc:
        raise InputError(f"cannot unpack Siemens mosaic '{frame.path}': {exc}") from None
    array = data.transpose(1, 0, 2)  # [column, row, slice] = [i, j, k]
    swap = np.eye(4)[[1, 0, 2, 3]]
    return _narrow(array), LPS_TO_RAS @ affine @ swap


def _narrow(array: np.ndarray) -> np.ndarray:
    """Back to a compact integer type when every value is an integer that fits int16/int32."""
    if array.dtype.kind != "f":
        return array
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        return array.astype(np.float32)
    lo, hi = float(array.min()), float(array.max())
    for dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return array.astype(dtype)
    return array.astype(np.float32)


# --- repairs --------------------------------------------------------------------------------------


def _shift_slices(pixels: np.ndarray, lateral: np.ndarray) -> np.ndarray:
    """Undo each slice's in-plane offset from the first slice (gantry tilt): linear, edges filled with the minimum."""
    from scipy import ndimage

    fill = float(pixels.min())
    out = np.empty(pixels.shape, dtype=np.float32)
    for k in range(pixels.shape[0]):
        column_shift, row_shift = lateral[k]
        out[k] = ndimage.shift(pixels[k].astype(np.float32), (row_shift, column_shift), order=1, mode="constant",
                               cval=fill)
    return out


def _regular_along(pixels: np.ndarray, along: np.ndarray, spacing: float) -> np.ndarray:
    """Linear interpolation along the normal onto positions 0, spacing, 2·spacing, ... up to the last slice."""
    n_regular = int(round((along[-1] - along[0]) / spacing)) + 1
    targets = along[0] + np.arange(n_regular) * spacing
    upper = np.clip(np.searchsorted(along, targets, side="right"), 1, len(along) - 1)
    lower = upper - 1
    weight = ((targets - along[lower]) / np.maximum(along[upper] - along[lower], 1e-9)).clip(0, 1)
    out = np.empty((n_regular, *pixels.shape[1:]), dtype=np.float32)
    for k in range(n_regular):
        out[k] = (1 - weight[k]) * pixels[lower[k]] + weight[k] * pixels[upper[k]]
    return out


def _fmt(position) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in position) + ")"


def _name(frame: Frame) -> str:
    return Path(frame.path).name
