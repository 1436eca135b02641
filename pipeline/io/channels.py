"""Multi-channel scans: several co-registered volumes of one case read as one (X, Y, Z, C) array.

A :class:`Channels` names one source per channel, in the model's channel order: NIfTI/NRRD/MHA files
(nnU-Net's ``case_0000``, ``case_0001``...), DICOM volumes of one study (``input.channels``), or both.
Channel 0 is the reference: its grid and affine are the case's, and every other channel is resampled
onto it in world coordinates (trilinear, no registration), so a point at given millimetres in channel 1
lands at the same millimetres on channel 0's grid. Channels already on channel 0's grid (the nnU-Net
rule) are taken as they are. Voxels of channel 0's grid outside another channel's field of view get that
channel's minimum (its background). "The same grid" is :func:`~pipeline.io.geometry.grid_difference`'s
rule, the one ``medseg check`` applies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.io.geometry import grid_difference

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Channels:
    """One source per channel (a path, a DICOM file list or a ``DicomVolume``), in channel order.

    ``missing`` holds one message per channel that could not be found; reading such a case fails with
    them, so a case lacking a channel fails alone, naming that channel.
    """

    sources: tuple[Any, ...]
    names: tuple[str, ...] = ()
    missing: tuple[str, ...] = field(default=())

    def name(self, index: int) -> str:
        return self.names[index] if index < len(self.names) else str(index)

    def check_complete(self, where: str) -> None:
        if self.missing:
            raise InputError(f"case '{where}' lacks {'; '.join(self.missing)}")


def onto_grid(array: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray) -> np.ndarray:
    """``array`` (with RAS ``affine``) resampled onto the grid ``shape``/``target_affine``: float32,
    trilinear in world coordinates; outside its field of view, its minimum."""
    from scipy import ndimage

    # voxel of the target -> world -> voxel of the source
    mapping = np.linalg.solve(np.asarray(affine, float), np.asarray(target_affine, float))
    data = np.asarray(array, dtype=np.float32)
    background = float(data.min()) if data.size else 0.0
    return ndimage.affine_transform(data, mapping[:3, :3], offset=mapping[:3, 3], output_shape=tuple(shape),
                                    order=1, mode="constant", cval=background, prefilter=False)


def stack_channels(arrays: list[np.ndarray], affines: list[np.ndarray], names: list[str], case: str) -> np.ndarray:
    """The channels as one (X, Y, Z, C) array on channel 0's grid (see the module docstring)."""
    reference_shape, reference_affine = arrays[0].shape, affines[0]
    on_grid = []
    for c, (array, affine) in enumerate(zip(arrays, affines)):
        if array.ndim != 3:
            raise InputError(f"case '{case}': channel {c} ({names[c]}) has shape {array.shape}: expected a 3D "
                             "volume per channel")
        if c and grid_difference(reference_shape, reference_affine, array.shape, affine):
            log.info("case %s: channel %d (%s) resampled onto channel 0's grid (%s -> %s)", case, c, names[c],
                     array.shape, tuple(reference_shape))
            array = onto_grid(array, affine, reference_shape, reference_affine)
        on_grid.append(array)
    dtype = np.result_type(*[a.dtype for a in on_grid])
    out = np.empty(tuple(reference_shape) + (len(on_grid),), dtype=dtype, order="F")
    for c, array in enumerate(on_grid):
        out[..., c] = array
    return out
