"""WADO-RS retrieval into a cache folder, series by series, in a background thread, with bounded disk.

:class:`SeriesFetcher` retrieves the series it is given one after another into ``cache/<name>/`` (each
file written under a temporary folder that is renamed when the series is complete), while the batch run
segments the ones already there. At most ``max_series`` series are on disk at once: the fetcher waits
for a slot, and :meth:`SeriesFetcher.release` (called when a series' cases are written) deletes the
folder and frees its slot. A series that cannot be retrieved (404: deleted after the search; a timeout;
a refused connection) comes out as a :class:`Fetched` with its ``error``; the others go on.
For a multi-channel model the units are studies (:class:`~pipeline.archive.query.RemoteStudy`): all the
study's image series into ``cache/<study name>/<series name>/``, ``max_series`` then counts studies.
Instances are asked for in the transfer syntax they are stored in (no transcoding by the archive).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from pipeline.archive.query import RemoteSeries, RemoteStudy
from pipeline.errors import describe_error

log = logging.getLogger(__name__)

DEFAULT_MAX_SERIES = 3
_END = object()


@dataclass
class Fetched:
    """One series out of the fetcher: its folder (None when it failed) or ``error``, and how long it took."""

    series: RemoteSeries
    folder: Optional[Path] = None
    error: str = ""
    instances: int = 0
    seconds: float = 0.0


def retrieve_series(client, series: RemoteSeries, folder: Path) -> int:
    """Every instance of ``series`` as ``folder/NNNNN.dcm``; the number written. ``folder`` appears only
    once complete (a temporary sibling is renamed)."""
    import pydicom

    tmp = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count = 0
    try:
        for count, dataset in enumerate(client.iter_series(series.study_uid, series.series_uid,
                                                           media_types=(("application/dicom", "*"),)), start=1):
            _ensure_file_meta(dataset)
            pydicom.dcmwrite(tmp / f"{count:05d}.dcm", dataset, enforce_file_format=True)
        if count == 0:
            raise LookupError("the archive returned no instance for it")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return count


def describe_retrieve_error(exc: BaseException, timeout_s: Optional[float] = None, attempts: int = 1) -> str:
    """A one-line reason for the manifest: HTTP status (404 says the series is gone), timeout, connection."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 404:
            return "retrieve failed: HTTP 404 Not Found (the series is no longer in the archive; deleted after the search?)"
        return f"retrieve failed: HTTP {status} {exc.response.reason or ''}".rstrip()
    if isinstance(exc, requests.Timeout):
        after = f" within {timeout_s:g} s" if timeout_s else ""
        tries = f", {attempts} attempts" if attempts > 1 else ""
        return f"retrieve failed: the archive did not answer{after} (timeout{tries})"
    if isinstance(exc, requests.ConnectionError):
        return "retrieve failed: cannot connect to the archive (connection refused or reset)"
    return f"retrieve failed: {describe_error(exc)}"


class SeriesFetcher:
    """Retrieves ``series`` in order in a background thread; iterate it for :class:`Fetched` items.

    ``before_retrieve(series)`` is called in the fetcher thread just before each retrieval (a test hook:
    e.g. delete the series from the archive between the search and the retrieval).
    """

    def __init__(self, client, series: Sequence[RemoteSeries], cache: Path, *, max_series: int = DEFAULT_MAX_SERIES,
                 timeout_s: Optional[float] = None, attempts: int = 1,
                 before_retrieve: Optional[Callable[[RemoteSeries], None]] = None):
        self.client, self.series, self.cache = client, list(series), Path(cache)
        self.max_series = max(1, int(max_series))
        self.timeout_s, self.attempts = timeout_s, attempts
        self.before_retrieve = before_retrieve
        self._slots = threading.Semaphore(self.max_series)
        self._out: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.on_disk: set[str] = set()
        self.peak_on_disk = 0
        self.retrieved = 0  # series retrieved by this run

    def start(self) -> SeriesFetcher:
        self.cache.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._work, name="medseg-fetcher", daemon=True)
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[Fetched]:
        if self._thread is None:
            self.start()
        while True:
            item = self._out.get()
            if item is _END:
                return
            yield item

    def release(self, fetched: Fetched) -> None:
        """The series' cases are written (or it failed): delete its folder, free its slot."""
        if fetched.folder is not None:
            shutil.rmtree(fetched.folder, ignore_errors=True)
        with self._lock:
            held = fetched.series.name in self.on_disk
            self.on_disk.discard(fetched.series.name)
        if held:
            self._slots.release()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _work(self) -> None:
        try:
            for series in self.series:
                while not self._slots.acquire(timeout=0.2):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    self._slots.release()
                    return
                with self._lock:
                    self.on_disk.add(series.name)
                    self.peak_on_disk = max(self.peak_on_disk, len(self.on_disk))
                self._out.put(self._fetch(series))
        finally:
            self._out.put(_END)

    def _fetch(self, series: RemoteSeries) -> Fetched:
        start = time.perf_counter()
        folder = self.cache / series.name
        if isinstance(series, RemoteStudy):
            return self._fetch_study(series, folder, start)
        try:
            if self.before_retrieve is not None:
                self.before_retrieve(series)
            count = retrieve_series(self.client, series, folder)
        except Exception as exc:  # one series fails, the run goes on
            reason = describe_retrieve_error(exc, self.timeout_s, self.attempts)
            log.error("series %s: %s", series.name, reason)
            return Fetched(series, error=reason, seconds=time.perf_counter() - start)
        self.retrieved += 1
        seconds = time.perf_counter() - start
        log.info("series %s: retrieved %d instance(s) in %.2f s", series.name, count, seconds)
        return Fetched(series, folder=folder, instances=count, seconds=seconds)


    def _fetch_study(self, study: RemoteStudy, folder: Path, start: float) -> Fetched:
        """Every image series of ``study`` into ``folder/<series name>/``; ``folder`` appears once all are
        there. One series failing fails the study (its reason names the series)."""
        tmp = folder.parent / f".{folder.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        count = 0
        try:
            for series in study.series:
                try:
                    if self.before_retrieve is not None:
                        self.before_retrieve(series)
                    count += retrieve_series(self.client, series, tmp / series.name)
                except Exception as exc:
                    reason = f"series {series.name}: {describe_retrieve_error(exc, self.timeout_s, self.attempts)}"
                    log.error("study %s: %s", study.name, reason)
                    return Fetched(study, error=reason, seconds=time.perf_counter() - start)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.retrieved += 1
        seconds = time.perf_counter() - start
        log.info("study %s: retrieved %d series, %d instance(s) in %.2f s", study.name, len(study.series), count,
                 seconds)
        return Fetched(study, folder=folder, instances=count, seconds=seconds)


def _ensure_file_meta(dataset) -> None:
    """WADO-RS parts carry no file meta of their own in some archives: build it from the dataset."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        meta = dataset.file_meta = FileMetaDataset()
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in dataset:
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in dataset:
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
