"""Writing masks as NIfTI in the exact grid of their source scan, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import nibabel as nib
import numpy as np

from pipeline.errors import InputError
from pipeline.io.atomic import atomic_path
from pipeline.io.reader import is_nifti


def write_mask(
    mask: np.ndarray,
    affine: np.ndarray,
    out_path: Union[str, Path],
    source: Optional[Union[str, Path]] = None,
) -> Path:
    """Write ``mask`` (uint8, the source's shape) as NIfTI with ``affine`` (RAS), atomically.

    When ``source`` is a NIfTI file its header is reused, so the sform/qform and their codes are the
    source's own; otherwise both are set to ``affine`` with code 1 (scanner). Either way the header's
    texts are ours (``descrip`` "medseg mask", ``aux_file`` and ``intent_name`` empty) and the source's
    header extensions (which may hold a whole DICOM header) are not copied: a mask carries its geometry,
    no more identity than the source.
    """
    out_path = Path(out_path)
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"a mask must be 3D to be written to '{out_path}', found shape {mask.shape}")
    mask = mask.astype(np.uint8, copy=False)
    image = _nifti_like_source(mask, affine, source)
    atomic_save(image, out_path)
    return out_path


def _nifti_like_source(mask: np.ndarray, affine: np.ndarray, source) -> nib.Nifti1Image:
    if source is not None and is_nifti(source) and Path(source).is_file():
        header = nib.load(str(source)).header.copy()
        if tuple(header.get_data_shape()[:3]) == mask.shape:
            image = nib.Nifti1Image(mask, None, header=header)
            image.header.set_data_dtype(np.uint8)
            image.header.set_slope_inter(1.0, 0.0)
            image.header["cal_min"], image.header["cal_max"] = 0, 0
            _own_texts(image.header)
            image.header.extensions.clear()
            if np.allclose(image.header.get_best_affine(), affine, atol=1e-4):
                return image
    image = nib.Nifti1Image(mask, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_data_dtype(np.uint8)
    _own_texts(image.header)
    return image


def _own_texts(header) -> None:
    header["descrip"] = b"medseg mask"
    header["aux_file"] = b""
    header["intent_name"] = b""


def atomic_save(image: nib.Nifti1Image, out_path: Path) -> None:
    """Save to a temporary name in the same folder, then rename: readers never see half a file."""
    suffix = ".tmp.nii.gz" if str(out_path).endswith(".gz") else ".tmp.nii"
    with atomic_path(out_path, suffix=suffix) as tmp:
        nib.save(image, str(tmp))
