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
The reading itself (no MONAI) is :func:`pipeline.io.read_scan.read_scan`; a scan read elsewhere (by
the isolated reader process, :mod:`pipeline.io.isolated`) is passed in as its ``Loaded``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from pipeline.errors import InputError
from pipeline.io.read_scan import ITK_SUFFIXES, NIFTI_SUFFIXES, Loaded, is_nifti, read_scan

__all__ = ["ITK_SUFFIXES", "NIFTI_SUFFIXES", "ScanReader", "is_nifti"]

PathLike = Union[str, Path]
_Loaded = Loaded  # the name this module used before pipeline.io.read_scan


class ScanReader(ImageReader):
    """Reads one scan per call: a NIfTI/ITK file, a DICOM series folder, a list of DICOM files, or the
    :class:`Channels` of a multi-channel case.

    ``channels``: how many channels :meth:`get_data` must give (``channel_names`` for its messages).
    ``validate=False``: NaN/Inf voxels and unsound grids are not refused (see ``read_scan``).
    """

    def __init__(self, channels: int = 1, channel_names: Sequence[str] = (), validate: bool = True):
        super().__init__()
        self.channels, self.channel_names, self.validate = int(channels), tuple(channel_names), validate

    def verify_suffix(self, filename: Union[Sequence[PathLike], PathLike]) -> bool:
        return True  # every input the pipeline accepts goes through this reader

    def read(self, data, **kwargs) -> Loaded:
        """:func:`~pipeline.io.read_scan.read_scan`; a scan already read (a ``Loaded``) is taken as it is."""
        return data if isinstance(data, Loaded) else read_scan(data, self.validate)

    def get_data(self, img: Loaded) -> tuple[np.ndarray, dict]:
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

    def _check_channels(self, img: Loaded, array: np.ndarray) -> None:
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
