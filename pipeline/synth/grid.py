"""Voxel grids of synthetic scans: their affines (RAS, LPS or oblique) and world coordinates in mm.

Every phantom in :mod:`pipeline.synth` is laid out in world millimetres computed from these, so what it
shows does not depend on the voxel size or orientation of the grid that samples it.
"""

from __future__ import annotations

import numpy as np

ORIENTATIONS = ("RAS", "LPS", "oblique")


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about world axis ``axis``."""
    a, b = [n for n in range(3) if n != axis]
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rot = np.eye(3)
    rot[a, a], rot[a, b], rot[b, a], rot[b, b] = c, -s, s, c
    return rot


def grid_centre(shape) -> np.ndarray:
    """Index of the volume centre (half-integer for even sizes)."""
    return (np.asarray(shape, dtype=np.float64) - 1) / 2


def make_affine(rng, shape, spacing, orientation) -> np.ndarray:
    """A RAS affine for ``orientation`` (oblique: 5-20 degrees about one or two axes), centred within 30 mm
    of the world origin."""
    turn = np.eye(3)
    if orientation == "LPS":
        turn = np.diag([-1.0, -1.0, 1.0])
    elif orientation == "oblique":
        for axis in rng.choice(3, size=int(rng.integers(1, 3)), replace=False):
            turn = turn @ rotation(int(axis), rng.choice([-1, 1]) * rng.uniform(5, 20))
    affine = np.eye(4)
    affine[:3, :3] = turn @ np.diag(spacing)
    centre_world = rng.uniform(-30, 30, size=3)
    affine[:3, 3] = centre_world - affine[:3, :3] @ grid_centre(shape)
    return affine


def world_grid(shape, linear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (mm, float32) of every voxel centre, relative to the volume centre."""
    offsets = [np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2) for n in shape]
    i, j, k = offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]
    rows = linear.astype(np.float32)
    return tuple(np.ascontiguousarray(np.broadcast_to(r[0] * i + r[1] * j + r[2] * k, shape)) for r in rows)


def random_rotation(rng) -> np.ndarray:
    """A uniformly random 3x3 rotation (determinant +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
