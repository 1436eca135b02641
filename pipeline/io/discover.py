"""Finding the scans under an input folder: NIfTI/NRRD/MHA volume files and DICOM volumes.

* The folder is walked recursively. DICOM files are recognised by content, not extension (GE writes
  ``i184.MRDC.23``); DICOMDIR files are ignored; non-image objects (SR, RTSTRUCT, SEG, presentation
  states, raw data) are skipped with their reason. Only headers are read (no pixel data).
* DICOM frames are grouped by SeriesInstanceUID across the whole tree, then split into volumes by
  orientation, echo, image type and repeated positions (:mod:`pipeline.io.dicom_series`).
* Case ids are stable and free of patient identifiers: built from the folder/file names relative to
  the input folder (a path component holding the patient's name, ID or accession number is replaced
  by ``patient-<hash>``, :mod:`pipeline.io.privacy`),
  plus ``_s<SeriesNumber>`` when a folder holds several series, plus the split suffix.
* Selection rules (``input.*`` in the config) choose what is segmented; everything else is returned in
  :attr:`Discovery.skipped` with a reason.
* Multi-channel models (``channels``: their channel names): ``<case>_0000``… files become one case, and
  with ``input.channels`` a DICOM study's series become the channels of one case
  (:mod:`pipeline.io.channel_cases`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from pipeline.config.schema import InputConfig
from pipeline.errors import InputError
from pipeline.io.channel_cases import group_channel_files, group_studies
from pipeline.io.channels import Channels
from pipeline.io.dicom_scan import Frame, looks_like_dicom, scan_file
from pipeline.io.dicom_series import DicomVolume, group_volumes
from pipeline.io.dicom_stack import StackPolicy
from pipeline.io.privacy import Redactor, identifiers, redact_part
from pipeline.io.reader import ITK_SUFFIXES, NIFTI_SUFFIXES

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = tuple(s for s in NIFTI_SUFFIXES + ITK_SUFFIXES if s != ".dcm")
_COMPANION_SUFFIXES = (".raw", ".zraw", ".raw.gz")  # pixel files of .mhd / .nhdr headers
_NOT_REGULAR = "not a regular file (a pipe, socket or device, or a broken or looping link): not read"
_CHANNEL_SUFFIX = re.compile(r"_000\d$")  # nnU-Net's image channel suffix: case_0000.nii.gz


@dataclass
class Case:
    """One scan to segment. ``source`` is a file path or the list of a DICOM volume's files."""

    case_id: str
    source: Union[str, list[str]]
    kind: str  # nifti | itk | dicom
    series_uid: str = ""
    series_number: Optional[int] = None
    series_description: str = ""
    modality: str = ""
    echo_number: str = ""
    image_type: str = ""
    volume: Optional[DicomVolume] = field(default=None, repr=False)
    # multi-channel cases: what each channel reads (channel 0 is this case's own source and series)
    channels: Optional[Channels] = field(default=None, repr=False)
    channel_files: list = field(default_factory=list, repr=False)  # every file of every channel
    channel_series_uids: list = field(default_factory=list)  # DICOM studies: each channel's series UID

    @property
    def files(self) -> list[str]:
        """Every file the case reads (every channel's)."""
        if self.channel_files:
            return list(self.channel_files)
        return self.reference_files

    @property
    def reference_files(self) -> list[str]:
        """The files of channel 0 (the scan whose grid the mask takes, and which a DICOM SEG references)."""
        return list(self.source) if isinstance(self.source, list) else [self.source]

    @property
    def reader_input(self):
        """What the loading step reads for this case (``ScanReader``/``LoadScand`` accept it)."""
        if self.channels is not None:
            return self.channels
        return self.volume if self.volume is not None else self.source

    @property
    def display_source(self) -> str:
        if self.volume is not None:
            return self.volume.folder
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
    patient_values: set[str] = field(default_factory=set, repr=False)  # PatientName/ID/Accession seen

    def redactor(self, root: Union[str, Path], keep_paths: bool = False) -> Redactor:
        """How this input's paths and messages are written (:mod:`pipeline.io.privacy`); it knows every
        folder name it replaces in the discovered paths, so messages naming them are redacted too."""
        redactor = Redactor(root, self.patient_values, keep_paths=keep_paths)
        for path in [*(case.display_source for case in self.cases), *(item.source for item in self.skipped)]:
            redactor.path(path)
        return redactor


def discover(input_dir: Union[str, Path], select: Optional[InputConfig] = None,
             channels: Sequence[str] = ()) -> Discovery:
    """Cases under ``input_dir`` (recursive, sorted by case id, ids unique) and what was skipped, with why.

    ``channels``: the channel names of a multi-channel model (see the module docstring); none or one:
    every volume is a case.
    """
    select = select or InputConfig()
    root = Path(input_dir)
    if not root.exists():
        raise InputError(f"input folder not found: '{root}'. Pass a folder holding NIfTI files or DICOM series")
    if root.is_file():
        if root.name.lower().endswith(VOLUME_SUFFIXES):
            return Discovery([_volume_case(root, root.parent)], [])
        root_files, base = [root], root.parent
    else:
        root_files, base = None, root
    cases: list[Case] = []
    skipped: list[Skipped] = []
    frames: list[Frame] = []
    volume_files: list[Path] = []  # named once the patient identifiers of the DICOM files are known
    for folder, files, has_subfolders in _walk(root) if root_files is None else [(root.parent, root_files, False)]:
        if not files and not has_subfolders and folder != root:
            skipped.append(Skipped(str(folder), "empty folder"))
            continue
        unknown: list[str] = []
        not_scans: dict[str, list[str]] = {}
        names = {p.name.lower() for p in files}
        for path in files:
            lower = path.name.lower()
            if not path.is_file():  # a FIFO would block a read forever; a broken or looping link
                not_scans.setdefault(_NOT_REGULAR, []).append(path.name)
            elif lower.endswith(VOLUME_SUFFIXES):
                volume_files.append(path)
            elif lower.endswith(_COMPANION_SUFFIXES) and _has_header_beside(lower, names):
                continue
            elif path.name.upper() == "DICOMDIR":
                log.info("ignoring DICOMDIR %s (the folder is scanned directly)", path)
            elif looks_like_dicom(path):
                result = scan_file(path)
                if result.frames:
                    frames.extend(result.frames)
                elif result.is_dicom:
                    not_scans.setdefault(result.skip_reason, []).append(path.name)
                else:
                    unknown.append(path.name)
            else:
                unknown.append(path.name)
        for reason, names_ in not_scans.items():
            skipped.append(Skipped(str(folder), f"{_count(names_)}: {reason}"))
            log.info("skipping %s in %s: %s", _count(names_), folder, reason)
        if unknown:
            skipped.append(Skipped(str(folder), f"{_count(unknown)} not recognised as a scan "
                                                f"(expected DICOM, NIfTI, NRRD or MHA/MHD)"))
    volumes = group_volumes(frames)
    values = {str(v) for frame in frames for v in frame.private.values()}
    idents = identifiers(values)
    cases.extend(_volume_case(path, base, idents) for path in volume_files)
    policy = StackPolicy.from_config(select)
    for volume in volumes:
        volume.policy = policy
    dicom_cases = _dicom_cases(volumes, base)
    for case in dicom_cases:
        reason = _not_selected(case, select)
        if reason:
            skipped.append(Skipped(case.display_source, reason, case.case_id, case.series_uid))
            log.info("not segmenting %s (%s): %s", case.case_id, case.volume.describe(), reason)
        else:
            cases.append(case)
    if len(channels) > 1:
        cases = group_channel_files(cases, list(channels), _strip_ending,
                                    lambda folder, name: _safe(_path_id(folder, base, name, idents)))
    if select.channels:
        studies, unused = group_studies([c for c in cases if c.kind == "dicom"], select.channels,
                                        lambda members: _study_id(members, base))
        cases = [c for c in cases if c.kind != "dicom"] + studies
        for case, reason in unused:
            skipped.append(Skipped(case.display_source, reason, case.case_id, case.series_uid))
    _make_unique(cases)
    for case in cases:
        if case.volume is not None:
            case.volume.case_id = case.case_id
    return Discovery(sorted(cases, key=lambda c: c.case_id), skipped, values)


def discover_cases(input_dir: Union[str, Path], select: Optional[InputConfig] = None) -> list[Case]:
    """The cases of :func:`discover` alone."""
    return discover(input_dir, select).cases


def _walk(root: Path):
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(folder), [Path(folder) / n for n in sorted(filenames) if not n.startswith(".")], bool(dirnames)


def _has_header_beside(lower_name: str, names: set[str]) -> bool:
    stem = lower_name
    for suffix in _COMPANION_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return any(f"{stem}{s}" in names for s in (".mhd", ".nhdr"))


def _count(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} file{'s' if len(names) != 1 else ''} ({shown})"


def _strip_ending(name: str) -> str:
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _path_id(folder: Path, root: Path, name: str, idents: frozenset = frozenset()) -> str:
    """A case id from a folder and a name relative to ``root``, parts holding ``idents`` redacted."""
    rel_parent = folder.relative_to(root) if folder != root else Path()
    return "_".join(redact_part(part, idents) for part in [*rel_parent.parts, name])


def _volume_case(path: Path, root: Path, idents: frozenset = frozenset()) -> Case:
    """A volume file's case: its folder and name relative to ``root``, parts holding ``idents`` redacted."""
    name = _CHANNEL_SUFFIX.sub("", _strip_ending(path.name))
    kind = "nifti" if path.name.lower().endswith(NIFTI_SUFFIXES) else "itk"
    return Case(case_id=_safe(_path_id(path.parent, root, name, idents)), source=str(path), kind=kind)


def _study_id(members: list[Case], root: Path) -> str:
    """A DICOM study's case id: the folder holding all its channels' series, as :func:`_folder_id` names it."""
    folders = [Path(c.volume.folder) for c in members]
    common = Path(os.path.commonpath([str(f) for f in folders])) if len(folders) > 1 else folders[0]
    private = {}
    for case in members:
        private.update(case.volume.frames[0].private)
    return _safe(_folder_id(common, root, private))


def _dicom_cases(volumes: list[DicomVolume], root: Path) -> list[Case]:
    bases = [_folder_id(Path(v.folder), root, v.frames[0].private) for v in volumes]
    series_per_base = Counter()
    for base in set(zip(bases, ((v.series.series_uid, v.series.series_number) for v in volumes))):
        series_per_base[base[0]] += 1
    cases = []
    for volume, base in zip(volumes, bases):
        case_id = base if series_per_base[base] == 1 else f"{base}_s{volume.series.series_number}"
        cases.append(Case(
            case_id=_safe(case_id + volume.suffix),
            source=volume.files,
            kind="dicom",
            series_uid=volume.series.series_uid,
            series_number=volume.series.series_number,
            series_description=volume.series.series_description,
            modality=volume.series.modality,
            echo_number=volume.echo,
            image_type=volume.image_type,
            volume=volume,
        ))
    return cases


def _folder_id(folder: Path, root: Path, names: dict) -> str:
    """Case id base: the folder relative to the input root; a path component holding the patient's name,
    ID or accession number becomes ``patient-<8 hex digits of its SHA-256>`` (:func:`redact_part`)."""
    rel = folder.relative_to(root) if folder != root and root in folder.parents else Path(root.name)
    idents = identifiers(names.values())
    return "_".join(redact_part(part, idents) for part in rel.parts or (root.name,)) or "dicom"


def _not_selected(case: Case, select: InputConfig) -> str:
    """Why a DICOM volume is not selected by the ``input.*`` rules ("" when it is)."""
    volume = case.volume
    image_type = set(volume.frames[0].image_type)
    if select.modalities and case.modality.upper() not in {m.upper() for m in select.modalities}:
        return f"modality {case.modality or '(none)'} not in input.modalities {select.modalities}"
    if volume.n_slices < select.min_slices:
        return f"{volume.n_slices} slice(s), fewer than input.min_slices={select.min_slices}"
    missing = [t for t in select.require_image_type if t.upper() not in image_type]
    if missing:
        return f"ImageType {case.image_type} lacks {missing} (input.require_image_type)"
    excluded = [t for t in select.exclude_image_type if t.upper() in image_type]
    if excluded:
        return f"ImageType {case.image_type} holds {excluded} (input.exclude_image_type)"
    if select.series_description and not re.search(select.series_description, case.series_description, re.I):
        return f"description '{case.series_description}' does not match input.series_description"
    if select.exclude_series_description and re.search(select.exclude_series_description,
                                                       case.series_description, re.I):
        return f"description '{case.series_description}' matches input.exclude_series_description"
    return ""


def _safe(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("_") or "case"


def _make_unique(cases: list[Case]) -> None:
    seen: dict[str, int] = {}
    for case in sorted(cases, key=lambda c: (c.case_id, c.display_source, c.series_uid)):
        count = seen.get(case.case_id, 0)
        seen[case.case_id] = count + 1
        if count:
            case.case_id = f"{case.case_id}_{count + 1}"
