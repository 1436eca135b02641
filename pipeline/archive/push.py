"""STOW-RS: the DICOM results of a case stored back into the archive.

Every ``<case>_seg.dcm`` and ``<case>_rtstruct.dcm`` (written by ``--rtstruct``, when present) of a
done case is stored, unless the state file records the same bytes (sha256) as already stored: a
re-run pushes nothing twice, and after a partial failure exactly what is missing. A refused store (HTTP
error, a STOW response listing the instance under FailedSOPSequence, or an archive that answers success
but does not hold the instance when asked with QIDO-RS right after) is the case's ``push_error``; the
other cases go on.

:class:`Pusher` does it case by case as the run writes them, in a background thread (STOW-RS overlaps
inference) fed through a bounded queue; closing it stores what is queued (an interrupted run has
stored every case written before the interrupt). The state file records a file as stored only after
the archive holds it, written atomically: a run killed mid-push re-stores at most that one file.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from pipeline.archive.state import ArchiveState, file_sha256
from pipeline.errors import describe_error

log = logging.getLogger(__name__)

PUSHED_SUFFIXES = ("_seg.dcm", "_rtstruct.dcm")


@dataclass
class PushOutcome:
    """One case: ``pushed`` True when every file is in the archive; ``stored``: files stored by this call."""

    pushed: bool
    error: str = ""
    stored: list[str] = field(default_factory=list)


def case_files(output_dir: Path, case_id: str) -> list[Path]:
    """The DICOM results of a case that go back to the archive, in a fixed order."""
    return [p for p in (Path(output_dir) / f"{case_id}{s}" for s in PUSHED_SUFFIXES) if p.is_file()]


def push_case(client, state: ArchiveState, series_uid: str, output_dir: Path, case_id: str) -> PushOutcome:
    files = case_files(output_dir, case_id)
    if not files:
        return PushOutcome(False, "nothing to push: no DICOM SEG or RTSTRUCT was written for the case")
    done = state.pushed(series_uid)
    errors, stored = [], []
    for path in files:
        digest = file_sha256(path)
        if done.get(path.name) == digest:
            continue
        error = store_file(client, path)
        if error:
            errors.append(f"{path.name}: {error}")
            log.error("case %s: storing %s failed: %s", case_id, path.name, error)
            continue
        state.set_pushed(series_uid, path.name, digest)
        stored.append(path.name)
        log.info("case %s: stored %s in the archive", case_id, path.name)
    return PushOutcome(not errors, "; ".join(errors), stored)


def store_file(client, path: Path) -> Optional[str]:
    """STOW-RS of one file; None when stored, else why not (one line)."""
    import pydicom
    import requests

    try:
        dataset = pydicom.dcmread(path)
        response = client.store_instances([dataset], study_instance_uid=str(dataset.StudyInstanceUID))
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        reason = exc.response.reason if exc.response is not None else ""
        return f"store refused: HTTP {status} {reason or ''}".rstrip()
    except requests.Timeout:
        return "store failed: the archive did not answer (timeout)"
    except requests.ConnectionError:
        return "store failed: cannot connect to the archive"
    except Exception as exc:
        return f"store failed: {describe_error(exc)}"
    failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
    if failed:
        reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
        return f"store refused by the archive (FailureReason {', '.join(reasons)})"
    return _check_stored(client, dataset)


def _check_stored(client, dataset) -> Optional[str]:
    """Ask the archive (QIDO-RS) whether it really holds the instance: an archive may answer a STOW with
    success and still drop the instance (Orthanc 1.10's plugin does when a filter refuses it)."""
    try:
        found = client.search_for_instances(study_instance_uid=str(dataset.StudyInstanceUID),
                                            search_filters={"SOPInstanceUID": str(dataset.SOPInstanceUID)})
    except Exception as exc:
        return f"stored, but the check that the archive holds it failed: {describe_error(exc)}"
    if not found:
        return "store refused: the archive answered the STOW-RS request but does not hold the instance"
    return None


DEFAULT_PUSH_QUEUE = 4  # cases written and waiting for their STOW-RS at most (the writer waits beyond)
_STOP = object()


class Pusher:
    """Stores each submitted case's SEG/RTSTRUCT in a background thread, one case after another.

    ``submit(result, state_uid)``: a finished case (``status == "done"``) and the UID its state entry is
    kept under; its ``pushed``/``push_error`` are set and ``record(result)`` is called once stored (or
    refused). ``close()`` waits for what is queued. ``stored``: files stored; ``failed``: cases not pushed.
    """

    def __init__(self, client, state: ArchiveState, output_dir: Path, *, record: Callable, redact_text: Callable,
                 max_queued: int = DEFAULT_PUSH_QUEUE):
        self.client, self.state, self.out = client, state, Path(output_dir)
        self.record, self.redact_text = record, redact_text
        self.stored = self.failed = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_queued)))
        self._thread = threading.Thread(target=self._work, name="medseg-pusher", daemon=True)
        self._thread.start()

    def submit(self, result, state_uid: str) -> None:
        if result.status == "done" and state_uid:
            self._queue.put((result, state_uid))  # blocks while the queue is full: bounded

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            result, state_uid = item
            try:
                self._push(result, state_uid)
            except Exception as exc:  # never lose the worker: the case says why
                result.pushed, result.push_error = False, f"store failed: {describe_error(exc)}"
                log.error("case %s: push failed: %s", result.case_id, result.push_error)
            self.failed += not result.pushed
            self.record(result)

    def _push(self, result, state_uid: str) -> None:
        if not result.dicom_seg:
            result.pushed, result.push_error = False, f"no DICOM SEG to push: {result.dicom_seg_error or 'not written'}"
            return
        outcome = push_case(self.client, self.state, state_uid, self.out, result.case_id)
        result.pushed, result.push_error = outcome.pushed, self.redact_text(outcome.error)
        self.stored += len(outcome.stored)
