"""Loading as a MONAI dictionary transform, with errors that name the scan."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImaged, MapTransform

from pipeline.errors import InputError
from pipeline.io.dicom_series import DicomVolume
from pipeline.io.reader import ScanReader


class LoadScand(LoadImaged):
    """``LoadImaged`` that always reads with :class:`ScanReader`, channel-first, float32.

    The reader is passed at call time, so its own errors (missing file, truncated scan, several series
    in one folder) reach the user with their message instead of MONAI's generic "no suitable reader".
    """

    def __init__(self, keys, allow_missing_keys: bool = False):
        super().__init__(keys, reader=None, image_only=True, ensure_channel_first=True,
                         dtype=np.float32, allow_missing_keys=allow_missing_keys)
        self._scan_reader = ScanReader()

    def __call__(self, data, reader=None):
        reader = reader or self._scan_reader
        volumes = {k: v for k, v in data.items() if k in self.keys and isinstance(v, DicomVolume)}
        if not volumes:
            return super().__call__(data, reader)
        # LoadImage turns its input into path strings; a discovered DICOM volume is read directly.
        d = dict(data)
        for key, volume in volumes.items():
            array, meta = reader.get_data(reader.read(volume))
            meta["filename_or_obj"] = volume.folder
            # order="K" keeps the stacked (Fortran) layout: no slow transposing copy; strides become positive.
            image = MetaTensor(torch.as_tensor(np.asarray(array).astype(np.float32, order="K")), meta=meta)
            d[key] = EnsureChannelFirst()(image)
        others = {k: v for k, v in d.items() if k in self.keys and k not in volumes}
        if others:
            loaded = super().__call__({k: d[k] for k in others}, reader)
            d.update({k: loaded[k] for k in others})
        return d


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
