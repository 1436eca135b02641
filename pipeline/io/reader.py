"""``ScanReader``: a MONAI ``ImageReader`` for every scan the pipeline accepts.

* NIfTI (``.nii``, ``.nii.gz``) through nibabel: the file's own voxel grid and affine.
* DICOM: a :class:`~pipeline.io.dicom_series.DicomVolume` found by discovery, or a folder / list of
  files holding exactly one volume. Slices are stacked by :mod:`pipeline.io.dicom_stack` (sorted along
  the normal, geometry checked, decoded by GDCM with rescale applied) and put in the geometry dcm2niix
  gives the series (see :mod:`pipeline.io.geometry`).
* Other ITK formats (``.nrrd``, ``.nha``, ``.mha``, ``.mhd``, single DICOM files) through SimpleITK.
* Several channels of one case: a :class:`~pipeline.io.channels.Channels` (one source per channel,
  stacked on channel 0's grid), or a 4D NIfTI with the channels on its 4th axis (MSD). A reader made
  with ``channels=N`` gives (X, Y, Z, N) arrays and refuses scans with another channel count.

Metadata follows MONAI's conventions (``affine`` in RAS, ``spatial_shape``, ``original_channel_dim``)
and adds ``source_format`` (``nifti`` | ``dicom`` | ``itk``) so writers can reproduce the source grid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

import nibabel as nib
import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from pipeline.errors import InputError, last_line
from pipeline.io.channels import Channels, stack_channels
from pipeline.io.dicom_scan import looks_like_dicom, scan_file
from pipeline.io.dicom_series import DicomVolume, group_volumes
from pipeline.io.dicom_stack import stack
from pipeline.io.geometry import affine_from_sitk, closest_canonical
from pipeline.io.sitk_view import array_view

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

PathLike = Union[str, Path]


def is_nifti(path: PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


class _Loaded:
    """A scan read into memory: array ``[i, j, k]``, RAS affine, and where it came from."""

    def __init__(self, array: np.ndarray, affine: np.ndarray, source: str, source_format: str):
        self.array, self.affine, self.source, self.source_format = array, affine, source, source_format


class ScanReader(ImageReader):
    """Reads one scan per call: a NIfTI/ITK file, a DICOM series folder, a list of DICOM files, or the
    :class:`Channels` of a multi-channel case.

    ``channels``: how many channels :meth:`get_data` must give (``channel_names`` for its messages).
    """

    def __init__(self, channels: int = 1, channel_names: Sequence[str] = ()):
        super().__init__()
        self.channels, self.channel_names = int(channels), tuple(channel_names)

    def verify_suffix(self, filename: Union[Sequence[PathLike], PathLike]) -> bool:
        return True  # every input the pipeline accepts goes through this reader

    def read(self, data: Union[Sequence[PathLike], PathLike, DicomVolume, Channels], **kwargs) -> _Loaded:
        if isinstance(data, Channels):
            return self._read_channels(data)
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
        if is_nifti(path):
            return _read_nifti(path)
        if looks_like_dicom(path):
            return _read_dicom_volume(_one_volume([path], str(path)))
        return _read_itk_file(path)

    def _read_channels(self, channels: Channels) -> _Loaded:
        first = channels.sources[0] if channels.sources else None
        where = first.folder if isinstance(first, DicomVolume) else str(first)
        channels.check_complete(where)
        loaded = [self.read(source) for source in channels.sources]
        names = [channels.name(c) for c in range(len(loaded))]
        array = stack_channels([x.array for x in loaded], [x.affine for x in loaded], names, loaded[0].source)
        return _Loaded(array, loaded[0].affine, loaded[0].source, loaded[0].source_format)

    def get_data(self, img: _Loaded) -> tuple[np.ndarray, dict]:
        """The voxels (X, Y, Z), or (X, Y, Z, C) for a reader of ``channels > 1``, and MONAI's metadata."""
        array = img.array
        if array.ndim == 4 and array.shape[3] == 1:
            array = array[..., 0]
        self._check_channels(img, array)
        meta = {
            MetaKeys.AFFINE: img.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: img.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if array.ndim == 4 else float("nan"),
            "source_format": img.source_format,
        }
        if array.ndim == 4:
            meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(array.shape[:3])
        return array, meta

    def _check_channels(self, img: _Loaded, array: np.ndarray) -> None:
        found = 1 if array.ndim == 3 else (array.shape[3] if array.ndim == 4 else None)
        names = f" ({', '.join(self.channel_names)})" if self.channel_names else ""
        if found is None:
            raise InputError(f"scan '{img.source}' has shape {array.shape}: expected a 3D volume, or a 4D NIfTI "
                             "with the channels on its 4th axis")
        if found == self.channels:
            return
        if self.channels == 1:
            raise InputError(
                f"scan '{img.source}' has shape {array.shape} ({found} channels on the 4th axis): expected a "
                "single 3D volume (a one-channel model). Split 4D/multi-channel files into one 3D file per "
                "volume, or use a multi-channel model"
            )
        raise InputError(
            f"scan '{img.source}' has {found} channel(s) (shape {array.shape}): the model takes {self.channels}"
            f"{names}. Give one file per channel (<case>_0000, <case>_0001, ...), a 4D NIfTI with "
            f"{self.channels} volumes, or for DICOM studies input.channels rules that pick each series"
        )


def _read_nifti(path: Path) -> _Loaded:
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
    if array is None:
        try:
            array = np.asarray(image.dataobj)
        except Exception as exc:
            raise InputError(
                f"cannot read NIfTI '{path}': {exc}. The file may be truncated or not a NIfTI; re-export it"
            ) from None
    return _Loaded(array, affine, str(path), "nifti")


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


def _read_dicom_volume(volume: DicomVolume) -> _Loaded:
    array, affine = stack(volume)
    array, affine = closest_canonical(array, affine)
    log.debug("read %s: shape %s", volume.describe(), array.shape)
    return _Loaded(array, affine, volume.folder, "dicom")


def _read_itk_file(path: Path) -> _Loaded:
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = last_line(exc)
        raise InputError(
            f"cannot read scan '{path}': {reason}. Expected a NIfTI, NRRD, MHA/MHD or DICOM file; "
            "the file may be truncated or of another format"
        ) from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"scan '{path}' is {image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} "
            "component(s): expected a single-channel 3D volume"
        )
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return _Loaded(array, affine_from_sitk(image), str(path), "itk")
