"""Loading as a MONAI dictionary transform, with errors that name the scan."""

from __future__ import annotations

import numpy as np
from monai.transforms import LoadImaged, MapTransform

from pipeline.errors import InputError
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
        return super().__call__(data, reader or self._scan_reader)


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
