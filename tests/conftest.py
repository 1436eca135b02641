"""Shared fixtures: tiny synthetic volumes with known geometry, written as NIfTI or DICOM."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """ONNX exports and backend timings go to a temporary cache, not the user's ~/.cache/medseg."""
    import os

    old = os.environ.get("MEDSEG_CACHE_DIR")
    os.environ["MEDSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("medseg-cache"))
    yield
    if old is None:
        os.environ.pop("MEDSEG_CACHE_DIR", None)
    else:
        os.environ["MEDSEG_CACHE_DIR"] = old

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_affine(orientation: str, spacing=(0.8, 0.9, 2.5), origin=(12.0, -30.0, 45.0)) -> np.ndarray:
    """RAS affine: 'RAS' diagonal, 'LPS' first two axes flipped, 'oblique' LPS rotated about two axes."""
    linear = np.diag(spacing).astype(float)
    if orientation in ("LPS", "oblique"):
        linear = np.diag([-1.0, -1.0, 1.0]) @ linear
    if orientation == "oblique":
        linear = Rotation.from_euler("xz", [14, 21], degrees=True).as_matrix() @ linear
    if orientation == "feet_first":
        linear = np.diag([1.0, 1.0, -1.0]) @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


def blob_label(shape=(40, 36, 14), seed=0) -> np.ndarray:
    """A label with a few boxes and a ball, away from the volume centre (so flips would show)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[4:14, 6:12, 2:6] = 1
    label[25:33, 20:30, 8:12] = 1
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centre = np.array(shape) * [0.3, 0.7, 0.6] + rng.uniform(-1, 1, 3)
    label[((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + ((kk - centre[2]) * 3) ** 2) < 30] = 1
    return label


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample scans not found at {SHARED_DATA} (the shared/ folder beside the checkout)")
    return SHARED_DATA
