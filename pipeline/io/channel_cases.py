"""Multi-channel cases from discovered scans, for a model of N > 1 input channels.

* **Volume files** (nnU-Net naming): ``<case>_0000.nii.gz`` … ``<case>_000{N-1}.nii.gz`` in one folder
  are one case, in channel order (any ending the readers take; the channels need not share one). A file
  without a channel suffix is one case read as a 4D NIfTI (MSD: the channels on its 4th axis). A case
  lacking a channel, or holding more channels than the model takes, still becomes a case: reading it
  fails with an error naming the channel, so it fails alone in a batch.
* **DICOM studies** (``input.channels``): the volumes of one study (StudyInstanceUID) are matched to the
  channel rules; the volume that matches a rule is that channel. A study where a channel matches no
  volume, or several, is a case that fails, naming the channel and what matched. Volumes that match no
  rule are not segmented (listed as skipped). Channel 0's series is the case's series: the mask is
  written on its grid and the DICOM SEG references it.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from pipeline.config.schema import ChannelRule
from pipeline.io.channels import Channels

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def group_channel_files(cases: list, channels: Sequence[str], strip_ending, case_id) -> list:
    """``cases`` (one per volume file) regrouped into one case per ``<case>_XXXX`` set (see module doc).

    ``strip_ending(name)``: a file name without its volume ending; ``case_id(folder, name)``: discovery's
    id for a case named ``name`` in ``folder``. DICOM cases pass unchanged.
    """
    groups: dict[tuple[str, str], dict[int, object]] = defaultdict(dict)
    out = []
    for case in cases:
        if case.kind == "dicom":
            out.append(case)
            continue
        path = Path(case.source)
        match = CHANNEL_SUFFIX.match(strip_ending(path.name))
        if match is None:  # one file: a 4D volume holding every channel
            out.append(case)
            continue
        groups[(str(path.parent), match["case"])][int(match["channel"])] = case
    for (folder, name), members in sorted(groups.items()):
        case = _channel_case(folder, name, members, channels, strip_ending)
        case.case_id = case_id(Path(folder), name)
        out.append(case)
    return out


def _channel_case(folder: str, name: str, members: dict, channels: Sequence[str], strip_ending):
    first = members[min(members)]
    ending = Path(first.source).name[len(strip_ending(Path(first.source).name)):]
    missing = [f"channel {index} ({channel}): expected {Path(folder) / f'{name}_{index:04d}{ending}'}"
               for index, channel in enumerate(channels) if index not in members]
    extra = sorted(i for i in members if i >= len(channels))
    if extra:
        missing.append(f"no channel {', '.join(f'{i:04d}' for i in extra)}: the model takes {len(channels)} "
                       f"channel(s) ({', '.join(channels)}), found files for channel(s) {sorted(members)}")
    case = members.get(0, first)
    case.channels = Channels(sources=tuple(members[i].source for i in range(len(channels)) if i in members),
                             names=tuple(channels), missing=tuple(missing))
    case.channel_files = [members[i].source for i in sorted(members)]
    return case


# --- DICOM studies --------------------------------------------------------------------------------


def rule_matches(rule: ChannelRule, series) -> bool:
    """Whether a series (:class:`~pipeline.io.dicom_scan.SeriesInfo`) is the channel ``rule`` describes."""
    if rule.series_description and not fnmatch.fnmatch(series.series_description.lower(),
                                                        rule.series_description.lower()):
        return False
    if rule.sequence_name and not fnmatch.fnmatch(series.sequence_name.lower(), rule.sequence_name.lower()):
        return False
    if rule.contrast is not None and bool(series.contrast_agent) != rule.contrast:
        return False
    return True


def group_studies(dicom_cases: list, rules: Sequence[ChannelRule], study_id) -> tuple[list, list]:
    """DICOM cases (one per volume) into one case per study (see module doc).

    ``study_id(cases)``: discovery's id for a study made of these cases (their common folder). Returns
    (the study cases, [(case, reason)] of the volumes no rule took).
    """
    by_study: dict[str, list] = defaultdict(list)
    for case in dicom_cases:
        by_study[case.volume.series.study_uid or case.series_uid].append(case)
    studies, unused = [], []
    names = tuple(rule.name for rule in rules)
    for members in by_study.values():
        chosen, missing = [], []
        for index, rule in enumerate(rules):
            matched = [c for c in members if rule_matches(rule, c.volume.series)]
            if len(matched) == 1:
                chosen.append(matched[0])
                continue
            found = "no series" if not matched else f"{len(matched)} series (" + "; ".join(
                f"'{c.series_description}' #{c.series_number}" for c in matched) + ")"
            missing.append(f"channel {index} ({rule.name}): {found} of the study match input.channels[{index}] "
                           f"{_describe(rule)}; the study's series: "
                           + ", ".join(sorted({repr(c.series_description) for c in members})))
            chosen.append(None)
        found = [c for c in chosen if c is not None]
        reference = chosen[0] or (found[0] if found else members[0])
        taken = {id(c) for c in found} | {id(reference)}
        unused += [(c, "not a channel of input.channels in its study (description "
                       f"'{c.series_description}')") for c in members if id(c) not in taken]
        reference.channels = Channels(sources=tuple(c.volume for c in found), names=names, missing=tuple(missing))
        reference.channel_series_uids = [c.series_uid if c is not None else "" for c in chosen]
        reference.channel_files = [f for c in found for f in c.files]
        reference.case_id = study_id(members)
        studies.append(reference)
    return studies, unused


def _describe(rule: ChannelRule) -> str:
    parts = []
    if rule.series_description:
        parts.append(f"series_description '{rule.series_description}'")
    if rule.sequence_name:
        parts.append(f"sequence_name '{rule.sequence_name}'")
    if rule.contrast is not None:
        parts.append(f"contrast {str(rule.contrast).lower()}")
    return "(" + ", ".join(parts) + ")"
