"""``convert_folder``: every scan under a folder as ``<case>.nii.gz``, plus ``index.csv``.

Discovery, selection and geometry are exactly those of ``segment`` (the same :func:`discover` and
:class:`ScanReader`), so a converted image and a segmentation mask of the same case share their grid.
Each volume is written atomically; one that fails is listed with its reason and nothing is written for
it; the others go on. Sources, reasons and log lines follow :mod:`pipeline.io.privacy` (paths relative to
the input folder, patient identifiers replaced) unless ``keep_paths``.

With ``input.channels`` (rules that pick a DICOM study's series as channels), each study is written as
nnU-Net-style channel files ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``... on channel 0's grid (the
other channels resampled onto it in world coordinates), ready to be training images.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import nibabel as nib
import numpy as np

from pipeline.config.schema import InputConfig
from pipeline.errors import describe_error
from pipeline.io.atomic import atomic_path
from pipeline.io.discover import Case, discover
from pipeline.io.geometry import voxel_spacing
from pipeline.io.privacy import Redactor, held_logs, redacted_logging
from pipeline.io.reader import ScanReader
from pipeline.io.write import atomic_save

log = logging.getLogger(__name__)

INDEX_NAME = "index.csv"


@dataclass
class ConvertedRow:
    """One row of ``index.csv`` (the column order is the file's)."""

    case_id: str = ""
    nifti: str = ""  # file name inside the output folder (channel files: names joined by ";")
    series_uid: str = ""  # channels of a study: each channel's series UID, joined by ";"
    series_number: str = ""
    series_description: str = ""
    modality: str = ""
    echo_number: str = ""
    image_type: str = ""
    n_files: int = 0
    shape: str = ""  # e.g. 512x512x300
    spacing_mm: str = ""  # e.g. 0.782x0.782x1.250
    status: str = ""  # converted | skipped | failed
    reason: str = ""
    source: str = ""  # the folder or file it came from (relative to the input folder unless keep_paths)


def convert_folder(
    input_dir: Union[str, Path],
    output_dir: Union[str, Path],
    select: Optional[InputConfig] = None,
    *,
    overwrite: bool = True,
    keep_paths: bool = False,
) -> list[ConvertedRow]:
    """Convert every discovered volume; returns the rows written to ``output_dir/index.csv``.

    ``keep_paths``: full source paths in ``index.csv`` and the log (default: see :mod:`pipeline.io.privacy`).
    """
    select = select or InputConfig()
    names = [rule.name for rule in select.channels]
    with held_logs() as held:  # discovery's lines name folders: shown once the identifiers are known
        found = discover(input_dir, select, channels=names)
    redact = found.redactor(input_dir, keep_paths=keep_paths)
    with redacted_logging(redact):
        held.replay()
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        reader = ScanReader(channels=max(1, len(names)), channel_names=names)
        rows = []
        for case in found.cases:
            rows.append(_convert_case(case, output_dir, reader, overwrite, redact))
        for skipped in found.skipped:
            rows.append(ConvertedRow(case_id=skipped.case_id, series_uid=skipped.series_uid, status="skipped",
                                     reason=redact.text(skipped.reason), source=redact.path(skipped.source)))
        write_index(rows, output_dir / INDEX_NAME)
    return rows


def _convert_case(case: Case, output_dir: Path, reader: ScanReader, overwrite: bool,
                  redact: Redactor) -> ConvertedRow:
    row = ConvertedRow(
        case_id=case.case_id,
        series_uid=case.series_uid,
        series_number="" if case.series_number is None else str(case.series_number),
        series_description=redact.text(case.series_description),
        modality=case.modality,
        echo_number=case.echo_number,
        image_type=case.image_type,
        n_files=len(case.files),
        source=redact.path(case.display_source),
    )
    multi = case.channels is not None
    out_paths = ([output_dir / f"{case.case_id}_{c:04d}.nii.gz" for c in range(reader.channels)] if multi
                 else [output_dir / f"{case.case_id}.nii.gz"])
    try:
        array, meta = reader.get_data(reader.read(case.reader_input))
        affine = np.asarray(meta["affine"], dtype=np.float64)
        volumes = [array[..., c] for c in range(array.shape[3])] if multi else [array]
        for volume, out_path in zip(volumes, out_paths):
            if overwrite or not out_path.exists():
                image = nib.Nifti1Image(np.asarray(volume), affine)
                image.set_sform(affine, code=1)
                image.set_qform(affine, code=1)
                atomic_save(image, out_path)
    except Exception as exc:  # isolate the volume: record why, go on with the others
        row.status, row.reason = "failed", redact.text(describe_error(exc))
        log.error("cannot convert %s: %s", case.case_id, row.reason)
        return row
    row.nifti = ";".join(p.name for p in out_paths)
    row.series_uid = ";".join(case.channel_series_uids) or row.series_uid
    row.shape = "x".join(str(int(s)) for s in array.shape[:3])
    row.spacing_mm = "x".join(f"{s:.4g}" for s in voxel_spacing(affine))
    row.status = "converted"
    log.info("converted %s -> %s (%s)", case.case_id, row.nifti, row.shape)
    return row


def write_index(rows: list[ConvertedRow], path: Path) -> None:
    """``index.csv``, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [f.name for f in fields(ConvertedRow)]
    writer.writerow(names)
    for row in rows:
        writer.writerow([getattr(row, name) for name in names])
    with atomic_path(path, suffix=".tmp.csv") as tmp:
        tmp.write_text(buffer.getvalue())
