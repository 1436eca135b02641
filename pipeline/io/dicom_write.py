"""Write a 3D volume as a DICOM image series (one file per slice ``k``).

The series is written so that reading it back the way :mod:`pipeline.io.geometry` describes (slices
stacked along their normal, then :func:`~pipeline.io.geometry.closest_canonical`) gives exactly the
voxels and world positions of ``closest_canonical(volume, affine)``. It is used to make synthetic test
data; it is not a general-purpose DICOM exporter (no enhanced multi-frame, no compression).

Geometry mapping, for slice ``k`` (arrays are ``[i, j, k]``, affines RAS, DICOM LPS):

* pixel ``(row, column)`` is voxel ``(i=column, j=row, k)``, i.e. ``pixel_array = volume[:, :, k].T``;
* ImageOrientationPatient = LPS unit vectors of increasing ``i`` (along a row) then increasing ``j``;
* PixelSpacing = ``[spacing along j, spacing along i]`` (row spacing first, as DICOM orders it);
* ImagePositionPatient = LPS position of voxel ``(0, 0, k)``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from pipeline.errors import InputError
from pipeline.io.atomic import make_partial_dir
from pipeline.io.geometry import LPS_TO_RAS

logger = logging.getLogger(__name__)

_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
_ORTHOGONALITY_TOL = 1e-6


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    patient_id: str = "SYNTH",
    patient_name: str | None = None,
    accession_number: str = "",
    series_description: str = "synthetic CT",
    series_number: int = 1,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    modality: str = "CT",
    rescale_intercept: float = -1024.0,
    rescale_slope: float | Sequence[float] = 1.0,
    uid_prefix: str = PYDICOM_ROOT_UID,
    uid_entropy: Sequence[str] | None = None,
    study_date: str = "20000101",
) -> list[Path]:
    """Write ``volume`` (``[i, j, k]``, real-world values such as HU) as ``IM_0001.dcm`` ... in ``out_dir``.

    PatientName is ``patient_name`` (default: ``patient_id``). UIDs: ``study_uid``/``series_uid`` are
    used when given; otherwise they are derived from ``uid_entropy`` (deterministic) or drawn at random.
    The per-slice SOP instance UIDs, and the frame-of-reference UID unless ``frame_of_reference_uid`` is
    given (pass one to put several series of a study in one patient space), are derived from the series
    UID, so a fixed series UID gives identical files.
    ``out_dir`` must be missing or empty; the files appear there all at once (written to a temporary
    sibling folder first). Returns the written paths in slice order ``k = 0, 1, ...``.

    ``rescale_slope`` may be one value per slice (real scanners sometimes vary it), to test readers.
    """
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    out_dir = Path(out_dir)
    slopes = np.asarray(rescale_slope, dtype=np.float64)
    if slopes.ndim == 0:
        slopes = np.full(volume.shape[2:3], float(slopes))
    _check_inputs(volume, affine, out_dir, modality, slopes)
    stored = _stored_values(volume, rescale_intercept, slopes)
    rescale_slope = float(slopes[0])

    study_uid = study_uid or _uid(uid_prefix, uid_entropy, "study")
    series_uid = series_uid or _uid(uid_prefix, uid_entropy, "series")
    template = _series_template(
        volume.shape,
        affine,
        patient_id=patient_id,
        patient_name=patient_id if patient_name is None else patient_name,
        accession_number=accession_number,
        series_description=series_description,
        series_number=series_number,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_of_reference_uid or generate_uid(uid_prefix, [str(series_uid), "frame-of-reference"]),
        modality=modality,
        rescale_intercept=rescale_intercept,
        rescale_slope=rescale_slope,
        study_date=study_date,
        window=_window(volume, modality),
    )

    tmp_dir = make_partial_dir(out_dir)
    try:
        names = []
        for k in range(volume.shape[2]):
            sop_uid = generate_uid(uid_prefix, [str(series_uid), "sop", str(k)])
            ds = _slice_dataset(template, stored[:, :, k], affine, k, sop_uid, modality)
            if slopes[k] != rescale_slope:
                ds.RescaleSlope = _ds(float(slopes[k]))
            name = f"IM_{k + 1:04d}.dcm"
            ds.save_as(tmp_dir / name, enforce_file_format=True)
            names.append(name)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.debug("wrote %d DICOM slices to %s", len(names), out_dir)
    return [out_dir / name for name in names]


def _check_inputs(volume, affine, out_dir: Path, modality: str, slopes: np.ndarray) -> None:
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise InputError(
            f"write_dicom_series expected a 3D volume [i, j, k], found shape {volume.shape}. "
            "Pass one channel of a non-empty 3D array."
        )
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(
            f"write_dicom_series expected a finite 4x4 affine, found shape {affine.shape}. "
            "Pass the image's RAS voxel-to-world affine."
        )
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"write_dicom_series expected non-zero voxel spacing, found {spacing.tolist()}.")
    cosines = linear / spacing
    off_diagonal = np.abs(cosines.T @ cosines - np.eye(3)).max()
    if off_diagonal > _ORTHOGONALITY_TOL:
        raise InputError(
            "write_dicom_series expected an affine with orthogonal axes (rotation and scaling only), "
            f"found axes whose cosines deviate by {off_diagonal:.2g} from orthogonal (sheared). "
            "Resample the volume to an orthogonal grid first."
        )
    if modality not in _SOP_CLASS:
        raise InputError(
            f"write_dicom_series expected modality one of {sorted(_SOP_CLASS)}, found {modality!r}."
        )
    if slopes.shape != volume.shape[2:3] or np.any(slopes == 0) or not np.all(np.isfinite(slopes)):
        raise InputError(f"write_dicom_series expected a non-zero finite rescale_slope (one value, or one per "
                         f"slice: {volume.shape[2]}), found {slopes.tolist()}.")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(
            f"write_dicom_series expected {out_dir} to be missing or an empty folder, found existing "
            "content. Choose a new folder or delete this one."
        )


def _stored_values(volume: np.ndarray, intercept: float, slope) -> np.ndarray:
    """Real-world values → stored int16 values (``stored * slope + intercept == value``); ``slope`` is one
    value or one per slice ``k``."""
    if not np.all(np.isfinite(volume)):
        raise InputError("write_dicom_series expected finite voxel values, found NaN or infinity.")
    stored = np.rint((volume.astype(np.float64) - intercept) / slope)
    info = np.iinfo(np.int16)
    if stored.min() < info.min or stored.max() > info.max:
        raise InputError(
            f"write_dicom_series stores int16 values; with intercept {intercept} and slope {np.unique(slope)} the "
            f"volume needs [{stored.min():.0f}, {stored.max():.0f}], outside [{info.min}, {info.max}]. "
            "Clip the volume or choose another rescale intercept/slope."
        )
    return stored.astype(np.int16)


def _uid(prefix: str, entropy: Sequence[str] | None, role: str) -> str:
    return generate_uid(prefix, None if entropy is None else [*map(str, entropy), role])


def _ds(value: float) -> DSfloat:
    """A Decimal String that fits DICOM's 16 characters."""
    return DSfloat(float(value), auto_format=True)


def _window(volume: np.ndarray, modality: str) -> tuple[float, float]:
    if modality == "CT":
        return 40.0, 400.0  # soft-tissue window
    low, high = np.percentile(volume, [1, 99])
    return float(low + high) / 2, float(max(high - low, 1.0))


def _series_template(shape, affine, *, frame_uid, window, **fields) -> Dataset:
    """The attributes every slice of the series shares."""
    lps = LPS_TO_RAS @ affine  # the flip is its own inverse
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    cosines = lps[:3, :3] / spacing

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = _SOP_CLASS[fields["modality"]]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = fields["study_date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = fields["accession_number"]
    ds.Modality = fields["modality"]
    ds.Manufacturer = "pipeline.synth"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = fields["series_description"]
    ds.PatientName = fields["patient_name"]
    ds.PatientID = fields["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = fields["study_uid"]
    ds.SeriesInstanceUID = fields["series_uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = int(fields["series_number"])
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [_ds(v) for v in (*cosines[:, 0], *cosines[:, 1])]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    ds.SliceThickness = _ds(spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(shape[1])
    ds.Columns = int(shape[0])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(window[1])
    ds.RescaleIntercept = _ds(fields["rescale_intercept"])
    ds.RescaleSlope = _ds(fields["rescale_slope"])
    if fields["modality"] == "CT":
        ds.RescaleType = "HU"
        ds.KVP = ""
    return ds


def _slice_dataset(template: Dataset, stored_slice, affine, k: int, sop_uid: str, modality: str):
    lps = LPS_TO_RAS @ affine
    position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
    normal = np.cross(lps[:3, 0], lps[:3, 1])
    normal /= np.linalg.norm(normal)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = FileDataset(None, Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.update(template)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(position @ normal))
    ds.PixelData = np.ascontiguousarray(stored_slice.T).astype("<i2").tobytes()
    return ds
