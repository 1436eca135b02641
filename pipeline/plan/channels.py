"""``input.channels`` rules for ``plans.yaml``, derived from the dataset's channel names.

A model of several channels segments a DICOM study only with one ``input.channels`` rule per channel
(:class:`~pipeline.config.ChannelRule`: shell patterns on SeriesDescription / SequenceName, and whether a
contrast agent is recorded), which :func:`pipeline.io.channel_cases.group_studies` matches to the study's
series. The dataset's channel names (dataset.json ``channel_names`` or ``modality``) say which sequence each
channel is, not how the series are described in the studies it will meet, so the rules are a starting
point: each is written with a comment saying what it was derived from, and must be checked.

A name not recognised gets a placeholder rule whose description pattern no series carries, so that
``segment`` of a DICOM study fails naming the channel and that pattern (telling the user to set the rule)
instead of guessing a series. NIfTI inputs do not use the rules.
"""

from __future__ import annotations

import re
from typing import Sequence

# (name matching the normalised channel name (lower case, letters and digits only), the rule, the note).
# Tried in order: FLAIR before T1 / T2 (T2-FLAIR), contrast-enhanced T1 before plain T1.
SEQUENCES: tuple[tuple[str, dict, str], ...] = (
    (r".*flair.*", {"series_description": "*FLAIR*"}, "FLAIR"),
    (r"t1w?(c|ce|gd|gad|contrast|post|postcontrast|postgd|km|enhanced|gdenhanced)",
     {"series_description": "*T1*", "contrast": True}, "contrast-enhanced T1 (a T1 series with a contrast agent)"),
    (r"t1w?|t1weighted|t1(native|pre|precontrast)|t1mprage|mprage",
     {"series_description": "*T1*", "contrast": False}, "T1 without contrast agent"),
    (r"t2w?|t2weighted|t2tse", {"series_description": "*T2*"},
     "T2 (the pattern also matches a 'T2 FLAIR' description: narrow it where studies hold one)"),
    (r"dwi|diffusion|trace|tracew|b\d+", {"series_description": "*DWI*"},
     "diffusion-weighted (Siemens describes it ep2d_diff..._TRACEW: use *TRACEW* there)"),
    (r"adc|adcmap", {"series_description": "*ADC*"}, "ADC map"),
    (r"ct|ctnative|ctplain|noncontrastct", {"series_description": "*CT*"},
     "CT (CT descriptions vary, e.g. 'Body 3.0 B30f': check)"),
    (r"pet|pt|petct|fdg|fdgpet|suv", {"series_description": "*PET*"},
     "PET (often described 'PET AC' or by the tracer: check)"),
)
PLACEHOLDER = "no rule derived for channel {name} - set input.channels in plans.yaml"


def channel_rules(channel_names: Sequence[str]) -> tuple[list[dict], list[str], str]:
    """One ``input.channels`` rule per channel (``{name, series_description, contrast?}``), the comment of
    each, and the reason for the list. Empty for a one-channel dataset (each DICOM series is a case)."""
    names = list(channel_names)
    if len(names) <= 1:
        return [], [], ""
    rules, notes, unknown = [], [], []
    for name in names:
        rule, note = channel_rule(name)
        rules.append(rule)
        notes.append(note)
        if note.startswith("PLACEHOLDER"):
            unknown.append(name)
    reason = ("derived from the dataset's channel names, not from any DICOM study: check each pattern against "
              "your studies' series descriptions before segmenting DICOM studies (a study where a rule matches "
              "no series, or several, fails naming the channel)")
    if unknown:
        reason += f"; no rule could be derived for {', '.join(unknown)}: set it"
    return rules, notes, reason


def channel_rule(name: str) -> tuple[dict, str]:
    """The rule for one channel name and its comment (a placeholder where the name is not recognised)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for pattern, fields, what in SEQUENCES:
        if re.fullmatch(pattern, key):
            return {"name": name, **fields}, f"{what}: derived from the channel name {name!r}, check it"
    readable = re.sub(r"[^A-Za-z0-9 _.-]", "_", name)
    return ({"name": name, "series_description": PLACEHOLDER.format(name=readable)},
            f"PLACEHOLDER: {name!r} is not a sequence we recognise; no series matches this rule, so segmenting a "
            "DICOM study fails here until you give the channel's series_description (shell pattern), "
            "sequence_name or contrast")
