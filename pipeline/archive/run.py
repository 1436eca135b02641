"""``segment_archive``: the series a DICOMweb archive holds, segmented like a folder, and the SEGs stored back.

The run reads as its steps: search (QIDO-RS, :mod:`~pipeline.archive.query`) → what is already done
(:mod:`~pipeline.archive.state`: same SeriesInstanceUID and model fingerprint, outputs on disk: not
retrieved again) → retrieve the rest into a cache folder in a background thread, at most ``max_series``
on disk (:mod:`~pipeline.archive.fetch`) → each retrieved series folder goes through the same
discovery, selection (``input.*``), geometry and batch run as any folder (:func:`pipeline.io.discover.discover`,
:class:`pipeline.batch.run.BatchRun`, fed case by case as series arrive, so retrieval overlaps
inference) → its cache folder is deleted once its cases are written → with ``push``, its SEG
(and RTSTRUCT) not yet stored goes back with STOW-RS at once, in a background worker
(:class:`~pipeline.archive.push.Pusher`), so an interrupted run has stored what it wrote.

A multi-channel model (``input.channels`` rules) works on whole studies instead of series: all the
image series of a study in one cache folder, grouped by discovery as a local study folder is; the state
is kept per StudyInstanceUID.

Case ids are ``<modality>-<12 hex of sha256(SeriesInstanceUID)>`` (``study-<12 hex of
sha256(StudyInstanceUID)>`` for studies; stable, no UID, no patient identity). Failures are per series
or study (retrieval: 404, timeout, connection; a missing channel; store: refused), in the manifest with
their reason; the run goes on.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from pipeline.archive.client import ClientOptions, RequestCounter, make_client
from pipeline.archive.credentials import Credentials, load_credentials
from pipeline.archive.fetch import DEFAULT_MAX_SERIES, Fetched, SeriesFetcher
from pipeline.archive.push import Pusher
from pipeline.archive.query import Found, RemoteSeries, RemoteStudy, find_series, group_studies
from pipeline.archive.state import STATE_NAME, ArchiveState, series_key
from pipeline.archive.url import parse_archive_url
from pipeline.batch.plan import plan_run, result_from_sidecar
from pipeline.batch.report.lock import OutputLock
from pipeline.batch.report.outputs import CaseOutputs, RunFiles, prepare_output_dir
from pipeline.batch.report.sidecar import read_sidecar
from pipeline.batch.result import CaseResult, now
from pipeline.batch.run import BatchRun
from pipeline.batch.runlog import log_to, run_log
from pipeline.batch.write_case import dicom_seg_writer
from pipeline.config.schema import InputConfig
from pipeline.errors import InputError
from pipeline.infer.segmenter import Segmenter
from pipeline.io.discover import Case, discover
from pipeline.io.privacy import Redactor, held_logs, redacted_logging
from pipeline.progress import bars_enabled

log = logging.getLogger(__name__)

__all__ = ["ArchiveOptions", "ArchiveRun", "segment_archive"]

CACHE_FOLDER = ".cache/dicomweb"  # under the output folder, unless ArchiveOptions.cache_dir


@dataclass
class ArchiveOptions:
    """What to take from the archive and how: ``query`` (``"Modality=CT&StudyDate=..."``), ``studies``
    (StudyInstanceUIDs), ``push`` (store the SEG/RTSTRUCT back; implies writing the SEG), ``credentials``
    (default: :func:`~pipeline.archive.credentials.load_credentials` of ``credentials_file`` or the
    environment), ``client`` (TLS, timeout), ``max_series`` on disk at once, ``cache_dir``, and
    ``before_retrieve`` (a test hook, called in the fetcher thread before each series is retrieved)."""

    query: Optional[str] = None
    studies: Sequence[str] = ()
    push: bool = False
    credentials: Optional[Credentials] = field(default=None, repr=False)
    credentials_file: Optional[Union[str, Path]] = None
    client: ClientOptions = field(default_factory=ClientOptions)
    max_series: int = DEFAULT_MAX_SERIES
    cache_dir: Optional[Union[str, Path]] = None
    before_retrieve: Optional[Callable[[RemoteSeries], None]] = None


@dataclass
class ArchiveRun:
    """The results (one per case, manifest order) and what the run asked of the archive."""

    results: list[CaseResult]
    studies: int = 0
    series: int = 0
    retrieved: int = 0  # series (studies, for a multi-channel model) retrieved by this run
    kept: int = 0  # series (studies) done by an earlier run: not retrieved
    stored: int = 0  # files stored by this run (STOW-RS)
    push_failed: int = 0  # cases with a push_error
    requests: dict = field(default_factory=dict)  # by HTTP method
    peak_series_on_disk: int = 0

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("studies", "series", "retrieved", "kept", "stored", "push_failed",
                                              "requests", "peak_series_on_disk")}


def segment_archive(
    url: str,
    output_dir: Union[str, Path],
    model: Union[str, Path, Sequence[Union[str, Path]], Segmenter],
    *,
    archive: Optional[ArchiveOptions] = None,
    device: str = "auto",
    backend: Optional[str] = None,
    overwrite: bool = False,
    dicom_seg: bool = False,
    qc: bool = True,
    progress: bool = False,
    background: bool = True,
    select: Optional[InputConfig] = None,
    on_case: Optional[Callable[[CaseResult], None]] = None,
    isolate_reading: bool = True,
    tta: Optional[str] = None,
    rtstruct: bool = False,
) -> ArchiveRun:
    """Segment the series of the DICOMweb archive at ``url`` (``dicomweb+http(s)://HOST:PORT/PATH``)
    into ``output_dir``, as :func:`pipeline.batch.segment_folder` does a folder (same outputs, manifest,
    resume, exit codes). Errors before any work (bad address or credentials, archive unreachable, bad
    model, output folder locked) raise :class:`~pipeline.errors.MedsegError`."""
    options = archive or ArchiveOptions()
    address = parse_archive_url(url)
    credentials = options.credentials or load_credentials(options.credentials_file)
    dicom_seg = dicom_seg or options.push
    segmenter = model if isinstance(model, Segmenter) else Segmenter.from_checkpoints(model, device=device,
                                                                                      backend=backend, tta=tta)
    select = select or segmenter.config.input
    if segmenter.config.in_channels > 1 and not select.channels:
        raise InputError(f"the model reads {segmenter.config.in_channels} channels, but the config has no "
                         "input.channels rules saying which series of a study is which channel: add them "
                         "(e.g. input.channels=[{name: FLAIR, series_description: '*FLAIR*'}, ...])")
    if dicom_seg:
        dicom_seg_writer()  # fail now, not on every case
    counter = RequestCounter()
    client = make_client(address, credentials, options.client, counter)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO lines name every UID
    with held_logs() as held:
        found = _search(client, address.public, options)
    out = prepare_output_dir(output_dir)
    cache = Path(options.cache_dir) if options.cache_dir else out / CACHE_FOLDER
    redact = Redactor(cache, found.patient_values)
    with redacted_logging(redact):
        held.replay()
        files = RunFiles(out)
        bars = bars_enabled(progress)
        with OutputLock(files.lock, conflicts=files.conflicting_locks()), \
                log_to(files.log, redact, echo=progress and not bars):
            run = BatchRun(segmenter, files, model=model, input_dir=cache, overwrite=overwrite, select=select,
                           dicom_seg=dicom_seg, qc=qc, progress=bars, on_case=None, redact=redact,
                           rtstruct=rtstruct)
            run.manifest.meta["input_dir"] = address.public
            job = _ArchiveJob(run, found, ArchiveState(out / STATE_NAME, address.public), client, cache, options,
                              redact, select, dicom_seg, qc, on_case)
            outcome = job.execute(background, isolate_reading)
            outcome.requests = dict(counter.counts)
            run.manifest.meta["archive"] = {"url": address.public, "query": options.query,
                                            "studies_asked": list(options.studies), **outcome.summary()}
            run.save_reports()
            run_log.info("archive: %d study(ies), %d series; %d retrieved, %d kept from an earlier run; %d file(s) "
                         "stored; requests %s", outcome.studies, outcome.series, outcome.retrieved, outcome.kept,
                         outcome.stored, outcome.requests)
    return outcome


def _search(client, public_url: str, options: ArchiveOptions) -> Found:
    import requests

    try:
        return find_series(client, options.query, options.studies)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = (" : check the credentials (MEDSEG_DICOMWEB_USER/MEDSEG_DICOMWEB_PASSWORD, MEDSEG_DICOMWEB_TOKEN or "
                "--credentials FILE)") if status in (401, 403) else ""
        raise InputError(f"the archive at {public_url} refused the search (HTTP {status}){hint}") from None
    except requests.exceptions.SSLError:
        raise InputError(f"TLS verification of {public_url} failed: pass the hospital CA as --ca-bundle FILE "
                         "(or, knowingly, --insecure)") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise InputError(f"cannot reach the archive at {public_url} ({type(exc).__name__}): check the address "
                         "and that the server is running") from None


class _ArchiveJob:
    """One run's plan over the archive's series: kept | retrieved → batch run → pushed."""

    def __init__(self, run: BatchRun, found: Found, state: ArchiveState, client, cache: Path,
                 options: ArchiveOptions, redact: Redactor, select: InputConfig, dicom_seg: bool, qc: bool,
                 on_case):
        self.run, self.found, self.state, self.client, self.cache = run, found, state, client, cache
        self.options, self.redact, self.select, self.dicom_seg, self.qc = options, redact, select, dicom_seg, qc
        self.user_on_case = on_case
        self.images = [s for s in found.series if s.is_image]
        # the units retrieved and resumed: series, or whole studies for a multi-channel model
        self.units: list = group_studies(self.images) if select.channels else list(self.images)
        self.keys = {u.uid: series_key(u.identity if isinstance(u, RemoteStudy) else u.series_uid, run.model_id,
                                       run.config) for u in self.units}
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Fetched, set, list]] = {}  # case id -> (unit, its open cases, skipped)
        self._series_cases: dict[str, list[CaseResult]] = {}
        self.fetcher: Optional[SeriesFetcher] = None
        self.pusher: Optional[Pusher] = None

    def execute(self, background: bool, isolate_reading: bool) -> ArchiveRun:
        start = time.perf_counter()
        shutil.rmtree(self.cache, ignore_errors=True)  # what a killed run left
        for series in self.found.series:
            if not series.is_image:
                self.run.record(CaseResult(series.name, self._source(series), "skipped", series_uid=series.series_uid,
                                           error=f"modality {series.modality}: not an image series (not retrieved)",
                                           finished=now()), save=False)
        if self.options.push:  # each case is stored as soon as it is written (or found done)
            self.pusher = Pusher(self.client, self.state, self.run.out, record=self.run.record,
                                 redact_text=self.redact.text)
        unit = "studies" if self.select.channels else "series"
        try:
            to_fetch = [u for u in self.units if not self._kept(u)]
            kept = len(self.units) - len(to_fetch)
            self.fetcher = SeriesFetcher(self.client, to_fetch, self.cache, max_series=self.options.max_series,
                                         timeout_s=self.options.client.timeout_s,
                                         attempts=self.options.client.attempts,
                                         before_retrieve=self.options.before_retrieve)
            self.run.on_case = self._case_written
            run_log.info("archive run started: %d %s, %d done by an earlier run (not retrieved), %d to retrieve",
                         len(self.units), unit, kept, len(to_fetch))
            try:
                results = self.run.run_todo(self._todo(), len(self.units), kept, start, background=background,
                                            isolate_reading=isolate_reading)
            finally:
                self.fetcher.close()
                shutil.rmtree(self.cache, ignore_errors=True)
        finally:
            if self.pusher is not None:
                self.pusher.close()  # what is queued is stored, an interrupted run's cases included
                self.run.save_reports()
        stored = self.pusher.stored if self.pusher else 0
        push_failed = self.pusher.failed if self.pusher else 0
        return ArchiveRun(results, studies=len(self.found.studies), series=len(self.found.series),
                          retrieved=self.fetcher.retrieved, kept=kept, stored=stored, push_failed=push_failed,
                          peak_series_on_disk=self.fetcher.peak_on_disk)

    # --- resume -----------------------------------------------------------------------------------

    def _kept(self, unit) -> bool:
        """Record the results of a series (or study) an earlier run finished (same key, outputs complete),
        and queue what of them is not yet stored; True if so."""
        if self.run.overwrite:
            return False
        entry = self.state.done(unit.uid, self.keys[unit.uid])
        if entry is None:
            return False
        results = []
        for case_id in entry.get("cases", []):
            result = self._previous(case_id, unit, entry)
            if result is None:
                return False
            results.append(result)
        for item in entry.get("skipped", []):
            results.append(CaseResult(item.get("case_id", ""), item.get("source", ""), "skipped",
                                      error=item.get("reason", ""), finished=now(),
                                      series_uid=item.get("series_uid") or _reference_uid(unit)))
        for result in results:
            self.run.record(result, save=False)
            if self.pusher is not None:
                self.pusher.submit(result, unit.uid)
        run_log.info("%s %s: already done by an earlier run (same model and settings), not retrieved",
                     "study" if isinstance(unit, RemoteStudy) else "series", unit.name)
        return True

    def _previous(self, case_id: str, series, entry: dict) -> Optional[CaseResult]:
        outputs = CaseOutputs(self.run.out, case_id)
        data = read_sidecar(outputs.sidecar)
        if data is None or not outputs.mask.is_file() or (self.qc and not outputs.qc_png.is_file()):
            return None
        if self.dicom_seg and not outputs.dicom_seg.is_file() and not data.get("dicom_seg_error"):
            return None
        if self.run.rtstruct and not outputs.rtstruct.is_file() and not data.get("rtstruct_error"):
            return None
        channels = list((entry.get("channels") or {}).get(case_id) or [])
        case = Case(case_id, str(self.cache / series.name), "dicom", channel_series_uids=channels,
                    series_uid=channels[0] if channels else _reference_uid(series))
        result = result_from_sidecar(data, case, outputs, self._source(series))
        result.resumed = True
        return result

    # --- retrieved series into the batch run ----------------------------------------------------------

    def _todo(self):
        """(case, fingerprint) of each retrieved series as it arrives (runs in the batch's loader thread)."""
        for fetched in self.fetcher:
            series = fetched.series  # a series, or a study (multi-channel model)
            key = self.keys[series.uid]
            if fetched.error:
                self.run.record(CaseResult(series.name, self._source(series), "failed", error=fetched.error,
                                           series_uid=_reference_uid(series), kind="dicom", finished=now()))
                self.state.set_series(series.uid, key=key, name=series.name, status="failed", cases=[])
                self.fetcher.release(fetched)
                continue
            discovery = discover(fetched.folder, self.select)
            studies = [case for case in discovery.cases if case.channels is not None]
            if isinstance(series, RemoteStudy) and len(studies) == 1:  # one id for the study, whatever it holds
                studies[0].case_id = series.name
                if studies[0].volume is not None:
                    studies[0].volume.case_id = series.name
            plan = plan_run(discovery.cases, discovery.skipped, output_dir=self.run.out, model_id=self.run.model_id,
                            config=self.run.config, redact=self.redact, overwrite=True, qc=self.qc,
                            dicom_seg=self.dicom_seg, rtstruct=self.run.rtstruct)
            skipped = []
            for result in plan.kept:  # set aside by the input.* rules: same reasons as for a folder
                result.series_uid = result.series_uid or _reference_uid(series)
                result.case_id = result.case_id or series.name
                self.run.record(result)
                skipped.append({"case_id": result.case_id, "source": result.source, "reason": result.error,
                                "series_uid": result.series_uid})
            if not plan.todo:
                self.state.set_series(series.uid, key=key, name=series.name, status="skipped", cases=[])
                self.state.set_skipped(series.uid, skipped)
                self.fetcher.release(fetched)
                continue
            open_cases = {case.case_id for case, _ in plan.todo}
            with self._lock:
                self._series_cases[series.uid] = []
                for case_id in open_cases:
                    self._pending[case_id] = (fetched, open_cases, skipped)
            yield from plan.todo

    def _case_written(self, result: CaseResult) -> None:
        """Called by the writer thread as each case is finished: when a series' last case is, record the
        series in the state file and delete its cache folder."""
        with self._lock:
            entry = self._pending.pop(result.case_id, None)
            finished = None
            if entry is not None:
                fetched, open_cases, skipped = entry
                open_cases.discard(result.case_id)
                self._series_cases[fetched.series.uid].append(result)
                if not open_cases:
                    finished = fetched, self._series_cases.pop(fetched.series.uid), skipped
        if finished is not None:
            fetched, results, skipped = finished
            series = fetched.series
            done = all(r.status == "done" for r in results)
            self.state.set_series(series.uid, key=self.keys[series.uid], name=series.name,
                                  status="done" if done else "failed", cases=[r.case_id for r in results],
                                  channels={r.case_id: list(r.channel_series_uids) for r in results
                                            if r.channel_series_uids})
            self.state.set_skipped(series.uid, skipped)
            self.fetcher.release(fetched)
            if self.pusher is not None:  # stored now, in the pusher's thread, while the next cases run
                for r in results:
                    self.pusher.submit(r, series.uid)
        if self.user_on_case is not None:
            self.user_on_case(result)

    def _source(self, series: RemoteSeries) -> str:
        """The manifest's ``source`` of a series: as the cache folder's path is written (``dicomweb/<name>``)."""
        return f"{self.redact.root_name}/{series.name}"


def _reference_uid(unit) -> str:
    """The series UID a unit's rows carry: the series' own; none for a study (its cases carry channel 0's)."""
    return unit.series_uid if isinstance(unit, RemoteSeries) else ""
