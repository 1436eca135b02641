"""The cases of a dataset as users ship it: nnU-Net v2, Medical Segmentation Decathlon, or a plain folder.

::

    nnunetv2   dataset.json {channel_names, labels, numTraining, file_ending}
               imagesTr/<case>_0000<ending> ... <case>_000N<ending>   labelsTr/<case><ending>
    msd        dataset.json {modality, labels: {"0": "background"}, training: [{image, label}]}
               imagesTr/<case>.nii.gz (4D, channels on the 4th axis, when there are several modalities);
               nnU-Net v1 lists the same names for imagesTr/<case>_0000.nii.gz ...: those are read
    folder     no dataset.json: imagesTr/<case>_000k<ending> + labelsTr/<case><ending>

A ``dataset.json`` with a ``training`` list (``test`` for ``split="Ts"``) is read as MSD: the listed
files are the cases, whatever their names (our synthetic datasets list ``imagesTr/synth_000_0000.nii.gz``,
a 3D file, with ``labelsTr/synth_000.nii.gz``; the case id is the label's name, else the image's without
its extension and, for one-channel datasets, without a ``_0000`` suffix). One with ``channel_names`` and
no list is nnU-Net v2. The labels' dialect is told by their form (:mod:`pipeline.dataset.manifest`).

Listing never stops at the first problem: every missing channel or label, duplicate case id, stray or
unlisted file is reported, one line each naming the case and the file. A case missing an image file is
left out of ``cases`` (every image path listed exists); a case missing its label is listed with
``label=None``. Only a missing dataset folder, an unreadable ``dataset.json``, or no case at all raise.
Hidden files (``._BRATS_001.nii.gz``: macOS metadata, shipped inside the MSD archives) are ignored.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from pipeline.dataset.manifest import parse_channels, parse_labels, read_manifest
from pipeline.dataset.problem import DATASET, Problem
from pipeline.errors import InputError

log = logging.getLogger(__name__)

ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")  # the file endings a dataset may use
LISTS = {"Tr": "training", "Ts": "test"}  # the dataset.json list of each split (MSD)
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class DatasetCase:
    case_id: str
    images: list[str]  # one path per channel, in channel order; MSD 4D: [the 4D file]
    label: Optional[str]  # labels<split>/<case><ending>, None when missing
    four_d: bool = False  # images[0] is a 4D NIfTI with every channel on its 4th axis (MSD)


@dataclass
class Dataset:
    root: Path
    layout: str  # "nnunetv2" | "msd" | "folder"
    channel_names: list[str]
    labels: dict[str, int]  # name -> value; {} when the dataset does not say (plain folder)
    file_ending: str
    cases: list[DatasetCase]  # sorted by case_id
    problems: list[str]  # one line each, naming the case


def read_dataset(root: Union[str, Path], split: str = "Tr") -> Dataset:
    """The cases of the dataset in ``root`` (``split`` "Tr": imagesTr/labelsTr, "Ts": imagesTs/labelsTs)."""
    return list_dataset(root, split)[0]


def list_dataset(root: Union[str, Path], split: str = "Tr") -> tuple[Dataset, list[Problem]]:
    """:func:`read_dataset`, with its problems also as :class:`Problem` (case id, message) for checks."""
    root = Path(root)
    if split not in LISTS:
        raise InputError(f"unknown split {split!r}: expected 'Tr' (imagesTr/labelsTr) or 'Ts' (imagesTs/labelsTs)")
    if not root.is_dir():
        raise InputError(
            f"dataset folder not found: '{root}'. Expected a folder with imagesTr/ and labelsTr/ (and "
            "optionally dataset.json, nnU-Net v2 or MSD), e.g. one made by `medseg synth data/demo`"
        )
    manifest = root / "dataset.json"
    meta = read_manifest(manifest) if manifest.is_file() else None
    if meta is None:
        listing = _Listing(root, split, "folder", [], {}, _detect_ending(root, split))
        _list_by_channel_files(listing, None)
    elif isinstance(meta.get(LISTS[split]), list) or "modality" in meta:
        listing = _Listing(root, split, "msd", parse_channels(meta, manifest) or ["0"],
                           parse_labels(meta, manifest), "")
        _list_msd(listing, meta)
    elif "channel_names" in meta:
        ending = meta.get("file_ending", _detect_ending(root, split))
        if ending not in ENDINGS:
            raise InputError(f"'{manifest}': file_ending {ending!r} is not supported: expected one of {list(ENDINGS)}")
        listing = _Listing(root, split, "nnunetv2", parse_channels(meta, manifest), parse_labels(meta, manifest),
                           ending)
        _list_by_channel_files(listing, meta)
    else:
        raise InputError(
            f"'{manifest}' is neither an nnU-Net v2 dataset.json (expected 'channel_names', 'labels', "
            f"'file_ending') nor an MSD one (expected 'modality', 'labels', '{LISTS[split]}'). Fix it, or "
            "delete it to list imagesTr/ + labelsTr/ as a plain folder"
        )
    return listing.finish()


# --- listing ---------------------------------------------------------------------------------------


@dataclass
class _Listing:
    root: Path
    split: str
    layout: str
    channel_names: list[str]
    labels: dict[str, int]
    file_ending: str
    cases: dict[str, DatasetCase] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    seen: int = 0  # case ids found, listed or not

    @property
    def images_dir(self) -> Path:
        return self.root / f"images{self.split}"

    @property
    def labels_dir(self) -> Path:
        return self.root / f"labels{self.split}"

    def problem(self, case_id: str, message: str) -> None:
        self.problems.append(Problem(case_id, message))

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def finish(self) -> tuple[Dataset, list[Problem]]:
        if not self.seen:
            raise InputError(
                f"no {'training' if self.split == 'Tr' else 'test'} cases in '{self.root}' ({self.layout} layout): "
                f"expected images{self.split}/<case>_0000{self.file_ending or '.nii.gz'} + "
                f"labels{self.split}/<case>{self.file_ending or '.nii.gz'}"
                + (f", or a '{LISTS[self.split]}' list in dataset.json" if self.layout == "msd" else "")
            )
        cases = [self.cases[k] for k in sorted(self.cases)]
        dataset = Dataset(self.root, self.layout, self.channel_names, self.labels, self.file_ending or ".nii.gz",
                          cases, [p.line() for p in self.problems])
        log.debug("%s: %s layout, %d case(s), %d problem(s)", self.root, self.layout, len(cases), len(self.problems))
        return dataset, list(self.problems)


def _list_by_channel_files(listing: _Listing, meta: Optional[dict]) -> None:
    """nnU-Net v2 and plain folders: ``<case>_XXXX<ending>`` images, ``<case><ending>`` labels."""
    ending = listing.file_ending
    images = _channel_files(listing, ending)
    labels = _label_files(listing, ending)
    if not listing.channel_names:  # plain folder: the channel count of the majority of cases
        counts = Counter(max(channels) + 1 for channels in images.values())
        n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0] if counts else 1
        listing.channel_names = [str(c) for c in range(n)]
    ids = set(labels) | set(images)
    listing.seen = len(ids)
    for case_id in sorted(ids):
        _add_channel_case(listing, case_id, images.get(case_id, {}), labels.get(case_id))
    declared = meta.get("numTraining") if meta is not None and listing.split == "Tr" else None
    if declared is not None and declared != len(ids):
        listing.problem(DATASET, f"dataset.json numTraining is {declared}, but {len(ids)} case(s) were found in "
                                 f"imagesTr/ and labelsTr/: fix numTraining or add the missing cases")


def _add_channel_case(listing: _Listing, case_id: str, channels: dict[int, Path], label: Optional[Path]) -> None:
    ending, names, split = listing.file_ending, listing.channel_names, listing.split
    if not channels:
        listing.problem(case_id, f"label {listing.rel(label)} has no image: expected "
                                 f"images{split}/{case_id}_0000{ending}")
        return
    for c in sorted(channels):
        if c >= len(names):
            listing.problem(case_id, f"{listing.rel(channels[c])} is channel {c}, but the dataset has "
                                     f"{len(names)} channel(s) ({', '.join(names)}): remove it or declare it")
    missing = [c for c in range(len(names)) if c not in channels]
    for c in missing:
        listing.problem(case_id, f"channel {c} ({names[c]}) missing: expected images{split}/{case_id}_{c:04d}{ending}")
    if label is None and split == "Tr":
        listing.problem(case_id, f"image without label: expected labelsTr/{case_id}{ending}")
    if not missing:
        listing.cases[case_id] = DatasetCase(case_id, [str(channels[c]) for c in range(len(names))],
                                             str(label) if label is not None else None)


def _channel_files(listing: _Listing, ending: str) -> dict[str, dict[int, Path]]:
    """``{case: {channel: path}}`` of images<split>/; misnamed files and other endings are problems."""
    found: dict[str, dict[int, Path]] = {}
    others: dict[str, list[Path]] = {}
    for path, stem, file_ending in _volume_files(listing.images_dir):
        match = _CHANNEL.match(stem)
        if match is None:
            listing.problem(stem, f"{listing.rel(path)} is not named <case>_XXXX{file_ending} (a 4-digit channel "
                                  f"index): rename it, e.g. {stem}_0000{file_ending}")
            continue
        case_id, channel = match["case"], int(match["channel"])
        if file_ending != ending:
            others.setdefault(case_id, []).append(path)
        else:
            found.setdefault(case_id, {})[channel] = path
    _report_other_endings(listing, others, found)
    return found


def _label_files(listing: _Listing, ending: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    others: dict[str, list[Path]] = {}
    for path, stem, file_ending in _volume_files(listing.labels_dir):
        if file_ending != ending:
            others.setdefault(stem, []).append(path)
        else:
            found[stem] = path
    _report_other_endings(listing, others, found)
    return found


def _report_other_endings(listing: _Listing, others: dict[str, list[Path]], found: dict) -> None:
    for case_id, paths in sorted(others.items()):
        names = ", ".join(listing.rel(p) for p in paths)
        if case_id in found:
            listing.problem(case_id, f"duplicate case id: found with {listing.file_ending} and as {names}; "
                                     "keep one copy")
        else:
            listing.problem(case_id, f"{names}: ending differs from the dataset's {listing.file_ending}"
                                     f"{' (dataset.json file_ending)' if listing.layout == 'nnunetv2' else ''}; "
                                     "convert the file(s) or fix the ending")


def _list_msd(listing: _Listing, meta: dict) -> None:
    """The files listed in ``training`` (or ``test``): MSD, and our own synthetic datasets."""
    key = LISTS[listing.split]
    entries = meta.get(key)
    four_d = len(listing.channel_names) > 1
    if entries is None:  # e.g. an MSD dataset.json without a test list: one file per case
        entries = [p.relative_to(listing.root).as_posix() for p, _, _ in _volume_files(listing.images_dir)]
    listed_at: dict[str, int] = {}
    endings: Counter = Counter()
    listed_paths: set[Path] = set()
    for index, entry in enumerate(entries):
        image, label = _msd_entry(listing, key, index, entry)
        if image is None:
            continue
        image_path = listing.root / image
        label_path = listing.root / label if label else None
        case_id = _case_id(label_path.name if label_path is not None else image_path.name, strip_channel=not four_d)
        endings[_ending(image_path.name) or ""] += 1
        if case_id in listed_at:
            listing.problem(case_id, f"duplicate case id: dataset.json {key}[{index}] ({image}) and "
                                     f"{key}[{listed_at[case_id]}] are both case '{case_id}'; the first is used")
            continue
        listed_at[case_id] = index
        listed_paths.update(p.resolve() for p in _add_msd_case(listing, case_id, image_path, label_path, four_d))
    listing.seen = len(listed_at)
    ending = meta.get("file_ending") or (endings.most_common(1)[0][0] if endings else "")
    listing.file_ending = ending if ending in ENDINGS else ".nii.gz"
    for path, _, _ in _volume_files(listing.images_dir):
        if path.resolve() not in listed_paths and meta.get(key) is not None:
            listing.problem(_case_id(path.name, strip_channel=not four_d),
                            f"{listing.rel(path)} is not listed in dataset.json {key}: add it or remove the file")
    declared = meta.get("numTraining") if listing.split == "Tr" else None
    if declared is not None and declared != len(entries):
        listing.problem(DATASET, f"dataset.json numTraining is {declared}, but its training list has "
                                 f"{len(entries)} entries: fix numTraining")


def _msd_entry(listing: _Listing, key: str, index: int, entry) -> tuple[Optional[str], Optional[str]]:
    """``(image, label)`` paths relative to the root from one list entry (a path or an image/label dict)."""
    if isinstance(entry, str):
        image, label = entry, None
    elif isinstance(entry, dict) and isinstance(entry.get("image"), str):
        image, label = entry["image"], entry.get("label")
    else:
        listing.problem(DATASET, f"dataset.json {key}[{index}] is {entry!r}: expected "
                                 "{\"image\": \"./imagesTr/<case>.nii.gz\", \"label\": \"./labelsTr/<case>.nii.gz\"}")
        return None, None
    if label is None:  # MSD test lists name images only: a label beside them is still used
        stem = _case_id(Path(image).name, strip_channel=len(listing.channel_names) == 1)
        guess = f"labels{listing.split}/{stem}{_ending(Path(image).name) or '.nii.gz'}"
        label = guess if (listing.root / guess).is_file() else None
    return image, label if isinstance(label, str) else None


def _add_msd_case(listing: _Listing, case_id: str, image: Path, label: Optional[Path], four_d: bool) -> list[Path]:
    """Adds the case (if its images exist); returns its image files."""
    images = [image]
    if not image.exists():
        images = _v1_channel_files(listing, case_id, image)
        four_d = False
    if label is None:
        if listing.split == "Tr":
            listing.problem(case_id, f"no label: dataset.json lists {listing.rel(image)} without one")
    elif not label.is_file():
        listing.problem(case_id, f"label missing: expected {listing.rel(label)} (listed in dataset.json)")
        label = None
    if images and all(p.exists() for p in images):
        listing.cases[case_id] = DatasetCase(case_id, [str(p) for p in images],
                                             str(label) if label is not None else None, four_d=four_d)
    return images


def _v1_channel_files(listing: _Listing, case_id: str, image: Path) -> list[Path]:
    """nnU-Net v1 lists ``imagesTr/<case>.nii.gz`` for the files ``<case>_0000.nii.gz``, ``_0001``...: those
    files when any exists (a missing one is a problem), else none (the listed image is missing)."""
    ending = _ending(image.name) or ""
    stem = image.name[: len(image.name) - len(ending)]
    names = listing.channel_names
    channels = [image.with_name(f"{stem}_{c:04d}{ending}") for c in range(len(names))]
    if not any(p.is_file() for p in channels):
        listing.problem(case_id, f"image missing: expected {listing.rel(image)} (listed in dataset.json)")
        return []
    for c, path in enumerate(channels):
        if not path.is_file():
            listing.problem(case_id, f"channel {c} ({names[c]}) missing: expected {listing.rel(path)}")
    return channels


# --- file names ------------------------------------------------------------------------------------


def _volume_files(folder: Path) -> list[tuple[Path, str, str]]:
    """``(path, stem, ending)`` of the visible files in ``folder`` with one of :data:`ENDINGS`."""
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        ending = _ending(path.name)
        if path.name.startswith(".") or ending is None or not path.is_file():
            continue
        out.append((path, path.name[: -len(ending)], ending))
    return out


def _ending(name: str) -> Optional[str]:
    lower = name.lower()
    return next((e for e in ENDINGS if lower.endswith(e)), None)


def _case_id(name: str, strip_channel: bool) -> str:
    ending = _ending(name)
    stem = name[: -len(ending)] if ending else name
    match = _CHANNEL.match(stem) if strip_channel else None
    return match["case"] if match else stem


def _detect_ending(root: Path, split: str) -> str:
    """The most common ending among images<split>/ and labels<split>/ (ties: the order of ENDINGS)."""
    counts = Counter(e for folder in (f"images{split}", f"labels{split}") for _, _, e in _volume_files(root / folder))
    if not counts:
        return ".nii.gz"
    return max(ENDINGS, key=lambda e: (counts[e], -ENDINGS.index(e)))
