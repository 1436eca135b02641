"""A synthetic CT scan for benchmarks, fast enough for 512×512×400 voxels, written once and reused.

``make_ct(folder, shape, spacing, seed)`` writes ``ct_<X>x<Y>x<Z>_s<seed>.nii.gz`` (int16 HU) into
``folder`` and, with ``dicom=True``, the same volume as an uncompressed CT series in
``ct_<X>x<Y>x<Z>_s<seed>_dicom/`` (:func:`dicom_series_dir`). A ``.params.json`` beside the file records
what was made; a later call with the same parameters returns the existing file without writing anything.

The phantom (:func:`phantom`) is built one axial slice at a time in float32 into an int16 volume that
is Fortran-ordered (slices contiguous, the order NIfTI stores), so memory stays at ~2 bytes per voxel
plus a few slices of scratch and 512×512×400 takes a few seconds. Unlike :mod:`pipeline.synth.phantom`
(made for training data: textures, soft lesion edges, oblique orientations), it is built for realistic
*costs*: a body of soft tissue covering ~55 % of each slice with air around it (so the foreground crop
keeps a typical fraction), lungs in the upper third, a liver, two kidneys, a spine, a few round lesions
in the liver and 12 HU Gaussian noise (so the file compresses like a real scan, not like a cartoon).

Geometry: voxel ``[i, j, k]`` with ``i`` towards the patient's right and ``j`` towards the back, as a
scanner stores an axial series (DICOM LPS with identity direction cosines); in RAS terms the affine is
``diag(-sx, -sy, sz)``, centred on the volume's middle.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.io.atomic import atomic_path, write_json

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the phantom changes, so cached files are rebuilt
NOISE_HU = 12.0


def ct_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of an LPS-stored axial series with ``spacing``, the volume centre at the origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2])])
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def ct_name(shape: Sequence[int], seed: int) -> str:
    return f"ct_{'x'.join(str(int(n)) for n in shape)}_s{int(seed)}"


def dicom_series_dir(nifti_path: str | Path) -> Path:
    """The DICOM series folder :func:`make_ct` writes beside ``nifti_path`` with ``dicom=True``."""
    nifti_path = Path(nifti_path)
    return nifti_path.with_name(nifti_path.name[: -len(".nii.gz")] + "_dicom")


def make_ct(folder: str | Path, shape: Sequence[int], spacing: Sequence[float], seed: int = 0,
            dicom: bool = False) -> Path:
    """Write (or reuse) the synthetic CT; returns the ``.nii.gz`` path (DICOM: :func:`dicom_series_dir`)."""
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"make_ct: expected 3 sizes >= 8 and 3 positive spacings, found {shape}, {spacing}")
    name = ct_name(shape, seed)
    path = folder / f"{name}.nii.gz"
    params_path = folder / f"{name}.params.json"
    params = {"recipe": RECIPE_VERSION, "shape": list(shape), "spacing": list(spacing), "seed": int(seed)}
    recorded = _read_params(params_path)
    dicom_dir = dicom_series_dir(path)
    nifti_ok = recorded.get("nifti") == params and path.is_file()
    dicom_ok = not dicom or (recorded.get("dicom") == params and dicom_dir.is_dir())
    if nifti_ok and dicom_ok:
        logger.debug("reusing synthetic CT %s", path)
        return path

    affine = ct_affine(shape, spacing)
    volume = phantom(shape, spacing, seed)
    if not nifti_ok:
        recorded.pop("nifti", None)
        _write_params(params_path, recorded)
        image = nib.Nifti1Image(volume, affine)
        image.set_sform(affine, code=1)
        image.set_qform(affine, code=1)
        image.header.set_xyzt_units("mm", "sec")
        with atomic_path(path, suffix=".nii.gz") as tmp:
            nib.save(image, str(tmp))
        recorded["nifti"] = params
        _write_params(params_path, recorded)
    if dicom and not dicom_ok:
        from pipeline.io.dicom_write import write_dicom_series

        recorded.pop("dicom", None)
        _write_params(params_path, recorded)
        if dicom_dir.exists():
            shutil.rmtree(dicom_dir)
        write_dicom_series(volume, affine, dicom_dir, series_description="synthetic CT (benchmark)",
                           uid_entropy=["medseg-bench", name, json.dumps(params)])
        recorded["dicom"] = params
        _write_params(params_path, recorded)
    return path


def phantom(shape: Sequence[int], spacing: Sequence[float], seed: int = 0) -> np.ndarray:
    """The synthetic CT volume (int16 HU, ``shape``, Fortran order), deterministic for ``seed``."""
    nx, ny, nz = (int(n) for n in shape)
    sx, sy, sz = (float(s) for s in spacing)
    rng = np.random.default_rng([RECIPE_VERSION, int(seed)])
    fov_x, fov_y, fov_z = nx * sx, ny * sy, nz * sz
    # In-plane world coordinates (mm) of voxel centres; x grows to the patient's left, y to the front.
    x = (-(np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[:, None]
    y = (-(np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :]
    z_of = (np.arange(nz) - (nz - 1) / 2) * sz

    a, b = 0.46 * fov_x * rng.uniform(0.97, 1.0), 0.38 * fov_y * rng.uniform(0.97, 1.0)  # body semi-axes
    fat = 8.0
    tissue, fat_hu = rng.uniform(35, 45), rng.uniform(-110, -90)
    liver = {"c": np.array([-0.35 * a, 0.05 * b, -0.05 * fov_z]),
             "r": np.array([0.38 * a, 0.55 * b, 0.28 * fov_z]), "hu": rng.uniform(55, 65)}
    kidneys = [{"c": np.array([side * 0.4 * a, -0.45 * b, -0.2 * fov_z]),
                "r": np.array([0.12 * a, 0.2 * b, 0.12 * fov_z]), "hu": rng.uniform(25, 35)} for side in (-1, 1)]
    lungs = [{"c": np.array([side * 0.45 * a, 0.0, 0.42 * fov_z]),
              "r": np.array([0.38 * a, 0.7 * b, 0.25 * fov_z]), "hu": -850.0} for side in (-1, 1)]
    spine_c, spine_r = np.array([0.0, -0.72 * b]), 0.13 * b
    lesions = []
    for _ in range(int(rng.integers(3, 7))):
        radius = float(rng.uniform(4.0, 15.0))
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centre = liver["c"] + 0.6 * liver["r"] * direction * rng.uniform(0, 1) ** (1 / 3)
        lesions.append({"c": centre, "r": radius, "hu": float(rng.choice([-1, 1]) * rng.uniform(25, 50))})

    volume = np.empty((nx, ny, nz), dtype=np.int16, order="F")
    x2, y2 = x * x, y * y
    for k in range(nz):
        z = float(z_of[k])
        taper = 1.0 - 0.05 * (2 * z / fov_z) ** 2  # the body narrows a little towards the ends
        ab, bb = a * taper, b * taper
        body = x2 / ab**2 + y2 / bb**2 < 1
        inner = x2 / (ab - fat) ** 2 + y2 / (bb - fat) ** 2 < 1
        sl = np.full((nx, ny), -1000.0, dtype=np.float32)
        sl[body] = fat_hu
        sl[inner] = tissue
        for organ in lungs + [liver] + kidneys:
            _ellipsoid_slice(sl, x, y, z, organ, inner)
        spine = (x - spine_c[0]) ** 2 + (y - spine_c[1]) ** 2
        sl[spine < spine_r**2] = 700.0
        sl[spine < (0.7 * spine_r) ** 2] = 250.0
        for lesion in lesions:
            dz = z - lesion["c"][2]
            if abs(dz) < lesion["r"]:
                r2 = lesion["r"] ** 2 - dz**2
                disk = (x - np.float32(lesion["c"][0])) ** 2 + (y - np.float32(lesion["c"][1])) ** 2 < r2
                sl[disk & inner] += lesion["hu"]
        sl += rng.standard_normal((nx, ny), dtype=np.float32) * np.float32(NOISE_HU)
        np.clip(sl, -1024, 3071, out=sl)
        volume[:, :, k] = np.rint(sl)
    return volume


def _ellipsoid_slice(sl, x, y, z, organ, inside) -> None:
    c, r = organ["c"], organ["r"]
    t = 1 - ((z - c[2]) / r[2]) ** 2
    if t <= 0:
        return
    ellipse = ((x - np.float32(c[0])) / np.float32(r[0])) ** 2 + ((y - np.float32(c[1])) / np.float32(r[1])) ** 2 < t
    sl[ellipse & inside] = organ["hu"]


def _read_params(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_params(path: Path, params: dict) -> None:
    write_json(params, path, indent=1)
