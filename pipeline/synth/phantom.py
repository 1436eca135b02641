"""One synthetic CT case: a body with a liver-like organ holding 0-6 round lesions, in Hounsfield units.

Everything is laid out in world millimetres (computed from the affine), so a lesion is round in mm
whatever the voxel size or orientation. The recipe:

* air (-1000 HU) outside an elliptic body cylinder along the world S axis: a fat rim (~-100 HU) around
  soft tissue (20-45 HU), with a small bony "spine" (~400 HU) at the back;
* an organ: an ellipsoid (base ~60 HU) with a wobbly border and a smooth texture of a few HU;
* lesions: spheres or randomly rotated ellipsoids of 3-30 mm inside the organ (about one in three
  centred near its border, clipped to it), hypo- or hyper-dense by 15-60 HU, with a ~1 mm soft edge;
  the label is the part of each ellipsoid inside the organ;
* Gaussian noise with a per-case standard deviation of 10-25 HU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ConfigError
from pipeline.synth.grid import ORIENTATIONS, grid_centre, make_affine, random_rotation, world_grid

logger = logging.getLogger(__name__)

MAX_LESIONS = 6
LESION_DIAMETER_MM = (3.0, 30.0)
LESION_CONTRAST_HU = (15.0, 60.0)
NOISE_HU = (10.0, 25.0)
MAX_LESION_FRACTION = 0.009  # total lesion volume stays below ~1 % of the scan
EDGE_WIDTH_MM = 0.3  # sigmoid scale: the intensity goes from 10 % to 90 % over ~1.3 mm
BORDER_PROBABILITY = 0.3


@dataclass
class SynthCase:
    """A synthetic scan. Arrays are ``[i, j, k]``; ``affine`` maps voxels to RAS millimetres."""

    image: np.ndarray  # int16, HU
    label: np.ndarray  # uint8, 0 background / 1 lesion
    affine: np.ndarray  # 4x4 float64
    lesions: list[dict] = field(default_factory=list)  # centre_mm, diameters_mm, contrast_hu, ...
    orientation: str = "RAS"
    noise_hu: float = 0.0
    organ: np.ndarray | None = None  # bool mask of the organ that holds the lesions

    @property
    def lesion_fraction(self) -> float:
        """Fraction of the voxels labelled lesion."""
        return float(np.count_nonzero(self.label)) / self.label.size


def make_case(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int, int] = (160, 160, 48),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    orientation: str = "RAS",
    n_lesions: int | None = None,
) -> SynthCase:
    """Draw one case from ``rng``. ``n_lesions=None`` draws 0 (one case in six) or 1-6 lesions."""
    shape, spacing = _check_args(shape, spacing, orientation, n_lesions)
    affine = make_affine(rng, shape, spacing, orientation)
    xyz = world_grid(shape, affine[:3, :3])
    image, organ, organ_rho, organ_size = _anatomy(rng, shape, spacing, xyz)
    if n_lesions is None:
        n_lesions = 0 if rng.random() < 1 / 6 else int(rng.integers(1, MAX_LESIONS + 1))
    label = np.zeros(shape, dtype=np.uint8)
    budget_mm3 = MAX_LESION_FRACTION * np.prod(shape) * np.prod(spacing)
    lesions, placed = [], []
    volume_centre = affine[:3, :3] @ grid_centre(shape) + affine[:3, 3]
    for _ in range(n_lesions):
        lesion, centre = _draw_lesion(rng, xyz, organ, organ_rho, organ_size, placed, budget_mm3)
        budget_mm3 -= np.pi / 6 * np.prod(lesion["diameters_mm"])
        _render_lesion(lesion, centre, image, label, organ, xyz, affine)
        lesion["centre_mm"] = (centre + volume_centre).tolist()
        placed.append((centre, max(lesion["diameters_mm"]) / 2))
        lesions.append(lesion)
    noise_hu = float(rng.uniform(*NOISE_HU))
    image += noise_hu * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    case = SynthCase(image, label, affine, lesions, orientation, noise_hu, organ)
    logger.debug("synthetic case: %s, %d lesions, %.3f %% lesion", orientation, len(lesions),
                 100 * case.lesion_fraction)
    return case


def _check_args(shape, spacing, orientation, n_lesions):
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 4:
        raise ConfigError(f"synthetic shape: expected 3 sizes >= 4, found {shape}. Example: (160, 160, 48).")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ConfigError(f"synthetic spacing: expected 3 positive mm values, found {spacing}.")
    if orientation not in ORIENTATIONS:
        raise ConfigError(f"synthetic orientation: expected one of {ORIENTATIONS}, found {orientation!r}.")
    if n_lesions is not None and not 0 <= n_lesions <= 50:
        raise ConfigError(f"n_lesions: expected None or 0-50, found {n_lesions}.")
    return shape, spacing


def _smooth_field(rng, shape, spacing, scale_mm: float) -> np.ndarray:
    """Low-frequency noise (std ~1): a coarse Gaussian grid every ``scale_mm``, linearly interpolated."""
    out = rng.standard_normal(
        [max(2, int(np.ceil(n * s / scale_mm)) + 1) for n, s in zip(shape, spacing)]
    ).astype(np.float32)
    for axis, n in enumerate(shape):
        weights = _linear_weights(n, out.shape[axis])
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return out / max(float(out.std()), 1e-6)


def _linear_weights(n: int, m: int) -> np.ndarray:
    """(n, m) matrix interpolating m evenly spread samples at n evenly spread points."""
    t = np.linspace(0, m - 1, n)
    lo = np.minimum(np.floor(t).astype(int), m - 2)
    frac = (t - lo).astype(np.float32)
    weights = np.zeros((n, m), dtype=np.float32)
    weights[np.arange(n), lo] = 1 - frac
    weights[np.arange(n), lo + 1] = frac
    return weights


def _anatomy(rng, shape, spacing, xyz):
    """Body, spine and organ in HU (float32); the organ mask, its normalised radius and semi-axes."""
    x, y, z = xyz
    fov = np.asarray(shape) * np.asarray(spacing)
    a, b = fov[0] * rng.uniform(0.40, 0.46), fov[1] * rng.uniform(0.32, 0.40)
    fat = rng.uniform(3, 8)
    a_in, b_in = a - fat, b - fat
    body = (x / a) ** 2 + (y / b) ** 2 < 1
    inner = (x / a_in) ** 2 + (y / b_in) ** 2 < 1
    spine = (x / (0.12 * b_in)) ** 2 + ((y + 0.78 * b_in) / (0.12 * b_in)) ** 2 < 1

    texture = rng.uniform(2, 4) * _smooth_field(rng, shape, spacing, scale_mm=12.0)
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = -100 + rng.uniform(-10, 10)
    image[inner] = rng.uniform(20, 45)
    image[spine] = rng.uniform(350, 450)

    centre = np.array([a_in * rng.uniform(0.12, 0.22), b_in * rng.uniform(0.0, 0.1),
                       fov[2] * rng.uniform(-0.1, 0.1)])
    semi = np.array([0.6 * a_in, 0.55 * b_in, 0.45 * fov[2]]) * rng.uniform(0.9, 1.05, size=3)
    rho = np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                  + ((z - centre[2]) / semi[2]) ** 2)
    rho += 0.06 * _smooth_field(rng, shape, spacing, scale_mm=20.0)
    organ = (rho < 1) & inner & ~spine
    image[organ] = 60 + rng.uniform(-5, 5)
    image += texture * inner
    return image, organ, rho, semi


def _draw_lesion(rng, xyz, organ, organ_rho, organ_size, placed, budget_mm3) -> tuple[dict, np.ndarray]:
    """Size, shape and contrast of one lesion, and its centre in mm relative to the volume centre."""
    largest = min(LESION_DIAMETER_MM[1], 1.7 * float(organ_size.min()),
                  max(LESION_DIAMETER_MM[0], 2 * (3 * max(budget_mm3, 0) / (4 * np.pi)) ** (1 / 3)))
    diameter = min(rng.uniform(*LESION_DIAMETER_MM), largest)
    if rng.random() < 0.5:
        diameters, axes = np.full(3, diameter), np.eye(3)
    else:
        diameters, axes = diameter * np.array([1.0, *rng.uniform(0.6, 1.0, size=2)]), random_rotation(rng)
    contrast = float(rng.choice([-1.0, 1.0]) * rng.uniform(*LESION_CONTRAST_HU))

    radius = float(diameters.max()) / 2
    depth = radius / float(organ_size.min())  # lesion radius in units of the organ's radius
    if rng.random() < BORDER_PROBABILITY:
        candidates = organ & (organ_rho > 1 - 0.6 * depth)
    else:
        candidates = organ & (organ_rho < 1 - 1.1 * depth)
    indices = np.flatnonzero(candidates)
    if indices.size == 0:
        indices = np.flatnonzero(organ)
    if indices.size == 0:
        raise ConfigError("synthetic case: the organ is empty; use a larger shape, e.g. (160, 160, 48).")
    for index in rng.choice(indices, size=min(20, indices.size), replace=False):
        centre = np.array([float(c.flat[index]) for c in xyz])
        if all(np.linalg.norm(centre - other) > radius + other_radius + 1 for other, other_radius in placed):
            break  # else keep the last candidate: overlapping lesions are rare and harmless
    lesion = {"diameters_mm": diameters.tolist(), "axes": axes.tolist(), "contrast_hu": contrast,
              "shape": "sphere" if np.all(diameters == diameters[0]) else "ellipsoid"}
    return lesion, centre


def _render_lesion(lesion, centre, image, label, organ, xyz, affine) -> None:
    """Add the lesion's soft-edged contrast to ``image`` and its interior to ``label``, in its bounding box.

    Sets ``lesion["touches_border"]``: part of the ellipsoid lies outside the organ (or the scan).
    """
    axes = np.asarray(lesion["axes"])
    semi = np.asarray(lesion["diameters_mm"]) / 2
    reach = semi.max() + 6 * EDGE_WIDTH_MM
    corners = centre + reach * np.array(list(np.ndindex(2, 2, 2))) * 2 - reach
    index = np.linalg.solve(affine[:3, :3], corners.T).T + grid_centre(image.shape)
    lo = np.clip(np.floor(index.min(axis=0)).astype(int), 0, image.shape)
    hi = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, image.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))

    offset = [c[box] - np.float32(centre[n]) for n, c in enumerate(xyz)]
    q = [sum(np.float32(axes[n, a]) * offset[n] for n in range(3)) for a in range(3)]
    rho = np.sqrt(sum((q[a] / semi[a]) ** 2 for a in range(3)))
    grad = np.sqrt(sum(q[a] ** 2 / semi[a] ** 4 for a in range(3)))
    # first-order signed distance to the ellipsoid surface (exact for a sphere, exact sign everywhere)
    distance = np.where(grad > 1e-6, (rho - 1) * rho / np.maximum(grad, 1e-6), -semi.min())
    weight = 1 / (1 + np.exp(np.clip(distance / EDGE_WIDTH_MM, -50, 50)))
    inside = rho < 1
    in_organ = organ[box]
    image[box] += np.float32(lesion["contrast_hu"]) * weight * in_organ
    label[box] |= (inside & in_organ).astype(np.uint8)
    outside_scan = np.any(index.min(axis=0) < 0) or np.any(index.max(axis=0) > np.asarray(image.shape) - 1)
    lesion["touches_border"] = bool(outside_scan or np.any(inside & ~in_organ))
