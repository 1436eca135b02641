"""``dataset_fingerprint``: the facts about a training dataset that the planning rules need.

Each training case is read once (one case in memory at a time):

* its shape and voxel spacing in mm, on the axes of ``orientation`` (``preprocess.orientation``, RAS by
  default: the order in which training sees the volume, so ``spacing[2]`` is the slice axis of an axial scan);
* per channel, intensity statistics of the foreground (label > 0): ``min`` and ``max`` over every
  foreground voxel, and ``mean``, ``std``, ``median``, ``percentile_00_5`` and ``percentile_99_5`` of a
  seeded sample of at most ``samples_per_case`` voxels per case (nnU-Net's 10,000), with ``clipped_mean``
  and ``clipped_std``: the mean and standard deviation of the sampled values inside the 0.5-99.5
  percentiles, the statistics the ``ct`` scheme normalises with (nnU-Net's definition);
* per class, its share of all voxels (``class_fractions``);
* per lesion class (every class but background): the connected components (26-connectivity, cc3d when
  installed, else ``scipy.ndimage``), their count, volumes (mm³) and equivalent diameters (the diameter of
  the ball of the same volume, mm), and the fraction of cases holding one.

The result is plain JSON (lists, dicts, numbers, strings).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional, Union

import numpy as np

from pipeline.io.geometry import voxel_spacing, voxel_volume_mm3

log = logging.getLogger(__name__)

SAMPLES_PER_CASE = 10_000  # foreground voxels drawn per case and channel (nnU-Net's number)
PERCENTILES = (0.5, 99.5)


def dataset_fingerprint(root: Union[str, Path], orientation: str = "RAS", samples_per_case: int = SAMPLES_PER_CASE,
                        seed: int = 0, progress: bool = False, case_ids: Optional[Collection[str]] = None) -> dict:
    """The fingerprint of the training cases of the dataset in ``root`` (see the module docstring); with
    ``case_ids``, of those cases only (``data.max_cases``: the cases training will see)."""
    from pipeline.dataset.layout import read_dataset
    from pipeline.io.reader import ScanReader
    from pipeline.training.dataset_config import dataset_items

    dataset = read_dataset(root)
    names = list(dataset.channel_names) or ["0"]
    labels = dict(dataset.labels) or {"background": 0, "lesion": 1}
    reader, label_reader = ScanReader(channels=len(names), channel_names=names), ScanReader()
    stats = _Collector(names, labels, np.random.default_rng(seed), samples_per_case)
    items = [item for item in dataset_items(dataset) if item["label"]]
    dataset_cases = len(items)
    if case_ids is not None:
        wanted = set(case_ids)
        items = [item for item in items if item["case_id"] in wanted]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="fingerprint", unit="case")
    for item in items:
        image, meta = reader.get_data(reader.read(item["image"]))
        label, _ = label_reader.get_data(label_reader.read(item["label"]))
        image = image[..., None] if image.ndim == 3 else image
        stats.add(item["case_id"], image, np.asarray(label), np.asarray(meta["affine"], dtype=np.float64),
                  orientation)
    return {**stats.result(dataset, orientation), "dataset_cases": dataset_cases}


@dataclass
class ReadProbe:
    seconds: float  # median seconds to read one case (its channels and its label)
    voxels: float  # median voxels of one case's grid
    cases: int  # cases read


def probe_reads(items: list[dict], channels: int, count: int = 3) -> ReadProbe:
    """Read the first ``count`` labelled ``items`` as the fingerprint does, timing each: what one pass over the
    dataset costs per case, measured here, before deciding how many cases training can afford."""
    from pipeline.io.reader import ScanReader

    reader, label_reader = ScanReader(channels=channels), ScanReader()
    seconds, voxels = [], []
    for item in [item for item in items if item["label"]][:count]:
        began = time.perf_counter()
        image, _ = reader.get_data(reader.read(item["image"]))
        label_reader.get_data(label_reader.read(item["label"]))
        seconds.append(time.perf_counter() - began)
        voxels.append(float(np.prod(image.shape[:3])))
    if not seconds:
        return ReadProbe(0.0, 0.0, 0)
    return ReadProbe(float(np.median(seconds)), float(np.median(voxels)), len(seconds))


def axis_order(affine: np.ndarray, orientation: str) -> list[int]:
    """For each axis of ``orientation`` (e.g. RAS), the array axis that becomes it after reorientation."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(orientation.upper())))
    order = [0, 0, 0]
    for array_axis, (target_axis, _) in enumerate(transform):
        order[int(target_axis)] = array_axis
    return order


def components(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected components of ``mask``."""
    try:
        import cc3d

        labelled = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    except ImportError:
        from scipy import ndimage

        labelled, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    return np.bincount(labelled.ravel())[1:]


def equivalent_diameter_mm(volume_mm3: float) -> float:
    """Diameter of the ball of volume ``volume_mm3``."""
    return float((6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0))


class _Collector:
    """Accumulates the per-case facts; :meth:`result` turns them into the fingerprint."""

    def __init__(self, channels: list[str], labels: dict[str, int], rng: np.random.Generator, samples: int):
        self.channels, self.labels, self.rng, self.samples = channels, labels, rng, samples
        self.lesion_classes = {name: value for name, value in labels.items() if value != 0}
        self.cases: list[dict] = []
        self.voxels = np.zeros(max(labels.values()) + 1, np.int64)
        self.foreground: list[list[np.ndarray]] = [[] for _ in channels]
        self.low = [math.inf for _ in channels]
        self.high = [-math.inf for _ in channels]
        self.volumes: dict[str, list[float]] = {name: [] for name in self.lesion_classes}

    def add(self, case_id: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, orientation: str) -> None:
        order = axis_order(affine, orientation)
        spacing = voxel_spacing(affine)
        label = np.rint(label).astype(np.int64) if label.dtype.kind == "f" else label.astype(np.int64)
        counts = np.bincount(label.ravel(), minlength=len(self.voxels))[: len(self.voxels)]
        self.voxels += counts
        foreground = label > 0
        for c in range(len(self.channels)):
            values = image[..., c][foreground]
            if values.size:
                self.low[c] = min(self.low[c], float(values.min()))
                self.high[c] = max(self.high[c], float(values.max()))
                if values.size > self.samples:
                    values = values[self.rng.choice(values.size, self.samples, replace=False)]
                self.foreground[c].append(values.astype(np.float64))
        lesions = {}
        voxel_mm3 = voxel_volume_mm3(affine)
        for name, value in self.lesion_classes.items():
            sizes = components(label == value) if counts[value] else np.zeros(0, np.int64)
            self.volumes[name].extend(float(s) * voxel_mm3 for s in sizes)
            lesions[name] = int(sizes.size)
        self.cases.append({
            "case_id": case_id,
            "shape": [int(label.shape[a]) for a in order],
            "spacing": [round(float(spacing[a]), 6) for a in order],
            "lesions": lesions,
        })

    def result(self, dataset, orientation: str) -> dict:
        total = int(self.voxels.sum())
        any_lesion = [any(case["lesions"].values()) for case in self.cases]
        return {
            "dataset": str(Path(dataset.root).resolve()),
            "name": Path(dataset.root).resolve().name,
            "layout": dataset.layout,
            "orientation": orientation.upper(),
            "channels": list(self.channels),
            "labels": dict(self.labels),
            "num_cases": len(self.cases),
            "cases": self.cases,
            "intensity": {name: self._intensity(c) for c, name in enumerate(self.channels)},
            "class_fractions": {name: float(self.voxels[value]) / total if total else 0.0
                                for name, value in sorted(self.labels.items(), key=lambda kv: kv[1])},
            "lesions": {name: self._lesions(name) for name in self.lesion_classes},
            "cases_with_lesion_fraction": float(np.mean(any_lesion)) if any_lesion else 0.0,
        }

    def _intensity(self, c: int) -> Optional[dict]:
        if not self.foreground[c]:
            return None
        values = np.concatenate(self.foreground[c])
        low, high = np.percentile(values, PERCENTILES)
        inside = values[(values >= low) & (values <= high)]
        return {
            "mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
            "percentile_00_5": float(low), "percentile_99_5": float(high),
            "min": self.low[c], "max": self.high[c],
            "clipped_mean": float(inside.mean()), "clipped_std": float(inside.std()),
            "samples": int(values.size),
        }

    def _lesions(self, name: str) -> dict:
        volumes = self.volumes[name]
        cases = [case["lesions"][name] for case in self.cases]
        diameters = [equivalent_diameter_mm(v) for v in volumes]
        return {
            "count": len(volumes),
            "per_case": cases,
            "cases_with_lesion_fraction": float(np.mean([n > 0 for n in cases])) if cases else 0.0,
            "volumes_mm3": [round(v, 4) for v in volumes],
            "diameters_mm": [round(d, 4) for d in diameters],
            "volume_mm3": _summary(volumes),
            "diameter_mm": _summary(diameters),
        }


def _summary(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}
