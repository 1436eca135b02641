"""Finding the scans under an input folder: NIfTI/ITK volume files and DICOM series.

DICOM files are recognised by content (the ``DICM`` marker), not by extension, and grouped into
series by SeriesInstanceUID per folder; only headers are read while scanning.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from pipeline.errors import InputError
from pipeline.io.reader import ITK_SUFFIXES, NIFTI_SUFFIXES

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = tuple(s for s in NIFTI_SUFFIXES + ITK_SUFFIXES if s != ".dcm")
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net's image channel suffix: case_0000.nii.gz


@dataclass
class Case:
    """One scan to segment. ``source`` is a file path or the list of a DICOM series' files."""

    case_id: str
    source: Union[str, list[str]]
    kind: str  # nifti | itk | dicom
    series_uid: str = ""

    @property
    def files(self) -> list[str]:
        """Every file the case reads."""
        return list(self.source) if isinstance(self.source, list) else [self.source]

    @property
    def reader_input(self):
        """What the loading step reads for this case (``ScanReader``/``LoadScand`` accept it)."""
        return self.source

    @property
    def display_source(self) -> str:
        return self.source if isinstance(self.source, str) else str(Path(self.source[0]).parent)


@dataclass
class Skipped:
    """Something found under the input folder that will not be segmented, and why."""

    source: str  # a file or folder path
    reason: str
    case_id: str = ""
    series_uid: str = ""


@dataclass
class Discovery:
    """What an input folder holds: the cases to segment and what was skipped (with reasons)."""

    cases: list[Case]
    skipped: list[Skipped]


def discover(input_dir: Union[str, Path]) -> Discovery:
    """Cases under ``input_dir`` plus everything skipped with its reason."""
    skipped: list[Skipped] = []
    return Discovery(cases=discover_cases(input_dir), skipped=skipped)


def discover_cases(input_dir: Union[str, Path]) -> list[Case]:
    """All scans under ``input_dir`` (recursive), sorted by case id; case ids are unique."""
    root = Path(input_dir)
    if not root.exists():
        raise InputError(f"input folder not found: '{root}'. Pass a folder holding NIfTI files or DICOM series")
    if root.is_file():
        return [_volume_case(root, root.parent)]
    cases: list[Case] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder_path = Path(folder)
        dicom_files = []
        for name in sorted(filenames):
            path = folder_path / name
            if name.lower().endswith(VOLUME_SUFFIXES):
                cases.append(_volume_case(path, root))
            elif name.upper() != "DICOMDIR" and _is_dicom(path):
                dicom_files.append(path)
        if dicom_files:
            cases.extend(_dicom_cases(dicom_files, folder_path, root))
    _make_unique(cases)
    return sorted(cases, key=lambda c: c.case_id)


def _volume_case(path: Path, root: Path) -> Case:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = _CHANNEL_SUFFIX.sub("", name)
    rel_parent = path.parent.relative_to(root) if path.parent != root else Path()
    case_id = "_".join(list(rel_parent.parts) + [name]) if rel_parent.parts else name
    kind = "nifti" if path.name.lower().endswith(NIFTI_SUFFIXES) else "itk"
    return Case(case_id=_safe(case_id), source=str(path), kind=kind)


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_cases(files: list[Path], folder: Path, root: Path) -> list[Case]:
    import pydicom

    series: dict[str, list[tuple[Path, object]]] = {}
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for broken files
            log.warning("skipping unreadable DICOM file %s: %s", path, exc)
            continue
        if "PixelData" not in header and "ImagePositionPatient" not in header:
            log.info("skipping non-image DICOM object %s (SOP class %s)", path, header.get("SOPClassUID", "?"))
            continue
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))
    rel = folder.relative_to(root) if folder != root else Path(root.name)
    base = "_".join(rel.parts) or "dicom"
    cases = []
    for uid, members in sorted(series.items(), key=lambda kv: _series_number(kv[1][0][1])):
        case_id = base if len(series) == 1 else f"{base}_s{_series_number(members[0][1])}"
        paths = [str(p) for p, _ in members]
        cases.append(Case(case_id=_safe(case_id), source=paths, kind="dicom", series_uid=uid))
    return cases


def _series_number(header) -> int:
    try:
        return int(header.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _safe(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("_") or "case"


def _make_unique(cases: list[Case]) -> None:
    seen: dict[str, int] = {}
    for case in cases:
        count = seen.get(case.case_id, 0)
        seen[case.case_id] = count + 1
        if count:
            case.case_id = f"{case.case_id}_{count + 1}"
