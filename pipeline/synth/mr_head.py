"""A synthetic head with brain lesions, as an analytic object in world millimetres, seen on FLAIR and T1c.

:func:`draw_head` draws an :class:`MRHead`; :meth:`MRHead.render` samples it on any voxel grid (shape +
RAS affine), so two grids of one case show the same anatomy at the same world positions. The recipe
(tissue values in scanner units before the per-case gain and bias field; see :data:`FLAIR` and
:data:`T1C`):

* a head ellipsoid (axes along world R, A, S) of nested shells: scalp (FLAIR ~220, T1c ~520: fat is
  bright on T1), skull (~40 on both), a thin CSF layer and two ventricles (FLAIR ~70: suppressed
  fluid, T1c ~130), brain (FLAIR ~420, T1c ~440) with a smooth grey/white texture of opposite sign on
  the two sequences; air outside (0);
* lesions (0-3): an oedema-like ellipsoid 5-25 mm across (one in three 5-10 mm) holding an
  enhancing core 35-65 % of its size (at least 4 mm). On FLAIR oedema and core are the same (~680):
  FLAIR shows the whole lesion but cannot tell core from oedema. On T1c the oedema is invisible
  (brain tissue) and the core enhances (~820), solid or, for cores of 7 mm and more, sometimes a ring
  around a dark necrotic centre (~260). Labels: 1 oedema (oedema minus core), 2 core (necrosis included);
* a smooth multiplicative bias field (+-10-20 %) and a gain per sequence, then Rician noise (the
  magnitude of complex Gaussian noise, std 6-14), so the background is ~0 plus noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from pipeline.synth.grid import grid_centre, random_rotation, world_grid

CHANNELS = ("FLAIR", "T1c")
LABELS = {"background": 0, "oedema": 1, "core": 2}
FLAIR = {"background": 0.0, "scalp": 220.0, "skull": 40.0, "csf": 70.0, "brain": 420.0, "lesion": 680.0}
T1C = {"background": 0.0, "scalp": 520.0, "skull": 40.0, "csf": 130.0, "brain": 440.0,
       "enhancing": 820.0, "necrosis": 260.0}
TEXTURE = (15.0, 30.0)  # amplitude of the grey/white texture on FLAIR (T1c: -0.8 x)
BIAS = (0.10, 0.20)  # amplitude of the log bias field
GAIN = (0.85, 1.2)
NOISE = (6.0, 14.0)
OEDEMA_DIAMETER_MM = (5.0, 25.0)
SMALL_LESION_PROBABILITY = 0.35  # oedema 5-10 mm (log-uniform); else 10-25 mm (uniform)
CORE_FRACTION = (0.35, 0.65)  # core / oedema semi-axes
MIN_CORE_SEMI_MM = 2.0  # a core of 4 mm or more holds voxel centres on a 1x1x3 mm grid
RING_MIN_CORE_MM = 7.0
RING_PROBABILITY = 0.6
EDGE_WIDTH_MM = 0.3  # sigmoid scale of lesion edges (~1.3 mm from 10 % to 90 %)


@dataclass(frozen=True, eq=False)  # numpy fields: compare by identity
class Ellipsoid:
    """An ellipsoid in world mm: centre, principal axes (columns of ``axes``) and semi-axes."""

    centre: np.ndarray
    semi: np.ndarray
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))

    def rho(self, xyz) -> np.ndarray:
        """Normalised radius (< 1 inside) at points ``xyz`` (three arrays of world mm)."""
        return np.sqrt(self._rho2(self._local(xyz)))

    def weight(self, xyz) -> tuple[np.ndarray, np.ndarray]:
        """(inside, soft weight): the hard interior and a ~1 mm soft-edged indicator of it."""
        q = self._local(xyz)
        rho = np.sqrt(self._rho2(q))
        grad = np.sqrt(sum(q[a] ** 2 / np.float32(self.semi[a]) ** 4 for a in range(3)))
        # first-order signed distance to the surface (exact for a sphere, exact sign everywhere)
        distance = np.where(grad > 1e-6, (rho - 1) * rho / np.maximum(grad, 1e-6), -float(self.semi.min()))
        weight = 1 / (1 + np.exp(np.clip(distance / EDGE_WIDTH_MM, -50, 50)))
        return rho < 1, weight.astype(np.float32)

    def _local(self, xyz):
        offset = [c - np.float32(self.centre[n]) for n, c in enumerate(xyz)]
        return [sum(np.float32(self.axes[n, a]) * offset[n] for n in range(3)) for a in range(3)]

    def _rho2(self, q):
        return sum((q[a] / np.float32(self.semi[a])) ** 2 for a in range(3))


@dataclass(frozen=True, eq=False)
class Waves:
    """A smooth random field: a normalised sum of plane cosines (std ~1), defined everywhere in world mm."""

    vectors: np.ndarray  # (n, 3) wave vectors, radians per mm
    phases: np.ndarray  # (n,)

    def __call__(self, xyz) -> np.ndarray:
        out = np.zeros(np.shape(xyz[0]), dtype=np.float32)
        for vector, phase in zip(self.vectors, self.phases):
            out += np.cos(sum(np.float32(vector[a]) * xyz[a] for a in range(3)) + np.float32(phase))
        return out * np.float32(np.sqrt(2 / len(self.phases)))


@dataclass(frozen=True, eq=False)
class Lesion:
    oedema: Ellipsoid
    core: Ellipsoid
    necrosis: Ellipsoid | None  # a ring-enhancing core's dark centre; None: solid enhancement

    def summary(self) -> dict:
        return {
            "centre_mm": [round(float(v), 3) for v in self.oedema.centre],
            "oedema_diameters_mm": [round(float(v), 3) for v in 2 * self.oedema.semi],
            "core_centre_mm": [round(float(v), 3) for v in self.core.centre],
            "core_diameters_mm": [round(float(v), 3) for v in 2 * self.core.semi],
            "enhancement": "solid" if self.necrosis is None else "ring",
        }


@dataclass(frozen=True, eq=False)
class MRHead:
    """One case's anatomy and acquisition: everything but the noise, in world mm."""

    shells: dict[str, Ellipsoid]  # "scalp" (the head), "skull", "csf", "brain": each inside the last
    ventricles: tuple[Ellipsoid, ...]
    texture: Waves
    texture_amplitude: float
    bias: tuple[Waves, Waves]  # per channel
    bias_amplitude: tuple[float, float]
    gain: tuple[float, float]
    noise: tuple[float, float]  # Rician noise std per channel, in the final units
    lesions: tuple[Lesion, ...] = ()

    def render(self, shape, affine, rng: np.random.Generator | None = None):
        """(FLAIR, T1c, label) on the grid ``shape``/``affine``: int16 images (noise from ``rng``; none
        when it is None) and the uint8 label (0 background, 1 oedema, 2 core)."""
        xyz = world_points(shape, affine)
        flair, t1c, parenchyma = self._anatomy(xyz)
        label = self._lesions(xyz, flair, t1c, parenchyma)
        images = []
        for channel, image in enumerate((flair, t1c)):
            image *= np.float32(self.gain[channel]) * np.exp(np.float32(self.bias_amplitude[channel])
                                                             * self.bias[channel](xyz))
            if rng is not None:
                image = rician(image, self.noise[channel], rng)
            images.append(np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16))
        return images[0], images[1], label

    def _anatomy(self, xyz):
        """Tissue values without lesions, and the parenchyma mask (brain outside the ventricles)."""
        flair = np.zeros(np.shape(xyz[0]), dtype=np.float32)
        t1c = np.zeros_like(flair)
        for tissue, shell in self.shells.items():  # outside in; the last is the brain
            inside = shell.rho(xyz) < 1
            flair[inside], t1c[inside] = FLAIR[tissue], T1C[tissue]
        brain = inside
        texture = np.float32(self.texture_amplitude) * self.texture(xyz)
        flair += texture * brain
        t1c -= np.float32(0.8) * texture * brain
        for ventricle in self.ventricles:
            inside = (ventricle.rho(xyz) < 1) & brain
            flair[inside], t1c[inside] = FLAIR["csf"], T1C["csf"]
            brain &= ~inside
        return flair, t1c, brain

    def _lesions(self, xyz, flair, t1c, parenchyma) -> np.ndarray:
        label = np.zeros(flair.shape, dtype=np.uint8)
        lesion_w = np.zeros_like(flair)
        enhancing_w = np.zeros_like(flair)
        necrosis_w = np.zeros_like(flair)
        for lesion in self.lesions:
            oedema_in, oedema_w = lesion.oedema.weight(xyz)
            core_in, core_w = lesion.core.weight(xyz)
            label[oedema_in & parenchyma & (label == 0)] = LABELS["oedema"]
            label[core_in & parenchyma] = LABELS["core"]
            np.maximum(lesion_w, np.maximum(oedema_w, core_w), out=lesion_w)
            np.maximum(enhancing_w, core_w, out=enhancing_w)
            if lesion.necrosis is not None:
                np.maximum(necrosis_w, lesion.necrosis.weight(xyz)[1], out=necrosis_w)
        for weights in (lesion_w, enhancing_w, necrosis_w):
            weights *= parenchyma
        flair += (FLAIR["lesion"] - flair) * lesion_w  # oedema and core alike
        t1c += (T1C["enhancing"] - t1c) * enhancing_w  # the oedema leaves T1c as it is
        t1c += (T1C["necrosis"] - t1c) * necrosis_w
        return label


def world_points(shape, affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World RAS coordinates (mm, float32) of every voxel centre of the grid ``shape``/``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    centre = affine[:3, :3] @ grid_centre(shape) + affine[:3, 3]
    return tuple(c + np.float32(m) for c, m in zip(world_grid(shape, affine[:3, :3]), centre))


def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``image`` plus complex Gaussian noise of std ``sigma`` (a magnitude MR image)."""
    real = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real**2 + imaginary**2)


def draw_head(rng: np.random.Generator, affine: np.ndarray, shape, n_lesions: int) -> MRHead:
    """A head centred near the middle of the grid ``shape``/``affine``, with up to ``n_lesions`` lesions
    inside the brain and the grid (fewer only where the brain has no room left)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    fov = np.asarray(shape) * spacing
    centre = affine[:3, :3] @ grid_centre(shape) + affine[:3, 3] + rng.uniform(-3, 3, size=3)
    head_semi = np.array([0.40 * fov[0], 0.46 * fov[1], max(0.5 * fov[2], 0.36 * fov[0])])
    head_semi *= rng.uniform(0.95, 1.05, size=3)
    shells, semi = {}, head_semi
    # each shell starts inside the last: scalp 3-5 mm, skull 3-6 mm, CSF 1.5-3 mm thick
    for tissue, inset in (("scalp", 0.0), ("skull", rng.uniform(3, 5)), ("csf", rng.uniform(3, 6)),
                          ("brain", rng.uniform(1.5, 3))):
        semi = semi - inset
        shells[tissue] = Ellipsoid(centre, semi)
    brain = shells["brain"].semi
    ventricles = tuple(
        Ellipsoid(centre + brain * [side * 0.13, 0.05, 0.08],
                  brain * [0.07, 0.30, 0.20] * rng.uniform(0.8, 1.2))
        for side in (-1, 1)
    )
    head = MRHead(
        shells=shells,
        ventricles=ventricles,
        texture=_waves(rng, 6, wavelength_mm=(12.0, 30.0)),
        texture_amplitude=float(rng.uniform(*TEXTURE)),
        bias=(_waves(rng, 3, wavelength_mm=(150.0, 300.0)), _waves(rng, 3, wavelength_mm=(150.0, 300.0))),
        bias_amplitude=(float(rng.uniform(*BIAS)), float(rng.uniform(*BIAS))),
        gain=(float(rng.uniform(*GAIN)), float(rng.uniform(*GAIN))),
        noise=(float(rng.uniform(*NOISE)), float(rng.uniform(*NOISE))),
    )
    lesions: list[Lesion] = []
    for _ in range(n_lesions):
        lesion = _draw_lesion(rng, head, affine, shape, lesions)
        if lesion is not None:
            lesions.append(lesion)
    return dataclasses.replace(head, lesions=tuple(lesions))


def _waves(rng, n: int, wavelength_mm: tuple[float, float]) -> Waves:
    directions = rng.standard_normal((n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    vectors = directions * (2 * np.pi / rng.uniform(*wavelength_mm, size=n))[:, None]
    return Waves(vectors, rng.uniform(0, 2 * np.pi, size=n))


def _draw_lesion(rng, head: MRHead, affine, shape, placed: list[Lesion]) -> Lesion | None:
    """An oedema with its core, centred in the brain away from the ventricles, the grid's border and the
    other lesions; smaller on each failed round of attempts, None when even a small one finds no room."""
    low, high = OEDEMA_DIAMETER_MM
    if rng.random() < SMALL_LESION_PROBABILITY:
        diameter = float(np.exp(rng.uniform(np.log(low), np.log(2 * low))))
    else:
        diameter = float(rng.uniform(2 * low, high))
    semi = diameter / 2 * np.array([1.0, *rng.uniform(0.75, 1.0, size=2)])
    axes = random_rotation(rng)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    for _ in range(6):
        centre = _find_room(rng, head, affine, shape, spacing, float(semi.max()), placed)
        if centre is not None:
            return _lesion_at(rng, centre, semi, axes)
        semi = np.maximum(semi * 0.75, OEDEMA_DIAMETER_MM[0] / 2)
    return None


def _find_room(rng, head, affine, shape, spacing, radius, placed) -> np.ndarray | None:
    margin = (radius + 1) / spacing
    low = np.minimum(margin, grid_centre(shape))
    high = np.maximum(np.asarray(shape) - 1 - margin, grid_centre(shape))
    for _ in range(50):
        index = rng.uniform(low, high)
        centre = affine[:3, :3] @ index + affine[:3, 3]
        point = [np.float32(v) for v in centre]
        # the brain shrunk, and each ventricle grown, by the lesion's radius + 1 mm
        brain = head.shells["brain"]
        room = Ellipsoid(brain.centre, brain.semi - (radius + 1)).rho(point) < 1
        clear = all(Ellipsoid(v.centre, v.semi + radius + 1).rho(point) > 1 for v in head.ventricles)
        apart = all(np.linalg.norm(centre - other.oedema.centre) > radius + other.oedema.semi.max() + 2
                    for other in placed)
        if room and clear and apart:
            return centre
    return None


def _lesion_at(rng, centre, semi, axes) -> Lesion:
    core_semi = np.minimum(np.maximum(semi * rng.uniform(*CORE_FRACTION), MIN_CORE_SEMI_MM), 0.8 * semi)
    slack = float((semi - core_semi).min()) / 2
    direction = rng.standard_normal(3)
    core_centre = centre + direction / np.linalg.norm(direction) * rng.uniform(0, slack)
    necrosis = None
    ring_wanted = rng.random() < RING_PROBABILITY
    ring_mm = rng.uniform(1.5, 2.5)
    if ring_wanted and 2 * core_semi.min() >= RING_MIN_CORE_MM:
        necrosis = Ellipsoid(core_centre, core_semi - ring_mm, axes)
    return Lesion(Ellipsoid(centre, semi, axes), Ellipsoid(core_centre, core_semi, axes), necrosis)
