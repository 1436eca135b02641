"""Loading as a MONAI dictionary transform, with errors that name the scan."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, MapTransform

from pipeline.errors import InputError
from pipeline.io.read_scan import source_name
from pipeline.io.reader import ScanReader


class LoadScand(MapTransform):
    """Read scans with :class:`ScanReader` into channel-first MetaTensors, in the file's own dtype.

    MONAI's ``LoadImage`` would make every volume C-contiguous and float32 on the way (a transposing copy
    of a Fortran-order NIfTI or DICOM stack: 2-3x the read time for a 512x512x400 CT). Here the array
    stays as the reader gives it (NIfTI voxels by SimpleITK, DICOM slices by GDCM), with MONAI's metadata
    (``affine``, ``original_affine``, ``spatial_shape``, ``filename_or_obj``...); the float32 conversion is
    the first preprocessing step. The reader's own errors (missing file, truncated scan, several series in
    one folder) reach the user with their message.

    ``channels``: the channels the first key (the image) must have; any other key (a label) is one 3D
    volume. A multi-channel image becomes (C, X, Y, Z) on channel 0's grid.
    """

    def __init__(self, keys, allow_missing_keys: bool = False, channels: int = 1, channel_names=()):
        super().__init__(keys, allow_missing_keys)
        self._scan_reader = ScanReader(channels, channel_names)
        self._volume_reader = ScanReader()

    def __call__(self, data, reader=None):
        d = dict(data)
        for key in self.key_iterator(d):
            key_reader = reader or (self._scan_reader if key == self.keys[0] else self._volume_reader)
            source = d[key]
            array, meta = key_reader.get_data(key_reader.read(source))
            meta["filename_or_obj"] = source_name(source)
            d[key] = EnsureChannelFirst()(MetaTensor(torch.from_numpy(_torch_compatible(array)), meta=meta))
        return d


_TORCH_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64)}


def _torch_compatible(array: np.ndarray) -> np.ndarray:
    """``array`` itself when torch can share it; else the cheapest copy it can (float32 for odd dtypes)."""
    array = np.asarray(array)
    if array.dtype not in _TORCH_DTYPES or not array.dtype.isnative:
        return array.astype(np.float32, order="K")
    if any(stride < 0 for stride in array.strides):  # reoriented views: positive strides, same layout
        return array.copy(order="K")
    return array


class CheckLabelsd(MapTransform):
    """Refuse label maps with values outside ``0..num_classes-1`` (or non-integers), naming the file."""

    def __init__(self, keys, num_classes: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            values = np.unique(np.asarray(d[key]))
            bad = values[(values != np.round(values)) | (values < 0) | (values >= self.num_classes)]
            if bad.size:
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise InputError(
                    f"label '{source}' holds values {bad[:8].tolist()} outside the configured classes "
                    f"0..{self.num_classes - 1}: fix the label file or set data.labels in the config"
                )
        return d
