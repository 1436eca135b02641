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
(resume, :mod:`pipeline.batch.plan`) → load | infer | finish+write, per case (:mod:`pipeline.batch.run`,
:mod:`pipeline.batch.write_case`) → reports (:mod:`pipeline.batch.report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from pipeline.batch.report.lock import OutputLock
from pipeline.batch.report.outputs import RunFiles, Shard, prepare_output_dir
from pipeline.batch.result import CaseResult
from pipeline.batch.run import BatchRun
from pipeline.batch.runlog import log_to
from pipeline.batch.write_case import dicom_seg_writer
from pipeline.config.schema import PROBABILITY_DTYPES, InputConfig
from pipeline.errors import InputError
from pipeline.infer.segmenter import Segmenter
from pipeline.io.discover import Discovery, discover
from pipeline.io.privacy import Redactor, held_logs, redacted_logging
from pipeline.progress import bars_enabled

__all__ = ["segment_folder"]


def segment_folder(
    input_dir: Union[str, Path],
    output_dir: Union[str, Path],
    model: Union[str, Path, Sequence[Union[str, Path]], Segmenter],
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
    tta: Optional[str] = None,
    save_probabilities: bool = False,
    probabilities_dtype: str = "uint8",
    rtstruct: bool = False,
) -> list[CaseResult]:
    """Segment every scan under ``input_dir`` into ``output_dir/<case>_seg.nii.gz`` (+ reports).

    ``model``: a checkpoint path, several (an ensemble: their softmax probabilities are averaged), a
    training folder (its ``fold_*/best.pt``, or its ``best.pt``) or a ready :class:`Segmenter`. ``tta``:
    ``none | mirror`` instead of the model's ``inference.tta`` (a checkpoint path only).
    ``save_probabilities``: also write ``<case>_prob.nii.gz`` (``probabilities_dtype``: ``uint8`` 0-255 or
    ``float16``). ``backend``: ``auto | torch | onnxruntime`` for a checkpoint path (default: the model's ``inference.backend``). ``overwrite``: redo cases already done.
    ``shard``: ``"I/N"`` or ``(I, N)``, 1-based: this process takes every N-th case from the I-th.
    ``dicom_seg``: also write ``<case>_seg.dcm`` for DICOM sources; ``rtstruct``: ``<case>_rtstruct.dcm``
    (RT Structure Set, one ROI per label). ``qc``: QC pictures.
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
    if save_probabilities and probabilities_dtype not in PROBABILITY_DTYPES:
        raise InputError(f"probabilities dtype {probabilities_dtype!r}: expected one of "
                         f"{', '.join(PROBABILITY_DTYPES)}")
    segmenter = model if isinstance(model, Segmenter) else Segmenter.from_checkpoints(model, device=device,
                                                                                      backend=backend, tta=tta)
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
            dicom_seg_writer()  # fail now, not on every case
        files = RunFiles(prepare_output_dir(output_dir), shard)
        bars = bars_enabled(progress)
        with OutputLock(files.lock, conflicts=files.conflicting_locks()), \
                log_to(files.log, redact, echo=progress and not bars):
            run = BatchRun(segmenter, files, model=model, input_dir=input_dir, overwrite=overwrite,
                           select=select, dicom_seg=dicom_seg, qc=qc, progress=bars, on_case=on_case,
                           redact=redact, probabilities=probabilities_dtype if save_probabilities else None,
                           rtstruct=rtstruct)
            return run.run(discovery, background=background, isolate_reading=isolate_reading)


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
