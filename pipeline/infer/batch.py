"""``segment_folder``: every scan under a folder into masks a hospital pipeline can trust.

* **Isolated**: a case that fails (corrupt file, inconsistent series, out of memory) is recorded with a
  one-line reason and the others go on; nothing of a failed case is left in the output folder. Scans
  are read in a reader process (:mod:`pipeline.io.isolated`), so even a native crash of a reader
  (GDCM, ITK) costs its case only.
* **Reported**: ``manifest.csv``/``.json`` (one row per case: done | skipped | failed), ``lesions.csv``,
  a provenance sidecar ``<case>_seg.json`` per mask, a QC picture ``qc/<case>.png`` and ``index.html``,
  rewritten atomically as each case finishes, plus ``segment.log``.
* **Resumable**: a case whose mask and sidecar exist with the same fingerprint (model, settings,
  package version, source files) is kept as ``done`` (``resumed``) without being redone. Every file is
  written to a temporary name and renamed, the sidecar last, so a run killed at any moment leaves only
  complete files and the next run finishes the rest.
* **Fast**: the model is loaded once; reading + preprocessing of the next case (loader thread) and
  post-processing + writing of the previous one (writer thread) overlap the network's work on the
  current one. The queues between the stages hold one case each, so memory stays bounded (at most
  five cases in flight).
* **Shared safely**: one run per output folder (lock file); ``shard=(I, N)`` splits the cases between
  N processes, each with its own lock, manifest part and log (merge with ``medseg manifest``).

The run reads as its steps: discover → load the model → prepare the output folder → lock → plan
(resume) → load | infer | finish+write, per case → reports.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Union

from pipeline.config.schema import InputConfig
from pipeline.errors import InputError, describe_error
from pipeline.infer.segmenter import Segmenter
from pipeline.infer.stages import pipelined
from pipeline.io.discover import Case, Discovery, discover
from pipeline.io.geometry import voxel_spacing
from pipeline.io.privacy import Redactor, held_logs, redacted_logging
from pipeline.io.write import write_mask
from pipeline.progress import bars_enabled, progress_bar
from pipeline.report.fingerprint import case_fingerprint, state_dict_sha256
from pipeline.report.html import write_index_html
from pipeline.report.lesions import Lesion, lesion_from_dict, lesion_stats, lesion_totals, write_lesions_csv
from pipeline.report.lock import OutputLock
from pipeline.report.manifest import ALL_COLUMNS, Manifest
from pipeline.report.outputs import (
    MASK_SUFFIX,
    CaseOutputs,
    RunFiles,
    Shard,
    prepare_output_dir,
    remove_temporaries,
)
from pipeline.report.sidecar import read_sidecar, write_sidecar

log = logging.getLogger(__name__)
run_log = logging.getLogger("pipeline.run")  # per-case lines for segment.log (the console: off a terminal)

__all__ = ["MASK_SUFFIX", "CaseResult", "exit_code", "segment_folder", "summarise"]


@dataclass
class CaseResult:
    """One case of a run: a manifest row (see :data:`pipeline.report.manifest.ALL_COLUMNS`) + its lesions."""

    case_id: str
    source: str
    status: str  # done | skipped | failed
    output: str = ""
    error: str = ""
    seconds: float = 0.0
    shape: tuple = ()
    series_uid: str = ""
    kind: str = ""
    spacing_mm: tuple = ()
    lesion_count: Optional[int] = None
    lesion_volume_ml: Optional[float] = None
    seconds_load: float = 0.0
    seconds_infer: float = 0.0
    seconds_post: float = 0.0  # probabilities back to the source grid, labels, lesion statistics
    seconds_write: float = 0.0  # mask, DICOM SEG, QC picture, sidecar
    resumed: bool = False  # done by an earlier run with the same fingerprint
    fingerprint: str = ""
    model_sha256: str = ""
    sidecar: str = ""
    qc_png: str = ""
    dicom_seg: str = ""
    started: str = ""
    finished: str = ""
    host: str = ""
    channel_series_uids: list = field(default_factory=list)  # DICOM studies: each channel's series UID
    dicom_seg_error: str = ""  # why the DICOM SEG asked for was not written (the mask is kept)
    lesions: list = field(default_factory=list, repr=False)  # list[Lesion]

    def to_row(self) -> dict:
        row = {name: getattr(self, name, None) for name in ALL_COLUMNS}
        row["shape"] = list(self.shape) or None
        row["spacing_mm"] = [round(float(s), 6) for s in self.spacing_mm] or None
        row["channel_series_uids"] = list(self.channel_series_uids) or None
        for name in ("seconds_load", "seconds_infer", "seconds_post", "seconds_write", "seconds"):
            row[name] = None if self.status == "skipped" else round(row[name], 4)
        return row


def segment_folder(
    input_dir: Union[str, Path],
    output_dir: Union[str, Path],
    model: Union[str, Path, Segmenter],
    *,
    device: str = "auto",
    backend: Optional[str] = None,
    overwrite: bool = False,
    shard: Union[None, str, tuple, Shard] = None,
    dicom_seg: bool = False,
    qc: bool = True,
    progress: bool = False,
    background: bool = True,
    select: Optional[InputConfig] = None,
    on_case: Optional[Callable[[CaseResult], None]] = None,
    keep_paths: bool = False,
    isolate_reading: bool = True,
) -> list[CaseResult]:
    """Segment every scan under ``input_dir`` into ``output_dir/<case>_seg.nii.gz`` (+ reports).

    ``model``: a checkpoint path or a ready :class:`Segmenter`. ``backend``: ``auto | torch | onnxruntime``
    for a checkpoint path (default: the model's ``inference.backend``). ``overwrite``: redo cases already done.
    ``shard``: ``"I/N"`` or ``(I, N)``, 1-based: this process takes every N-th case from the I-th.
    ``dicom_seg``: also write ``<case>_seg.dcm`` for DICOM sources. ``qc``: QC pictures.
    ``background=False`` runs the stages one after another (a baseline for the throughput benchmark).
    ``select``: which scans to use and how to treat inconsistent DICOM series (``input.*``); default:
    the model's config. ``on_case`` is called (from the writer thread) as each case finishes.
    ``progress``: bars when stderr is a terminal, else one console line per case (:mod:`pipeline.progress`).
    ``keep_paths``: write full source paths; by default every path is relative to ``input_dir`` and
    patient identifiers in it are replaced (:mod:`pipeline.io.privacy`). ``isolate_reading``: read each
    scan in a reader process (:mod:`pipeline.io.isolated`), so a native crash fails that case only;
    ``False`` reads in this process (a crash then ends the run). Returns one result per case
    of this run (shard), in manifest order. Errors before any work (no scans, bad model, unwritable
    output, folder locked) raise :class:`~pipeline.errors.MedsegError`.
    """
    shard = Shard.parse(shard)
    if not Path(input_dir).exists():
        raise InputError(f"input folder not found: '{input_dir}'. Pass a folder holding NIfTI files or DICOM series")
    segmenter = model if isinstance(model, Segmenter) else Segmenter.from_checkpoint(model, device=device, backend=backend)
    select = select or segmenter.config.input
    _check_channel_rules(select, segmenter.config)
    with held_logs() as held:  # discovery's lines name folders: shown once the identifiers are known
        discovery = discover(input_dir, select, channels=segmenter.config.data.channels)
    redact = discovery.redactor(input_dir, keep_paths=keep_paths)
    with redacted_logging(redact):
        held.replay()
        if not discovery.cases:
            raise InputError(_nothing_found(input_dir, discovery, redact))
        if dicom_seg and any(case.kind == "dicom" for case in discovery.cases):
            _dicom_seg_writer()  # fail now, not on every case
        files = RunFiles(prepare_output_dir(output_dir), shard)
        bars = bars_enabled(progress)
        with OutputLock(files.lock, conflicts=files.conflicting_locks()), \
                _log_to(files.log, redact, echo=progress and not bars):
            run = _BatchRun(segmenter, files, model=model, input_dir=input_dir, overwrite=overwrite,
                            select=select, dicom_seg=dicom_seg, qc=qc, progress=bars, on_case=on_case,
                            redact=redact)
            return run.run(discovery, background=background, isolate_reading=isolate_reading)


def summarise(results: list[CaseResult]) -> dict:
    done = [r for r in results if r.status == "done"]
    return {
        "done": len(done), "resumed": sum(r.resumed for r in done),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "lesions": sum(r.lesion_count or 0 for r in done),
        "lesion_volume_ml": sum(r.lesion_volume_ml or 0.0 for r in done),
    }


def exit_code(results: list[CaseResult]) -> int:
    """0: every case done or skipped; 1: some failed; 2: some failed and none succeeded."""
    s = summarise(results)
    if s["failed"] and not s["done"]:
        return 2
    return 1 if s["failed"] else 0


# --- one run ---------------------------------------------------------------------------------------


@dataclass
class _Item:
    """A case on its way through the stages."""

    case: Case
    fingerprint: str
    started: str = ""
    prepared: object = None
    probs: object = None
    error: Optional[BaseException] = None
    seconds_load: float = 0.0
    seconds_infer: float = 0.0




class _BatchRun:
    def __init__(self, segmenter: Segmenter, files: RunFiles, *, model, input_dir, overwrite, select, dicom_seg, qc,
                 progress, on_case, redact: Redactor):
        from pipeline.model.checkpoint import versions

        self.segmenter, self.files = segmenter, files
        self.out = files.output_dir
        self.overwrite, self.dicom_seg, self.qc = overwrite, dicom_seg, qc
        self.progress, self.on_case = progress, on_case  # progress: draw bars (the terminal decided)
        self.redact = redact
        self.model_id = segmenter.model_sha256 or "state:" + state_dict_sha256(segmenter.network.state_dict())
        self.host = socket.gethostname()
        self.versions = versions()
        self.config = replace(segmenter.config, input=select)  # what decides the masks, input rules included
        self.config_dict = asdict(self.config)
        self.results: dict[str, CaseResult] = {}
        self._lock = threading.RLock()  # _record saves the reports under the same lock
        self.bar = None
        self.reader = None  # the IsolatedReader of the run, if any
        model_path = "" if isinstance(model, Segmenter) else str(model)
        self.manifest = Manifest(files.manifest_csv, files.manifest_json, {
            "input_dir": redact.path(input_dir),  # its name only (and full paths with keep_paths)
            "output_dir": str(self.out) if redact.keep_paths else redact.text(self.out.resolve().name),
            "model": model_path,
            "model_sha256": segmenter.model_sha256, "shard": str(files.shard) if files.shard else None,
            "started": _now(), "host": self.host, "versions": self.versions,
        })

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
        self._open_bar(len(cases), len(cases) - len(todo))
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

    # --- planning ---------------------------------------------------------------------------------

    def _plan(self, cases: list[Case], skipped) -> list[tuple[Case, str]]:
        for item in skipped:
            self._record(CaseResult(case_id=item.case_id, source=self.redact.path(item.source), status="skipped",
                                    error=self.redact.text(item.reason), series_uid=item.series_uid,
                                    finished=_now()), save=False)
        todo = []
        for case in cases:
            fingerprint = case_fingerprint(self.model_id, self.config, case.files)
            previous = None if self.overwrite else self._previous(case, fingerprint)
            if previous is not None:
                self._record(previous, save=False)
                run_log.info("case %s: already done (same fingerprint), kept", case.case_id)
            else:
                todo.append((case, fingerprint))
        self._save_reports()
        return todo

    def _previous(self, case: Case, fingerprint: str) -> Optional[CaseResult]:
        """The result of an earlier run for ``case``, if its outputs are complete and match."""
        outputs = CaseOutputs(self.out, case.case_id)
        data = read_sidecar(outputs.sidecar)
        if data is None or data.get("fingerprint") != fingerprint or not outputs.mask.is_file():
            return None
        if self.qc and not outputs.qc_png.is_file():
            return None
        if self.dicom_seg and case.kind == "dicom" and not outputs.dicom_seg.is_file() \
                and not data.get("dicom_seg_error"):  # a SEG that cannot be written is not retried
            return None
        result = _result_from_sidecar(data, case, outputs, self.redact.path(case.display_source))
        result.resumed = True
        return result

    # --- the stages -------------------------------------------------------------------------------

    def _load(self, case: Case, fingerprint: str) -> _Item:
        item = _Item(case, fingerprint, started=_now())
        start = time.perf_counter()
        try:
            source = case.reader_input if self.reader is None else self.reader.read(case.reader_input)
            item.prepared = self.segmenter.load(source)
        except Exception as exc:  # isolate the case: recorded by the writer
            item.error = exc
        item.seconds_load = time.perf_counter() - start
        return item

    def _infer(self, item: _Item) -> None:
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
            item.probs = self.segmenter.predict(item.prepared, progress=tick)
        except Exception as exc:  # out of memory included: the batch goes on
            item.error, item.prepared, item.probs = exc, None, None
            _free_device_memory()
        finally:
            if tiles is not None:
                tiles.close()
        item.seconds_infer = time.perf_counter() - start

    def _finalize(self, item: _Item) -> None:
        outputs = CaseOutputs(self.out, item.case.case_id)
        result = None
        if item.error is None:
            try:
                result = self._write(item, outputs)
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
                                finished=_now(), host=self.host, seconds_load=item.seconds_load,
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

    def _write(self, item: _Item, outputs: CaseOutputs) -> CaseResult:
        case, config = item.case, self.segmenter.config
        start = time.perf_counter()
        seg = self.segmenter.finish(item.probs, item.prepared)
        item.prepared = item.probs = None
        lesions = lesion_stats(seg.labels, seg.affine, image=seg.image, probability=seg.foreground,
                               case_id=case.case_id)
        count, volume = lesion_totals(lesions)
        seconds_post = time.perf_counter() - start

        start = time.perf_counter()
        outputs.sidecar.unlink(missing_ok=True)  # the case counts as unfinished until the new sidecar
        write_mask(seg.labels, seg.affine, outputs.mask, source=case.source if case.kind == "nifti" else None)
        wants_seg = self.dicom_seg and case.kind == "dicom"
        seg_error = self._write_dicom_seg(case, seg, outputs) if wants_seg else ""
        if self.qc:
            from pipeline.report.qc import display_window, write_qc_png

            largest = max(lesions, key=lambda lesion: lesion.voxels, default=None)
            intensity = config.preprocess.intensity
            window = display_window(seg.image, intensity.mode, intensity.window)
            write_qc_png(outputs.qc_png, seg.image, seg.labels, seg.affine,
                         centre_mm=None if largest is None else largest.centroid_mm, window=window,
                         title=f"{case.case_id}: {count} lesion(s), {volume:.2f} mL")
        result = CaseResult(
            case.case_id, self.redact.path(case.display_source), "done", output=str(outputs.mask),
            shape=tuple(int(s) for s in seg.labels.shape), series_uid=case.series_uid, kind=case.kind,
            spacing_mm=tuple(float(s) for s in voxel_spacing(seg.affine)), lesion_count=count,
            lesion_volume_ml=volume, seconds_load=item.seconds_load, seconds_infer=item.seconds_infer,
            seconds_post=seconds_post, fingerprint=item.fingerprint, model_sha256=self.segmenter.model_sha256,
            sidecar=str(outputs.sidecar), qc_png=str(outputs.qc_png) if self.qc else "",
            dicom_seg=str(outputs.dicom_seg) if wants_seg and not seg_error else "",
            dicom_seg_error=seg_error, started=item.started, host=self.host, lesions=lesions,
            channel_series_uids=list(case.channel_series_uids),
        )
        result.seconds_write = time.perf_counter() - start
        result.seconds = result.seconds_load + result.seconds_infer + result.seconds_post + result.seconds_write
        result.finished = _now()
        write_sidecar(outputs.sidecar, self._sidecar(result, case, seg.affine))  # last: the case is finished
        return result

    def _write_dicom_seg(self, case: Case, seg, outputs: CaseOutputs) -> str:
        """Write the case's DICOM SEG; a SEG that cannot be written never costs the case its mask: the
        reason is returned (for ``dicom_seg_error``) and logged, and the case stays done."""
        try:
            _dicom_seg_writer()(seg.labels, seg.affine, case.reference_files, outputs.dicom_seg,
                                self.segmenter.config.label_names)
        except Exception as exc:  # any SEG failure (unsupported source, highdicom, disk) is secondary
            outputs.dicom_seg.unlink(missing_ok=True)
            reason = describe_error(exc)
            log.warning("%s: DICOM SEG not written (the mask is): %s", case.case_id, reason)
            return reason
        return ""

    def _sidecar(self, result: CaseResult, case: Case, affine) -> dict:
        row = result.to_row()
        row.pop("status"), row.pop("error"), row.pop("resumed"), row.pop("sidecar")
        return {**row, "model": self.manifest.meta["model"], "source_files": len(case.files),
                "affine": [[round(float(v), 6) for v in r] for r in affine], "config": self.config_dict,
                "versions": self.versions, "lesions": [asdict(lesion) for lesion in result.lesions],
                "assumptions": list(case.volume.assumptions) if case.volume is not None else []}

    # --- reports ----------------------------------------------------------------------------------

    def _record(self, result: CaseResult, save: bool = True) -> None:
        with self._lock:
            self.results[result.case_id or f"source:{result.source}"] = result
            self.manifest.record(result.to_row(), save=False)
            if save:
                self._save_reports()

    def _save_reports(self) -> None:
        with self._lock:
            self.manifest.meta["updated"] = _now()
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


# --- helpers ---------------------------------------------------------------------------------------


def _result_from_sidecar(data: dict, case: Case, outputs: CaseOutputs, source: str) -> CaseResult:
    lesions = [lesion_from_dict(d) for d in data.get("lesions") or []]
    count, volume = lesion_totals(lesions)
    timing = {n: float(data.get(n) or 0.0) for n in ("seconds_load", "seconds_infer", "seconds_post",
                                                      "seconds_write", "seconds")}
    return CaseResult(
        case.case_id, source, "done", output=str(outputs.mask), shape=tuple(data.get("shape") or ()),
        series_uid=case.series_uid, kind=case.kind, spacing_mm=tuple(data.get("spacing_mm") or ()),
        lesion_count=count, lesion_volume_ml=volume, fingerprint=str(data.get("fingerprint")),
        model_sha256=str(data.get("model_sha256") or ""), sidecar=str(outputs.sidecar),
        qc_png=str(outputs.qc_png) if outputs.qc_png.is_file() else "",
        dicom_seg=str(outputs.dicom_seg) if outputs.dicom_seg.is_file() else "",
        dicom_seg_error="" if outputs.dicom_seg.is_file() else str(data.get("dicom_seg_error") or ""),
        started=str(data.get("started") or ""), finished=str(data.get("finished") or ""),
        host=str(data.get("host") or ""), lesions=lesions, channel_series_uids=list(case.channel_series_uids),
        **timing,
    )


def _result_order(results: dict[str, CaseResult]):
    return lambda key: (not results[key].case_id, key)


def _nothing_found(input_dir, discovery: Discovery, redact: Redactor) -> str:
    message = (f"no scans found under '{input_dir}': expected NIfTI files (.nii/.nii.gz) or folders of "
               "DICOM files. Check the path")
    if discovery.skipped:
        first = discovery.skipped[0]
        message += (f" ({len(discovery.skipped)} item(s) skipped, e.g. '{redact.path(first.source)}': "
                    f"{redact.text(first.reason)})")
    return message


def _check_channel_rules(select: InputConfig, config) -> None:
    if select.channels and len(select.channels) != config.in_channels:
        raise InputError(
            f"input.channels names {len(select.channels)} channel(s) ({', '.join(r.name for r in select.channels)}) "
            f"but the model takes {config.in_channels} ({', '.join(config.channel_names)}): give one rule per "
            "model channel, in the model's order"
        )


def _dicom_seg_writer():
    try:
        from pipeline.io.dicom_seg import write_dicom_seg
    except ImportError as exc:
        raise InputError(f"DICOM SEG output is not available in this installation ({exc}): "
                         "run without --dicom-seg, or install medseg with highdicom") from None
    return write_dicom_seg


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


class _RunLogHandler(logging.FileHandler):
    """``segment.log``: a line that cannot be written (a full disk) is dropped, with one warning on the
    console, instead of logging's traceback for every line; the run itself goes on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self._failed:
            return
        self._failed = True
        error = sys.exc_info()[1]
        log.warning("cannot write to the run's log '%s' (%s): its lines are dropped from here on",
                    self.baseFilename, describe_error(error) if error is not None else "unknown error")


@contextlib.contextmanager
def _log_to(path: Path, redact: Redactor, echo: bool = False):
    """Append the package's log (and the per-case lines of ``run_log``) to ``path`` during the run, every
    line through ``redact``. ``echo``: the per-case lines go to the console too (when no bar is drawn)."""
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if not redact.keep_paths:
        handler.addFilter(redact.log_filter())
    package = logging.getLogger("pipeline")
    run_log.propagate = echo  # to the package's handlers (this file) and the console
    run_log.setLevel(logging.INFO)
    package.addHandler(handler)
    if not echo:
        run_log.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        run_log.removeHandler(handler)
        run_log.propagate = False
        handler.close()
