"""Reading one scan into memory, without MONAI: what :class:`~pipeline.io.reader.ScanReader` reads, and
what the isolated reader process (:mod:`pipeline.io.isolated`) runs, so that process starts in well
under a second (no torch, no MONAI).

* NIfTI (``.nii``, ``.nii.gz``): the affine from nibabel, the voxels from SimpleITK (see :func:`_read_nifti`).
* DICOM: a :class:`~pipeline.io.dicom_series.DicomVolume`, or a folder / list of files holding exactly
  one volume, stacked by :mod:`pipeline.io.dicom_stack`.
* Other ITK formats (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``, single DICOM files) through SimpleITK.
* The :class:`~pipeline.io.channels.Channels` of a multi-channel case, stacked on channel 0's grid.

A float scan holding NaN or infinite voxels is refused (:func:`check_finite`): no network output on
such a scan means anything. SimpleITK (niftilib) silently reads NaN/Inf NIfTI voxels as 0, so float
NIfTI files are checked against their own bytes where that could have happened (:func:`_nonfinite_in_file`).
"""

from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path
from typing import Sequence, Union

import nibabel as nib
import numpy as np

from pipeline.errors import InputError
from pipeline.io.channels import Channels, stack_channels
from pipeline.io.dicom_scan import looks_like_dicom, scan_file
from pipeline.io.dicom_series import DicomVolume, group_volumes
from pipeline.io.dicom_stack import stack
from pipeline.io.geometry import affine_from_sitk, closest_canonical
from pipeline.io.sitk_view import array_view

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

MAX_SPACING_MM = 100.0  # above it a spacing is a broken header (and resampling it would not fit in memory)
MAX_AXIS_COSINE = 1e-3  # voxel axes further than ~0.06 degrees from orthogonal: a sheared grid

PathLike = Union[str, Path]
ScanSource = Union[Sequence[PathLike], PathLike, DicomVolume, Channels]


def is_nifti(path: PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


class Loaded:
    """A scan read into memory: array ``[i, j, k]`` (``[i, j, k, c]`` for channels), RAS affine, and
    where it came from (``source_format``: ``nifti`` | ``dicom`` | ``itk``)."""

    def __init__(self, array: np.ndarray, affine: np.ndarray, source: str, source_format: str):
        self.array, self.affine, self.source, self.source_format = array, affine, source, source_format


def source_name(source) -> str:
    """What a scan source is called in metadata and messages: a file, a DICOM volume's folder, a file
    list's folder (its one file), channel 0's name for a multi-channel case."""
    if isinstance(source, Loaded):
        return source.source
    if isinstance(source, Channels):
        return source_name(source.sources[0]) if source.sources else "a multi-channel case"
    if isinstance(source, DicomVolume):
        return source.folder
    if isinstance(source, (list, tuple)):
        return str(source[0]) if len(source) == 1 else str(Path(str(source[0])).parent)
    return str(source)


def read_scan(data: ScanSource, validate: bool = True) -> Loaded:
    """One scan: a NIfTI/ITK file, a DICOM series folder, a list of DICOM files, a ``DicomVolume``, or
    the :class:`Channels` of a multi-channel case. Bad input raises :class:`InputError`.

    ``validate``: refuse NaN/Inf voxels (:func:`check_finite`) and unsound grids (:func:`check_grid`);
    ``False`` gives the voxels as read, for ``medseg check``, which reports those problems itself."""
    loaded = _read(data, validate)
    if validate:
        check_finite(loaded.array, loaded.source)
        check_grid(loaded.array.shape[:3], loaded.affine, loaded.source)
    return loaded


def _read(data: ScanSource, validate: bool = True) -> Loaded:
    if isinstance(data, Channels):
        return _read_channels(data, validate)
    if isinstance(data, DicomVolume):
        return _read_dicom_volume(data)
    paths = [Path(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    for path in paths:
        if not path.exists():
            raise InputError(f"scan not found: '{path}'. Check the path (expected a NIfTI file or a DICOM folder)")
    if len(paths) == 1 and paths[0].is_dir():
        return _read_dicom_volume(_one_volume(sorted(p for p in paths[0].iterdir() if p.is_file()), str(paths[0])))
    if len(paths) > 1:
        return _read_dicom_volume(_one_volume(paths, str(paths[0].parent)))
    path = paths[0]
    if not path.is_file():
        raise InputError(f"scan '{path}' is not a regular file (a pipe, socket or device?): expected a "
                         "NIfTI, NRRD, MHA/MHD or DICOM file")
    if is_nifti(path):
        return _read_nifti(path, validate)
    if looks_like_dicom(path):
        return _read_dicom_volume(_one_volume([path], str(path)))
    return _read_itk_file(path)


def _read_channels(channels: Channels, validate: bool) -> Loaded:
    first = channels.sources[0] if channels.sources else None
    where = first.folder if isinstance(first, DicomVolume) else str(first)
    channels.check_complete(where)
    loaded = [_read(source, validate) for source in channels.sources]
    names = [channels.name(c) for c in range(len(loaded))]
    array = stack_channels([x.array for x in loaded], [x.affine for x in loaded], names, loaded[0].source)
    return Loaded(array, loaded[0].affine, loaded[0].source, loaded[0].source_format)


def check_grid(shape: tuple, affine: np.ndarray, source: str) -> None:
    """Refuse a scan that is not an image on a sound grid: no voxels, fewer than 2 voxels along two
    axes, a non-finite affine, a spacing of 0 or above :data:`MAX_SPACING_MM`, axes that are not
    orthogonal (a sheared or singular direction matrix)."""
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise InputError(f"scan '{source}' has no voxels (shape {shape}): expected a 3D volume; re-export it")
    if sum(s >= 2 for s in shape) < 2:
        raise InputError(f"scan '{source}' has shape {shape}: expected an image (at least 2 voxels along two "
                         "axes); a single voxel or a line is not a scan")
    fix = "Fix the scan's header (spacing, direction, origin) or re-export it"
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(affine)):
        raise InputError(f"scan '{source}' has NaN/Inf in its affine (its geometry): expected finite "
                         f"spacing, direction and origin. {fix}")
    spacing = np.sqrt((linear**2).sum(axis=0))
    if spacing.min() <= 1e-6 or spacing.max() > MAX_SPACING_MM:
        shown = " x ".join(f"{v:g}" for v in spacing)
        raise InputError(f"scan '{source}' has voxel spacing {shown} mm: expected each between 1e-06 and "
                         f"{MAX_SPACING_MM:g} mm. {fix}")
    unit = linear / spacing
    cosines = np.abs(unit.T @ unit - np.eye(3))
    if cosines.max() > MAX_AXIS_COSINE:
        i, j = np.unravel_index(int(np.argmax(cosines)), cosines.shape)
        angle = float(np.degrees(np.arccos(min(1.0, cosines[i, j]))))
        raise InputError(f"scan '{source}' has voxel axes {i} and {j} at {angle:.1f} degrees: expected an "
                         f"orthogonal grid (a sheared or singular direction matrix). {fix}, or resample it "
                         "onto an orthogonal grid")


def check_finite(array: np.ndarray, source: str, count: int = -1) -> None:
    """Refuse a float scan holding NaN/Inf voxels (``count``: already counted, e.g. in the file)."""
    if count < 0:
        if array.dtype.kind not in "fc":
            return
        count = int(array.size - np.count_nonzero(np.isfinite(array)))
    if count:
        raise InputError(
            f"scan '{source}' holds {count} NaN/Inf voxel(s): expected finite intensities. Replace them "
            "(e.g. by the background value) and re-export the scan"
        )


def _read_nifti(path: Path, validate: bool = True) -> Loaded:
    """The affine from nibabel (sform/qform as NIfTI defines them); the voxels from SimpleITK, whose gzip
    reader is ~3x faster than Python's. Any file SimpleITK refuses (e.g. a non-orthonormal sform) or
    reads with another shape is read by nibabel alone."""
    try:
        image = nib.load(str(path))  # the header only: cheap
        affine = np.asarray(image.affine, dtype=np.float64)
        shape = tuple(int(s) for s in image.shape)
    except Exception as exc:  # nibabel raises many types for truncated or corrupt files
        raise InputError(
            f"cannot read NIfTI '{path}': {exc}. The file may be truncated or not a NIfTI; re-export it"
        ) from None
    array = _voxels_by_sitk(path, shape) if _complete(path, image) else None
    if array is not None and validate:
        _check_nifti_finite(path, image, array)
    else:
        try:
            array = np.asarray(image.dataobj)
        except Exception as exc:
            raise InputError(
                f"cannot read NIfTI '{path}': {exc}. The file may be truncated or not a NIfTI; re-export it"
            ) from None
    return Loaded(array, affine, str(path), "nifti")


def _check_nifti_finite(path: Path, image, array: np.ndarray) -> None:
    """SimpleITK reads a float NIfTI's NaN/Inf voxels as 0: where the array read holds zeros, the file's
    own bytes are counted (a memory map of a .nii; a streamed decompression of a .nii.gz)."""
    if image.header.get_data_dtype().kind not in "fc" or np.all(array):
        return  # integers cannot be NaN; no zero voxel: none was NaN in the file
    check_finite(array, str(path), _nonfinite_in_file(path, image))


def _nonfinite_in_file(path: Path, image) -> int:
    """How many voxels of a float NIfTI file are NaN/Inf, from its raw bytes (scaling cannot change it)."""
    dtype = image.header.get_data_dtype()
    offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
    size = int(np.prod(image.shape)) * dtype.itemsize
    if not str(path).lower().endswith(".gz"):
        return _nonfinite(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(size // dtype.itemsize,)))
    with open(path, "rb") as handle:
        return _nonfinite_in_gzip(handle, dtype, offset, size)


def _nonfinite_in_gzip(handle, dtype: np.dtype, offset: int, size: int) -> int:
    """NaN/Inf values among the ``size`` bytes at ``offset`` of a gzip stream, decompressed a chunk at a
    time (memory: one chunk), without copying the chunks."""
    inflate = zlib.decompressobj(wbits=31)
    count, pending, skip, itemsize = 0, b"", offset, dtype.itemsize
    while size > 0:
        chunk = handle.read(1 << 24)
        if not chunk:
            break
        view = memoryview(inflate.decompress(chunk))
        if skip:
            taken = min(skip, len(view))
            view, skip = view[taken:], skip - taken
        if pending:  # a value split between two chunks
            head, view = pending + bytes(view[: itemsize - len(pending)]), view[itemsize - len(pending):]
            if len(head) < itemsize:
                pending = head
                continue
            count += _nonfinite(np.frombuffer(head, dtype))
            pending, size = b"", size - itemsize
        usable = min(len(view) - len(view) % itemsize, size)
        count += _nonfinite(np.frombuffer(view[:usable], dtype))
        pending, size = bytes(view[usable:]) if usable < len(view) else b"", size - usable
    return count


def _nonfinite(values: np.ndarray) -> int:
    finite = np.isfinite(values)
    return 0 if finite.all() else int(values.size - np.count_nonzero(finite))


def _complete(path: Path, image) -> bool:
    """Whether the file holds all of its voxels: SimpleITK reads a truncated .nii.gz without an error.

    A gzip stream ends with the length of its uncompressed data (mod 2**32): a truncated file ends with
    compressed bytes instead. An uncompressed file must be at least header + voxels long. A file that
    fails this (or any odd layout) is read by nibabel, which raises on truncation.
    """
    try:
        header = image.header
        offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
        expected = offset + int(np.prod(image.shape)) * header.get_data_dtype().itemsize
        size = path.stat().st_size
        if str(path).lower().endswith(".gz"):
            if size < 18:
                return False
            with open(path, "rb") as f:
                f.seek(-4, 2)
                return int.from_bytes(f.read(4), "little") == expected % (1 << 32)
        return size >= expected
    except Exception:
        return False


def _voxels_by_sitk(path: Path, shape: tuple[int, ...]):
    """The voxels ``[i, j, k]`` (a Fortran-order view, no copy) if SimpleITK reads them as nibabel would."""
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        return None
    if image.GetNumberOfComponentsPerPixel() != 1:
        return None
    array = array_view(image).T  # SimpleITK's [k, j, i] → [i, j, k], no copy
    return array if array.shape == shape else None


def _sitk():
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _one_volume(paths: list[Path], source: str) -> DicomVolume:
    """The single DICOM volume in ``paths`` (a folder's files or a file list), else a clear error."""
    frames = []
    for path in paths:
        if looks_like_dicom(path):
            frames.extend(scan_file(path).frames)
    volumes = group_volumes(frames)
    if not volumes:
        raise InputError(
            f"no DICOM images found in '{source}' ({len(paths)} files): expected DICOM slice files "
            "(or a NIfTI file). Check the folder holds DICOM images or point at the right subfolder"
        )
    if len(volumes) > 1:
        listed = "; ".join(f"{v.describe()}{v.suffix}" for v in volumes[:4])
        raise InputError(
            f"'{source}' holds {len(volumes)} DICOM volumes ({listed}): expected one. "
            "Pass the folder to `medseg segment` or `medseg convert`, which split series into cases"
        )
    return volumes[0]


def _read_dicom_volume(volume: DicomVolume) -> Loaded:
    array, affine = stack(volume)
    array, affine = closest_canonical(array, affine)
    log.debug("read %s: shape %s", volume.describe(), array.shape)
    return Loaded(array, affine, volume.folder, "dicom")


def _read_itk_file(path: Path) -> Loaded:
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = _itk_reason(exc)
        raise InputError(
            f"cannot read scan '{path}': {reason}. Expected a NIfTI, NRRD, MHA/MHD or DICOM file; "
            "the file may be truncated or of another format"
        ) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"scan '{path}' is {image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} "
            "component(s): expected a single-channel 3D volume"
        )
    if min(image.GetSpacing()) <= 0:
        raise InputError(f"scan '{path}' has voxel spacing {image.GetSpacing()}: expected positive values. "
                         "Fix the header (ElementSpacing / space directions) or re-export the scan")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return Loaded(array, affine_from_sitk(image), str(path), "itk")


def _itk_reason(exc: RuntimeError) -> str:
    """ITK's exceptions span many lines: the line of its ``ERROR:`` (without the object's address), else
    the last line, says what went wrong."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for n, line in enumerate(lines):
        if "ERROR:" in line and not line.startswith("sitk::ERROR"):
            reason = re.sub(r"^.*?ERROR:\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", line)
            if reason.endswith(":") and n + 1 < len(lines):  # the message goes on on the next line
                reason = f"{reason} {lines[n + 1]}"
            return reason.split(" Refusing to change direction")[0] or line
    return lines[-1] if lines else "unknown error"
