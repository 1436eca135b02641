"""One batch run over the cases of a folder: plan → load | infer | finish+write, per case → reports.

The stages overlap (:func:`pipeline.batch.stages.pipelined`): while the network works on one case, the
next one is read and preprocessed (loader thread) and the previous one is written (writer thread). What
is already done is decided by :mod:`pipeline.batch.plan`, one case's files are written by
:mod:`pipeline.batch.write_case`; this module records each result and rewrites the reports.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import asdict, replace
from typing import Iterable, Optional

from pipeline.batch.plan import plan_run
from pipeline.batch.report.fingerprint import state_dict_sha256
from pipeline.batch.report.html import write_index_html
from pipeline.batch.report.lesions import Lesion, write_lesions_csv
from pipeline.batch.report.manifest import Manifest
from pipeline.batch.report.outputs import CaseOutputs, RunFiles, remove_temporaries
from pipeline.batch.result import CaseResult, InFlight, now, summarise
from pipeline.batch.runlog import run_log
from pipeline.batch.stages import pipelined
from pipeline.batch.write_case import CaseWriter
from pipeline.errors import describe_error
from pipeline.infer.ensemble import ensemble_identity
from pipeline.infer.segmenter import Segmenter
from pipeline.io.discover import Case, Discovery
from pipeline.io.privacy import Redactor
from pipeline.progress import progress_bar

log = logging.getLogger(__name__)

__all__ = ["BatchRun"]


class BatchRun:
    def __init__(self, segmenter: Segmenter, files: RunFiles, *, model, input_dir, overwrite, select, dicom_seg, qc,
                 progress, on_case, redact: Redactor, probabilities: Optional[str] = None, rtstruct: bool = False):
        from pipeline.model.checkpoint import versions

        self.segmenter, self.files = segmenter, files
        self.out = files.output_dir
        self.overwrite, self.dicom_seg, self.qc = overwrite, dicom_seg, qc
        self.rtstruct = rtstruct
        self.probabilities = probabilities  # uint8 | float16: --save-probabilities; None: not asked
        self.progress, self.on_case = progress, on_case  # progress: draw bars (the terminal decided)
        self.redact = redact
        self.model_id = segmenter.model_sha256 or "state:" + ensemble_identity(
            [state_dict_sha256(network.state_dict()) for network in segmenter.networks])
        self.host = socket.gethostname()
        self.versions = versions()
        self.config = replace(segmenter.config, input=select)  # what decides the masks, input rules included
        self.results: dict[str, CaseResult] = {}
        self._lock = threading.RLock()  # _record saves the reports under the same lock
        self.bar = None
        self.reader = None  # the IsolatedReader of the run, if any
        model_path = ";".join(segmenter.model_paths) if isinstance(model, Segmenter) else model_text(model)
        self.manifest = Manifest(files.manifest_csv, files.manifest_json, {
            "input_dir": redact.path(input_dir),  # its name only (and full paths with keep_paths)
            "output_dir": str(self.out) if redact.keep_paths else redact.text(self.out.resolve().name),
            "model": model_path,
            "model_sha256": segmenter.model_sha256, "shard": str(files.shard) if files.shard else None,
            "models": list(segmenter.model_paths), "model_sha256s": list(segmenter.model_sha256s),
            "tta": segmenter.tta, "probabilities": probabilities,
            "started": now(), "host": self.host, "versions": self.versions,
        })
        self.writer = CaseWriter(segmenter, redact=redact, dicom_seg=dicom_seg, qc=qc, host=self.host,
                                 model=model_path, config_dict=asdict(self.config), versions=self.versions,
                                 probabilities=probabilities, rtstruct=rtstruct)

    def run(self, discovery: Discovery, background: bool, isolate_reading: bool = True) -> list[CaseResult]:
        start = time.perf_counter()
        cases = sorted(discovery.cases, key=lambda c: c.case_id)
        skipped = list(discovery.skipped)
        if self.files.shard:
            cases = self.files.shard.select(cases)
            skipped = skipped if self.files.shard.index == 1 else []
        removed = remove_temporaries([p for c in cases for p in CaseOutputs(self.out, c.case_id).all()]
                                     + self.files.own_files())
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted run", len(removed))
        todo = self._plan(cases, skipped)
        run_log.info("run started: %d case(s) in this %s, %d already done, %d skipped by discovery; model %s",
                     len(cases), f"shard {self.files.shard}" if self.files.shard else "run",
                     len(cases) - len(todo), len(skipped), self.manifest.meta["model"] or self.model_id)
        return self.run_todo(todo, len(cases), len(cases) - len(todo), start, background=background,
                             isolate_reading=isolate_reading)

    def run_todo(self, todo: Iterable[tuple[Case, str]], total: int, done_before: int, start: float, *,
                 background: bool, isolate_reading: bool = True) -> list[CaseResult]:
        """The stages over ``todo`` ((case, fingerprint) pairs: a list, or a generator that yields cases as
        they arrive, e.g. from an archive, :mod:`pipeline.archive.run`), then the reports; every result
        recorded so far (:meth:`record`), in manifest order."""
        self._open_bar(total, done_before)
        if isolate_reading and todo:
            from pipeline.io.isolated import IsolatedReader

            self.reader = IsolatedReader()
            self.reader.start()  # it imports while the rest starts
        try:
            if background:
                pipelined(todo, self._load, self._infer, self._finalize, thread_init=self._thread_init)
            else:
                for case, fingerprint in todo:
                    item = self._load(case, fingerprint)
                    self._infer(item)
                    self._finalize(item)
        finally:
            if self.reader is not None:
                self.reader.close()
                self.reader = None
            if self.bar is not None:
                self.bar.close()
            self._save_reports()
        ordered = [self.results[k] for k in sorted(self.results, key=_result_order(self.results))]
        s = summarise(ordered)
        run_log.info("run finished in %.1f s: %d done (%d resumed), %d skipped, %d failed; %d lesion(s), %.2f mL",
                     time.perf_counter() - start, s["done"], s["resumed"], s["skipped"], s["failed"],
                     s["lesions"], s["lesion_volume_ml"])
        return ordered

    def _thread_init(self) -> None:
        """Background threads on a CPU-only run: one torch thread each (torch's thread count is per
        thread), so reading and writing take a core's slack instead of fighting inference's threads."""
        if self.segmenter.device.type == "cpu":
            import torch

            torch.set_num_threads(1)

    def _plan(self, cases: list[Case], skipped) -> list[tuple[Case, str]]:
        plan = plan_run(cases, skipped, output_dir=self.out, model_id=self.model_id, config=self.config,
                        redact=self.redact, overwrite=self.overwrite, qc=self.qc, dicom_seg=self.dicom_seg,
                        probabilities=self.probabilities, rtstruct=self.rtstruct)
        for result in plan.kept:
            self._record(result, save=False)
        self._save_reports()
        return plan.todo

    # --- the stages -------------------------------------------------------------------------------

    def _load(self, case: Case, fingerprint: str) -> InFlight:
        item = InFlight(case, fingerprint, started=now())
        start = time.perf_counter()
        try:
            source = case.reader_input if self.reader is None else self.reader.read(case.reader_input)
            item.prepared = self.segmenter.load(source)
        except Exception as exc:  # isolate the case: recorded by the writer
            item.error = exc
        item.seconds_load = time.perf_counter() - start
        return item

    def _infer(self, item: InFlight) -> None:
        if item.error is not None:
            return
        start = time.perf_counter()
        tiles = None
        try:
            if self.progress:
                tiles = progress_bar(enabled=True, total=self.segmenter.tile_batches(item.prepared),
                                     desc=f"  {item.case.case_id}", unit="tile", leave=False, position=1,
                                     dynamic_ncols=True)
            tick = (lambda: tiles.update(1)) if tiles is not None else None
            item.probs = self.segmenter.predict(item.prepared, progress=tick,
                                                class_probabilities=self.probabilities is not None)
        except Exception as exc:  # out of memory included: the batch goes on
            item.error, item.prepared, item.probs = exc, None, None
            _free_device_memory()
        finally:
            if tiles is not None:
                tiles.close()
        item.seconds_infer = time.perf_counter() - start

    def _finalize(self, item: InFlight) -> None:
        outputs = CaseOutputs(self.out, item.case.case_id)
        result = None
        if item.error is None:
            try:
                result = self.writer.write(item, outputs)
            except Exception as exc:
                item.error = exc
        if item.error is not None:
            outputs.remove()  # nothing partial (nor stale) of a failed case
            message = self.redact.text(describe_error(item.error))
            log.error("case %s failed: %s", item.case.case_id, message)
            log.debug("case %s traceback", item.case.case_id, exc_info=item.error)
            case = item.case
            result = CaseResult(case.case_id, self.redact.path(case.display_source), "failed", error=message,
                                series_uid=case.series_uid, kind=case.kind, fingerprint=item.fingerprint,
                                channel_series_uids=list(case.channel_series_uids),
                                model_sha256=self.segmenter.model_sha256, started=item.started,
                                finished=now(), host=self.host, seconds_load=item.seconds_load,
                                seconds_infer=item.seconds_infer)
        else:
            run_log.info("case %s done: %d lesion(s), %.2f mL; load %.2f s, infer %.2f s, post %.2f s, "
                         "write %.2f s", result.case_id, result.lesion_count, result.lesion_volume_ml,
                         result.seconds_load, result.seconds_infer, result.seconds_post, result.seconds_write)
        item.prepared = item.probs = None
        self._record(result)
        if self.bar is not None:
            self.bar.update(1)
        if self.on_case is not None:
            self.on_case(result)

    # --- reports ----------------------------------------------------------------------------------

    def record(self, result: CaseResult, save: bool = True) -> None:
        """Add or replace ``result``'s manifest row (and save the reports)."""
        self._record(result, save=save)

    def _record(self, result: CaseResult, save: bool = True) -> None:
        with self._lock:
            self.results[result.case_id or f"source:{result.source}"] = result
            self.manifest.record(result.to_row(), save=False)
            if save:
                self._save_reports()

    def save_reports(self) -> None:
        """Rewrite the manifest (its ``meta`` included), ``lesions.csv`` and the index page now."""
        self._save_reports()

    def _save_reports(self) -> None:
        with self._lock:
            self.manifest.meta["updated"] = now()
            self.manifest.save()
            lesions: list[Lesion] = []
            for key in sorted(self.results):
                if self.results[key].status == "done":
                    lesions += self.results[key].lesions
            write_lesions_csv(lesions, self.files.lesions_csv)
            if self.files.index_html is not None:
                write_index_html(self.manifest.rows, self.out)

    def _open_bar(self, total: int, initial: int) -> None:
        if self.progress:
            self.bar = progress_bar(enabled=True, total=total, initial=initial, desc="segment", unit="case",
                                    position=0, dynamic_ncols=True)


def model_text(model) -> str:
    """The ``model`` a run was given, as the manifest and sidecars write it: a path, or paths joined by ``;``."""
    if isinstance(model, (list, tuple)):
        return ";".join(str(m) for m in model)
    return str(model)


def _result_order(results: dict[str, CaseResult]):
    return lambda key: (not results[key].case_id, key)


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
