"""Lesion statistics: one row per connected lesion (26-connectivity) per case and label.

Positions are world millimetres (RAS, through the mask's affine), volumes millilitres. The maximum
diameter is the largest distance between two voxel *centres* of the lesion: it is found on the
convex hull of the lesion's boundary voxels (interior voxels are never hull vertices), so it stays
fast for large lesions. ``mean_intensity`` is the mean of the source scan's values as read (Hounsfield
units for CT, since the readers apply the rescale slope/intercept; scanner units for MR);
``max_probability`` the highest lesion probability the network gave inside the lesion.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
from scipy import ndimage

from pipeline.batch.report.manifest import csv_cell
from pipeline.io.atomic import atomic_path
from pipeline.io.geometry import voxel_volume_mm3
from pipeline.postprocess.components import class_mask, foreground_box, label_components

_PAIRWISE_LIMIT = 4000  # boundary points up to which a degenerate lesion is measured pairwise


@dataclass
class Lesion:
    case_id: str
    label: int
    lesion_id: int  # 1, 2, ... per case and label, largest first
    voxels: int
    volume_ml: float
    centroid_x_mm: float
    centroid_y_mm: float
    centroid_z_mm: float
    max_diameter_mm: float
    mean_intensity: Optional[float] = None
    max_probability: Optional[float] = None

    @property
    def centroid_mm(self) -> np.ndarray:
        return np.array([self.centroid_x_mm, self.centroid_y_mm, self.centroid_z_mm])


LESION_COLUMNS = [f.name for f in fields(Lesion)]


def lesion_stats(
    labels: np.ndarray,
    affine: np.ndarray,
    *,
    image: Optional[np.ndarray] = None,
    probability: Optional[np.ndarray] = None,
    case_id: str = "",
) -> list[Lesion]:
    """Every 26-connected lesion of every label > 0 in ``labels`` (same grid as ``image``/``probability``)."""
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=np.float64)
    ml_per_voxel = voxel_volume_mm3(affine) / 1000.0
    lesions: list[Lesion] = []
    # inside the labels' bounding box (a lesion mask is a tiny part of a scan: no full-volume temporaries);
    # the components come in the same scan order, so the figures are those of the whole volume
    around = foreground_box(labels)
    if around is None:
        return lesions
    within = labels[around]
    values = [int(v) for v in np.unique(within) if v > 0]
    for value in values:
        components, count = label_components(class_mask(within, value, values))
        if count == 0:
            continue
        found = []
        for index, local in enumerate(ndimage.find_objects(components), start=1):
            inside = components[local] == index
            box = tuple(slice(a.start + s.start, a.start + s.stop) for a, s in zip(around, local))
            offset = np.array([s.start for s in box])
            found.append(_measure(inside, box, offset, affine, image, probability))
        found.sort(key=lambda m: -m["voxels"])  # stable: ties keep scan order
        for lesion_id, m in enumerate(found, start=1):
            centroid = affine[:3, :3] @ m["centroid_ijk"] + affine[:3, 3]
            lesions.append(Lesion(
                case_id=case_id, label=value, lesion_id=lesion_id, voxels=m["voxels"],
                volume_ml=m["voxels"] * ml_per_voxel,
                centroid_x_mm=float(centroid[0]), centroid_y_mm=float(centroid[1]),
                centroid_z_mm=float(centroid[2]), max_diameter_mm=m["diameter"],
                mean_intensity=m["mean"], max_probability=m["pmax"],
            ))
    return lesions


def _measure(inside: np.ndarray, box, offset, affine, image, probability) -> dict:
    ijk = np.argwhere(inside)
    boundary = inside & ~ndimage.binary_erosion(inside, border_value=0)
    points = (np.argwhere(boundary) + offset) @ affine[:3, :3].T
    return {
        "voxels": int(len(ijk)),
        "centroid_ijk": ijk.mean(axis=0) + offset,
        "diameter": max_distance(points),
        "mean": float(np.asarray(image[box], dtype=np.float64)[inside].mean()) if image is not None else None,
        "pmax": float(np.asarray(probability[box])[inside].max()) if probability is not None else None,
    }


def max_distance(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` (N, 3), through their convex hull when possible."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    points = np.asarray(points, dtype=np.float64)
    if len(points) < 2:
        return 0.0
    if len(points) > 4:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # flat or thin lesions: no 3D hull
            if len(points) > _PAIRWISE_LIMIT:
                points = points[ConvexHull(points, qhull_options="QJ").vertices]
    return float(pdist(points).max())


def lesion_totals(lesions: Iterable[Lesion]) -> tuple[int, float]:
    """(count, total volume in mL)."""
    lesions = list(lesions)
    return len(lesions), float(sum(lesion.volume_ml for lesion in lesions))


def lesion_from_dict(data: dict) -> Lesion:
    return Lesion(**{name: data.get(name) for name in LESION_COLUMNS})


def write_lesions_csv(lesions: Iterable[Lesion], path: Union[str, Path]) -> Path:
    """``lesions.csv`` (atomically): one row per lesion, in :data:`LESION_COLUMNS` order."""
    path = Path(path)
    with atomic_path(path, suffix=".tmp.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(LESION_COLUMNS)
            for lesion in lesions:
                writer.writerow([csv_cell(getattr(lesion, name)) for name in LESION_COLUMNS])
    return path
