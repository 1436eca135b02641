"""Probability maps as NIfTI (a batch run's ``<case>_prob.nii.gz``), in the source geometry (the mask's
affine and shape).

Binary models: the foreground probability, 3D. More classes: one channel per class, 4D ``(x, y, z, c)``.
``uint8`` (the default): ``round(p * 255)``, no scaling in the header (read 0..255, divide by 255).
``float16``: the values rounded to float16 precision; NIfTI-1 has no 16-bit float type, so they are
stored as float32 (exactly the float16 values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np

from pipeline.config.schema import PROBABILITY_DTYPES
from pipeline.errors import InputError
from pipeline.io.write import atomic_save

__all__ = ["PROBABILITY_DTYPES", "encode_probabilities", "write_probabilities"]


def encode_probabilities(probabilities: np.ndarray, dtype: str) -> np.ndarray:
    """``probabilities`` (in [0, 1]) as they are stored: uint8 ``round(p * 255)`` or float16-rounded float32."""
    if dtype not in PROBABILITY_DTYPES:
        raise InputError(f"probabilities dtype {dtype!r}: expected one of {', '.join(PROBABILITY_DTYPES)}")
    p = np.clip(np.asarray(probabilities, dtype=np.float32), 0.0, 1.0)
    if dtype == "uint8":
        return np.rint(p * 255.0).astype(np.uint8)
    return p.astype(np.float16).astype(np.float32)


def write_probabilities(probabilities: np.ndarray, affine: np.ndarray, out_path: Union[str, Path],
                        dtype: str = "uint8") -> Path:
    """Write a probability map (3D, or 4D with classes last) with ``affine`` (RAS), atomically."""
    out_path = Path(out_path)
    if probabilities.ndim not in (3, 4):
        raise InputError(f"a probability map must be 3D or 4D (x, y, z, class) to be written to '{out_path}', "
                         f"found shape {probabilities.shape}")
    data = encode_probabilities(probabilities, dtype)
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["descrip"] = b"medseg probabilities"
    atomic_save(image, out_path)
    return out_path
