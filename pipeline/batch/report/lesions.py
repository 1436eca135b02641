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
from pipeline.postprocess.components import foreground_box, present_values
from pipeline.postprocess.slab_components import SlabComponents

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
    """Every 26-connected lesion of every label > 0 in ``labels`` (same grid as ``image``/``probability``).

    Inside the labels' bounding box (a lesion mask is a tiny part of a scan), slab by slab
    (:class:`~pipeline.postprocess.slab_components.SlabComponents`: no full-size label map, no coordinate
    list of the lesion voxels): the figures are those of each lesion measured on its own box, exactly
    (sums of integers are exact in float64; the boundary points and, for a float scan, the intensities
    come in the same C order).
    """
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=np.float64)
    ml_per_voxel = voxel_volume_mm3(affine) / 1000.0
    lesions: list[Lesion] = []
    around = foreground_box(labels)
    if around is None:
        return lesions
    within = labels[around]
    image = None if image is None else np.asarray(image)[around]
    probability = None if probability is None else np.asarray(probability)[around]
    origin = np.array([s.start for s in around], dtype=np.int64)
    for value in present_values(within):
        components = SlabComponents(within, value)
        if components.count == 0:
            continue
        found = _measure_components(components, origin, affine, image, probability)
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


def _measure_components(components: SlabComponents, origin: np.ndarray, affine: np.ndarray,
                        image: Optional[np.ndarray], probability: Optional[np.ndarray]) -> list[dict]:
    """Per component, in scan order (its number): voxels, centroid (voxel units, of the whole grid),
    maximum diameter (mm, over its boundary voxels: those with a 6-neighbour outside it), mean intensity
    and maximum probability; one slab at a time, each component measured once its last slab is read."""
    count = components.count
    bins = count + 1
    coord_sums = np.zeros((bins, 3), dtype=np.float64)  # exact: integer sums below 2**53
    # integer scans of 16 bits or fewer: exact sums; others: the values, in C order, as the box would give
    exact = image is None or (image.dtype.kind in "biu" and image.dtype.itemsize <= 2)
    intensity_sums = np.zeros(bins, dtype=np.float64)
    values: dict[int, list[np.ndarray]] = {}
    peak = np.full(bins, -np.inf, dtype=np.float64)
    points: dict[int, list[np.ndarray]] = {}
    last_plane = np.array([0] + [box[0].stop for box in components.boxes])
    order = np.argsort(last_plane[1:], kind="stable") + 1  # components by the slab that completes them
    done = 0
    results: dict[int, dict] = {}
    planes = components.array.shape[0]
    # boundary points are kept until their component's last slab: in the smallest type holding the grid's
    # indices (uint16 for any scan of up to 65535 voxels a side), int64 again for the measurement
    small = np.min_scalar_type(int(origin.max()) + max(components.array.shape))
    for k0, k1, slab in components.slabs():
        inside = slab > 0
        ids = slab[inside]
        ijk = np.nonzero(inside)
        for axis in range(3):
            coord_sums[:, axis] += np.bincount(ids, weights=ijk[axis] + (k0 if axis == 0 else 0), minlength=bins)
        del ijk
        if image is not None:
            picked = image[k0:k1][inside]
            if exact:
                intensity_sums += np.bincount(ids, weights=picked, minlength=bins)
            else:
                _append_grouped(values, ids, picked)
            del picked
        if probability is not None:
            np.maximum.at(peak, ids, np.asarray(probability[k0:k1][inside], dtype=np.float64))
        del inside, ids
        # boundary voxels: the erosion of the class mask (one plane more on each side of the slab)
        h0, h1 = max(0, k0 - 1), min(planes, k1 + 1)
        mask = components.mask(h0, h1)
        edge = (mask & ~ndimage.binary_erosion(mask, border_value=0))[k0 - h0:k0 - h0 + (k1 - k0)]
        del mask
        at = np.nonzero(edge)
        grid = np.stack([at[0] + (k0 + origin[0]), at[1] + origin[1], at[2] + origin[2]], axis=1).astype(small)
        _append_grouped(points, slab[edge], grid)
        del edge, at, grid, slab
        while done < count and last_plane[order[done]] <= k1:
            index = int(order[done])
            done += 1
            results[index] = _finish_component(index, components, origin, coord_sums[index], affine,
                                               points.pop(index, []), image is not None, exact,
                                               intensity_sums[index], values.pop(index, []),
                                               peak[index] if probability is not None else None)
    return [results[index] for index in range(1, count + 1)]


def _append_grouped(store: dict, ids: np.ndarray, rows: np.ndarray) -> None:
    """Append ``rows`` to ``store[id]`` for each id in ``ids``, keeping their order within each id."""
    if ids.size == 0:
        return
    order = np.argsort(ids, kind="stable")
    ids, rows = ids[order], rows[order]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    for start, stop in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [ids.size]])):
        store.setdefault(int(ids[start]), []).append(rows[start:stop])


def _finish_component(index: int, components: SlabComponents, origin: np.ndarray, coord_sum: np.ndarray,
                      affine: np.ndarray, points: list, has_image: bool, exact: bool, intensity_sum: float,
                      values: list, peak: Optional[float]) -> dict:
    """One component's figures, as measured on its own box (``ijk`` of its voxels relative to the box,
    their mean plus the box's start; the boundary points in the grid's voxel units, through ``affine``)."""
    voxels = int(components.sizes[index - 1])
    start = np.array([s.start for s in components.boxes[index - 1]], dtype=np.int64)
    local_sum = coord_sum.astype(np.int64) - voxels * start  # the sums of the box-relative coordinates
    if has_image:
        mean = (float(intensity_sum) / voxels if exact
                else float(np.asarray(np.concatenate(values), dtype=np.float64).mean()))
    else:
        mean = None
    boundary = np.concatenate(points).astype(np.int64) @ affine[:3, :3].T
    return {
        "voxels": voxels,
        "centroid_ijk": local_sum.astype(np.float64) / voxels + (start + origin),
        "diameter": max_distance(boundary),
        "mean": mean,
        "pmax": float(peak) if peak is not None else None,
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
