"""Grouping frame records into volumes: one :class:`DicomVolume` per 3D image to segment.

A SeriesInstanceUID is only the start. One series can hold a three-plane localizer (several
orientations), several echoes, magnitude and phase (ImageType), several time points (every position
repeated the same number of times) or plain duplicates. :func:`group_volumes` splits a series on
each of these, in that order, and names the parts with suffixes (``_ax``/``_cor``/``_sag``, ``_e2``,
``_p``, ``_t3``). Inconsistencies that cannot be split away (some positions repeated, others not) are
recorded on the volume as :attr:`DicomVolume.duplicates` and judged when the volume is stacked, so one
bad series never stops a scan of the folder.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.io.dicom_scan import Frame, SeriesInfo

log = logging.getLogger(__name__)

ORIENTATION_TOL = 1e-3  # direction cosines
SPACING_TOL = 1e-3  # mm, pixel spacing
POSITION_TOL = 0.01  # mm: two frames closer than this along and across the normal share a position


@dataclass
class DicomVolume:
    """The frames of one 3D volume, sorted along the slice normal (positions ascending)."""

    frames: list[Frame]
    series: SeriesInfo
    suffix: str = ""  # what split it from the rest of its series, for the case id
    duplicates: list[list[Frame]] = field(default_factory=list)  # frames sharing a position (inconsistent)
    policy: object = None  # the StackPolicy discovery chose (from input.*); None: refuse inconsistencies
    case_id: str = ""  # set by discovery
    # What reading it had to assume (input.on_missing_spacing=assume), one sentence each; set when stacked.
    assumptions: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        """The files holding this volume's frames, in stacking order, each once."""
        return list(dict.fromkeys(f.path for f in self.frames + [f for dup in self.duplicates for f in dup]))

    @property
    def kind(self) -> str:
        first = self.frames[0]
        if first.mosaic:
            return "mosaic"
        return "multiframe" if first.frame is not None else "classic"

    @property
    def echo(self) -> str:
        return self.frames[0].echo

    @property
    def image_type(self) -> str:
        return "\\".join(self.frames[0].image_type)

    @property
    def n_slices(self) -> int:
        """Slices of the volume: frames, or the tiles of a Siemens mosaic (1 when its header does not say)."""
        if self.kind == "mosaic":
            return max(1, self.frames[0].mosaic_slices)
        return len(self.frames)

    @property
    def folder(self) -> str:
        parents = [Path(p).parent for p in self.files]
        common = parents[0]
        for parent in parents[1:]:
            while common not in parent.parents and common != parent:
                common = common.parent
        return str(common)

    def describe(self) -> str:
        case = f"case {self.case_id}: " if self.case_id else ""
        return f"{case}{self.series.modality or 'DICOM'} series {self.series.series_number} " \
               f"'{self.series.series_description}' ({len(self.files)} files in '{self.folder}')"

    def __repr__(self) -> str:  # MONAI puts reader inputs into metadata; keep it short
        return f"DicomVolume({self.describe()})"

    def __str__(self) -> str:
        return self.folder


def group_volumes(frames: list[Frame]) -> list[DicomVolume]:
    """Split frame records into volumes (see the module docstring). Order: by series number, UID."""
    by_series: dict[tuple, list[Frame]] = {}
    for frame in frames:
        # SeriesNumber too: edited or anonymised copies of a series sometimes keep its UID.
        key = (frame.series.series_uid or f"no-uid:{Path(frame.path).parent}", frame.series.series_number)
        by_series.setdefault(key, []).append(frame)
    volumes: list[DicomVolume] = []
    for _, members in sorted(by_series.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        volumes.extend(_split_series(_unique_instances(members)))
    return volumes


def _unique_instances(frames: list[Frame]) -> list[Frame]:
    """The same instance (SOPInstanceUID, frame and position) found twice, e.g. a copied file, counts once."""
    seen: dict[tuple, Frame] = {}
    for frame in sorted(frames, key=lambda f: f.path):
        key = (frame.sop_uid, frame.frame, frame.position) if frame.sop_uid else (frame.path, frame.frame)
        if key in seen:
            log.info("%s duplicates instance %s already read from %s; using it once", frame.path, frame.sop_uid,
                     seen[key].path)
            continue
        seen[key] = frame
    return list(seen.values())


def _split_series(frames: list[Frame]) -> list[DicomVolume]:
    series = frames[0].series
    mosaics = [f for f in frames if f.mosaic]
    volumes = []
    if mosaics:  # each mosaic file is a whole volume (one time point of an fMRI/DWI series)
        mosaics.sort(key=lambda f: f.order)
        for t, frame in enumerate(mosaics, 1):
            volumes.append(DicomVolume([frame], series, f"_t{t}" if len(mosaics) > 1 else ""))
        frames = [f for f in frames if not f.mosaic]
        if not frames:
            return volumes
    parts = [("", frames)]
    parts = _split_by(parts, lambda f: _cluster_key(f.orientation, ORIENTATION_TOL), _plane_suffix)
    parts = _split_by(parts, lambda f: (f.rows, f.columns, *_cluster_key(f.pixel_spacing, SPACING_TOL)),
                      lambda values: [f"_g{i + 1}" for i in range(len(values))])
    parts = _split_by(parts, lambda f: f.echo, lambda values: [f"_e{v or i + 1}" for i, v in enumerate(values)])
    parts = _split_by(parts, lambda f: f.image_type, _image_type_suffixes)
    for suffix, members in parts:
        volumes.extend(_split_positions(members, series, suffix))
    return volumes


def _split_by(parts, key_fn, suffix_fn):
    """Split each part on ``key_fn``; parts that split get suffixes from ``suffix_fn(sorted keys)``."""
    result = []
    for suffix, members in parts:
        groups: dict = {}
        for frame in members:
            groups.setdefault(key_fn(frame), []).append(frame)
        if len(groups) == 1:
            result.append((suffix, members))
            continue
        keys = sorted(groups, key=lambda k: (-len(groups[k]), str(k)))
        for key, extra in zip(keys, suffix_fn(keys)):
            result.append((suffix + extra, groups[key]))
    return result


def _cluster_key(values, tol: float) -> tuple:
    return tuple(round(float(v) / tol) * tol for v in values)


def _plane_suffix(orientations: list[tuple]) -> list[str]:
    names = []
    for orientation in orientations:
        row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:6])
        normal = np.abs(np.cross(row, col))
        names.append(["_sag", "_cor", "_ax"][int(np.argmax(normal))])
    counts = Counter(names)
    seen: Counter = Counter()
    result = []
    for name in names:
        seen[name] += 1
        result.append(name if counts[name] == 1 else f"{name}{seen[name]}")
    return result


def _image_type_suffixes(types: list[tuple]) -> list[str]:
    """Name image-type splits by the values that differ: ('ORIGINAL','PRIMARY','M') vs (...,'P') → _m, _p."""
    width = max(len(t) for t in types)
    padded = [tuple(t) + ("",) * (width - len(t)) for t in types]
    differing = [i for i in range(width) if len({t[i] for t in padded}) > 1]
    names = ["_" + "_".join(t[i] for i in differing if t[i]).lower() or "_other" for t in padded]
    if len(set(names)) < len(names):
        names = [f"{n}{i + 1}" for i, n in enumerate(names)]
    return names


def _split_positions(frames: list[Frame], series: SeriesInfo, suffix: str) -> list[DicomVolume]:
    """Sort along the normal; every position repeated T times → T volumes; uneven repeats → duplicates."""
    normal = frames[0].normal
    positions = np.array([f.position for f in frames])
    along = positions @ normal
    order = np.lexsort((np.arange(len(frames)), along))
    slots: list[list[Frame]] = []
    slot_pos: list[np.ndarray] = []
    for index in order:
        frame, pos = frames[index], positions[index]
        if slots and np.linalg.norm(pos - slot_pos[-1]) <= POSITION_TOL:
            slots[-1].append(frame)
        else:
            slots.append([frame])
            slot_pos.append(pos)
    for slot in slots:
        slot.sort(key=lambda f: f.order)
    counts = {len(slot) for slot in slots}
    if counts == {1}:
        return [DicomVolume([slot[0] for slot in slots], series, suffix)]
    if len(counts) == 1:  # every position T times: T time points (or repeats), in acquisition order
        repeats = counts.pop()
        return [DicomVolume([slot[t] for slot in slots], series, f"{suffix}_t{t + 1}") for t in range(repeats)]
    duplicates = [slot for slot in slots if len(slot) > 1]
    return [DicomVolume([slot[0] for slot in slots], series, suffix, duplicates=duplicates)]
