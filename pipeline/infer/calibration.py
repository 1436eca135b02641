"""Calibration windows: the real network inputs int8 quantisation is calibrated on and ``auto`` checks
agreement on.

**The rule** (deterministic, :data:`RULE_TRAINING` / :data:`RULE_CASE`):

1. *Training patches*, where the checkpoint's ``data.root`` is a readable dataset (relative paths from the
   working folder): its first :data:`CASES` labelled training cases in dataset order, each preprocessed
   exactly as ``segment`` preprocesses a scan (with its label map), and :data:`WINDOWS_PER_CASE` windows
   of ``inference.roi_size`` per case, seeded (:data:`SEED` + the case's index): half centred on a random
   lesion voxel (the training sampler's lesion-centred rule), half on a random voxel; a case without a
   lesion voxel gets random centres only. 4 x 4 = 16 windows.
2. Else *the first case being segmented* (a log line says so): :data:`CASES` x :data:`WINDOWS_PER_CASE`
   windows of its preprocessed image, seeded, half centred on a random voxel among its brightest 10 %
   (channel 0), half on a random voxel.

:class:`Calibration` keeps a cheap :attr:`~Calibration.digest` (training rule: the file names, sizes and
times of those cases and the preprocessing; case rule: the windows' bytes), which keys the int8 cache,
and reads the windows only when they are needed (:meth:`~Calibration.windows`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

RULE_TRAINING = "training-lesion-centred-v1"
RULE_CASE = "first-case-bright-v1"
CASES = 4
WINDOWS_PER_CASE = 4
SEED = 0

__all__ = ["CASES", "RULE_CASE", "RULE_TRAINING", "SEED", "WINDOWS_PER_CASE", "Calibration",
           "calibration_for", "crop_window"]


class Calibration:
    """Calibration windows of one model: :attr:`rule`, :attr:`digest`, :meth:`windows` (N, C, *roi) float32."""

    def __init__(self, rule: str, digest: str, reader, description: str):
        self.rule, self.digest, self.description = rule, digest, description
        self._reader = reader
        self._windows: Optional[np.ndarray] = None

    def windows(self) -> np.ndarray:
        if self._windows is None:
            self._windows = np.ascontiguousarray(self._reader(), dtype=np.float32)
            log.info("Calibration: %d windows of %s (%s).", len(self._windows), self._windows.shape[1:],
                     self.description)
        return self._windows

    def __repr__(self) -> str:
        return f"Calibration(rule={self.rule!r}, digest={self.digest!r}, {self.description})"


def crop_window(image: np.ndarray, centre, roi) -> np.ndarray:
    """The ``roi``-sized window of ``image`` (C, *spatial) around ``centre``, shifted to lie inside the
    image, and padded with the image's minimum (per channel) where the image is smaller than ``roi``."""
    spatial = image.shape[1:]
    starts = [int(np.clip(c - r // 2, 0, max(0, s - r))) for c, r, s in zip(centre, roi, spatial)]
    box = (slice(None), *(slice(a, a + r) for a, r in zip(starts, roi)))
    window = image[box]
    pad = [(0, 0)] + [(0, r - n) for r, n in zip(roi, window.shape[1:])]
    if any(after for _, after in pad):
        floor = image.reshape(image.shape[0], -1).min(axis=1)
        window = np.stack([np.pad(ch, pad[1:], constant_values=float(f)) for ch, f in zip(window, floor)])
    return window


def _centres(rng: np.random.Generator, shape, preferred: np.ndarray, count: int) -> list[tuple]:
    """``count`` centres: the first half drawn from the voxels of ``preferred`` (flat indices; none:
    random voxels), the rest random voxels of ``shape``."""
    out = []
    for k in range(count):
        if k < count // 2 + count % 2 and preferred.size:
            flat = int(preferred[rng.integers(preferred.size)])
        else:
            flat = int(rng.integers(int(np.prod(shape))))
        out.append(np.unravel_index(flat, shape))
    return out


def _window_box(config) -> list[int]:
    roi = [int(r) for r in config.inference.roi_size]
    return roi + [1] if config.model.spatial_dims == 2 else roi  # 2D: one slice of the volume


def _squeeze_2d(windows: np.ndarray, config) -> np.ndarray:
    return windows[..., 0] if config.model.spatial_dims == 2 else windows


def _training_items(config) -> Optional[list[dict]]:
    """The first :data:`CASES` labelled training cases of ``data.root``, or None if it is not readable."""
    root = Path(config.data.root)
    if not root.is_dir():
        return None
    try:
        from pipeline.training.data import training_cases

        items = [item for item in training_cases(root) if item.get("label")][:CASES]
    except Exception as exc:  # a broken or foreign dataset: calibrate on the scan instead
        log.info("Calibration: the training data %s is not readable (%s: %s).", root, type(exc).__name__, exc)
        return None
    return items or None


def _file_facts(value) -> list:
    """Name, size and mtime of each file of a case's image or label: a path, a list of paths (a DICOM
    series), or a multi-channel case's :class:`~pipeline.io.channels.Channels` (one such per channel)."""
    sources = getattr(value, "sources", None)
    if sources is not None:
        return [_file_facts(source) for source in sources]
    paths = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for p in paths:
        path = Path(p)
        stat = path.stat()
        out.append([path.name, stat.st_size, int(stat.st_mtime)])
    return out


def _training_calibration(config, items: list[dict]) -> Calibration:
    roi = _window_box(config)
    facts = {"rule": RULE_TRAINING, "seed": SEED, "per_case": WINDOWS_PER_CASE, "roi": roi,
             "preprocess": repr(config.preprocess), "channels": list(config.data.channels),
             "cases": [[item.get("case_id", ""), _file_facts(item["image"]), _file_facts(item["label"])]
                       for item in items]}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def read() -> np.ndarray:
        from pipeline.transforms.preprocess import preprocess_transforms

        transform = preprocess_transforms(config.preprocess, label_key="label", num_classes=config.num_classes,
                                          channels=config.data.channels)
        windows = []
        for index, item in enumerate(items):
            data = transform({"image": item["image"], "label": item["label"]})
            image = np.asarray(data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"],
                               dtype=np.float32)
            label = np.asarray(data["label"].as_tensor() if hasattr(data["label"], "as_tensor") else data["label"])
            rng = np.random.default_rng(SEED + index)
            lesion = np.flatnonzero(label[0] > 0)
            for centre in _centres(rng, image.shape[1:], lesion, WINDOWS_PER_CASE):
                windows.append(crop_window(image, centre, roi))
        return _squeeze_2d(np.stack(windows), config)

    return Calibration(RULE_TRAINING, digest, read,
                       f"{len(items)} training case(s) of {config.data.root}, lesion-centred, seed {SEED}")


def _case_calibration(config, image) -> Calibration:
    roi = _window_box(config)
    array = np.asarray(image.as_tensor() if hasattr(image, "as_tensor") else image, dtype=np.float32)
    channel0 = array[0]
    bright = np.flatnonzero(channel0 >= np.quantile(channel0, 0.9))
    rng = np.random.default_rng(SEED)
    windows = np.stack([crop_window(array, c, roi)
                        for c in _centres(rng, channel0.shape, bright, CASES * WINDOWS_PER_CASE)])
    windows = _squeeze_2d(windows, config)
    digest = hashlib.sha256(windows.tobytes() + repr(windows.shape).encode()).hexdigest()[:16]
    return Calibration(RULE_CASE, digest, lambda: windows,
                       f"the first case being segmented, {len(windows)} windows, seed {SEED}")


def calibration_for(config, image=None) -> Optional[Calibration]:
    """The calibration windows of the module docstring's rule for a model's ``config``: the training
    cases of ``data.root`` if readable, else windows of ``image`` (the preprocessed case being segmented,
    (C, *spatial)), else None (neither)."""
    items = _training_items(config)
    if items:
        return _training_calibration(config, items)
    if image is None:
        return None
    log.info("Calibration: the training data %s is not readable; calibrating on the windows of the first "
             "case being segmented.", config.data.root)
    return _case_calibration(config, image)
