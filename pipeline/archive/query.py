"""QIDO-RS: which studies and series of an archive a run segments.

``--query "Modality=CT&StudyDate=20240101-20241231"`` is split by level: series attributes
(:data:`SERIES_KEYS`: Modality, SeriesDescription, ...) filter the series of each study, the others
(StudyDate, PatientID, AccessionNumber, ...) filter the studies; ``Modality`` also asks the study search
for ``ModalitiesInStudy``. ``--study UID`` (any number) restricts the run to those studies. Series that
hold no images (SEG, RTSTRUCT, SR, ...: our own pushed results among them) are set aside without being
retrieved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence
from urllib.parse import parse_qsl

from pipeline.errors import InputError

log = logging.getLogger(__name__)

SERIES_KEYS = ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "BodyPartExamined",
               "ProtocolName", "SeriesDate", "PerformedProcedureStepStartDate")
NOT_IMAGES = ("SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "OT_REPORT")
PATIENT_FIELDS = ("PatientName", "PatientID", "AccessionNumber")
QIDO_PAGE = 500  # answers per search request
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$|^[0-9A-Fa-f]{8}$")


@dataclass(frozen=True)
class RemoteSeries:
    """A series the archive holds (from QIDO-RS): what the run needs to retrieve and name it."""

    study_uid: str
    series_uid: str
    modality: str = ""
    series_number: Optional[int] = None
    instances: Optional[int] = None

    @property
    def name(self) -> str:
        """The series' folder in the cache and its case id: modality + a hash of the SeriesInstanceUID
        (stable across runs, names no UID and no patient)."""
        digest = hashlib.sha256(self.series_uid.encode()).hexdigest()[:12]
        return f"{(self.modality or 'series').lower()}-{digest}"

    @property
    def is_image(self) -> bool:
        return self.modality.upper() not in NOT_IMAGES

    @property
    def uid(self) -> str:
        """The UID its state entry is kept under (:mod:`~pipeline.archive.state`)."""
        return self.series_uid


@dataclass(frozen=True)
class RemoteStudy:
    """The image series of one study, retrieved together for a multi-channel model (``input.channels``
    picks each channel's series in it, as in a local study folder)."""

    study_uid: str
    series: tuple[RemoteSeries, ...]

    @property
    def name(self) -> str:
        """The study's folder in the cache (and its case id): ``study-`` + a hash of the StudyInstanceUID."""
        return f"study-{hashlib.sha256(self.study_uid.encode()).hexdigest()[:12]}"

    @property
    def uid(self) -> str:
        return self.study_uid

    @property
    def identity(self) -> str:
        """What the resume key is made of: the study and every image series of it the search found."""
        return "study:" + self.study_uid + ":" + ",".join(sorted(s.series_uid for s in self.series))


def group_studies(series: Sequence[RemoteSeries]) -> list[RemoteStudy]:
    """Image series grouped by study (sorted by the study's name; series in each by name)."""
    by_study: dict[str, list[RemoteSeries]] = {}
    for item in series:
        by_study.setdefault(item.study_uid, []).append(item)
    studies = [RemoteStudy(uid, tuple(sorted(members, key=lambda s: s.name))) for uid, members in by_study.items()]
    return sorted(studies, key=lambda s: s.name)


@dataclass
class Found:
    """What the search found: the series (sorted by name), the studies, and the patient values seen
    (so that logs and messages can redact them, :mod:`pipeline.io.privacy`)."""

    series: list[RemoteSeries]
    studies: list[str]
    patient_values: set[str] = field(default_factory=set, repr=False)


def parse_query(text: Optional[str]) -> tuple[dict, dict]:
    """``"Modality=CT&StudyDate=2024..."`` -> (study filters, series filters)."""
    study, series = {}, {}
    if not text:
        return study, series
    pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    if not pairs:
        raise InputError(f"--query {text!r} holds no KEY=VALUE pair: expected e.g. \"Modality=CT&StudyDate=20240101-\"")
    for key, value in pairs:
        if not _KEYWORD.match(key):
            raise InputError(f"--query key {key!r} is not a DICOM attribute keyword: expected e.g. Modality, "
                             "StudyDate, PatientID (or an 8-digit hex tag)")
        (series if key in SERIES_KEYS else study)[key] = value
    if "Modality" in series:
        study.setdefault("ModalitiesInStudy", series["Modality"])
    return study, series


def find_series(client, query: Optional[str] = None, studies: Sequence[str] = ()) -> Found:
    """QIDO-RS: the studies matching ``query`` (restricted to ``studies`` when given), then their series."""
    from pydicom import Dataset

    study_filters, series_filters = parse_query(query)
    searches = [dict(study_filters, StudyInstanceUID=uid) for uid in studies] or [study_filters]
    study_uids: list[str] = []
    values: set[str] = set()
    for filters in searches:
        for item in search_all(client.search_for_studies, search_filters=filters, fields=list(PATIENT_FIELDS)):
            ds = Dataset.from_json(item)
            uid = str(ds.get("StudyInstanceUID", ""))
            if uid and uid not in study_uids:
                study_uids.append(uid)
            values.update(str(ds.get(k)) for k in PATIENT_FIELDS if ds.get(k))
    found: list[RemoteSeries] = []
    for uid in study_uids:
        for item in search_all(client.search_for_series, study_instance_uid=uid, search_filters=series_filters,
                               fields=["NumberOfSeriesRelatedInstances"]):
            ds = Dataset.from_json(item)
            found.append(RemoteSeries(
                study_uid=uid, series_uid=str(ds.get("SeriesInstanceUID", "")), modality=str(ds.get("Modality", "")),
                series_number=_int(ds.get("SeriesNumber")), instances=_int(ds.get("NumberOfSeriesRelatedInstances"))))
    log.info("the archive's search found %d study(ies), %d series", len(study_uids), len(found))
    return Found(sorted(found, key=lambda s: s.name), study_uids, values)


def search_all(search, page: int = QIDO_PAGE, **kwargs) -> list[dict]:
    """Every answer of a QIDO-RS search, ``page`` at a time (``limit``/``offset``). Stops at a short page,
    or at a page with nothing new: an archive that ignores ``offset`` (Orthanc 1.10's plugin does) would
    otherwise be asked for ever (dicomweb-client's own ``get_remaining`` loops there)."""
    answers: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        items = search(limit=page, offset=offset, **kwargs)
        new = []
        for item in items:
            key = json.dumps(item, sort_keys=True)
            if key not in seen:
                seen.add(key)
                new.append(item)
        answers += new
        if len(items) < page or not new:
            return answers
        offset += len(items)


def _int(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
