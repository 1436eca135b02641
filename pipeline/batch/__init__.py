"""Batch service: a folder of scans in, masks and reports out (``segment_folder``, ``medseg segment``).

:mod:`~pipeline.batch.folder` (``segment_folder``: discover, lock, run), :mod:`~pipeline.batch.run` (one
run: the stages per case, the reports), :mod:`~pipeline.batch.plan` (resume: what is already done),
:mod:`~pipeline.batch.write_case` (one case's mask, DICOM SEG, QC picture, sidecar),
:mod:`~pipeline.batch.stages` (load → infer → write in three threads), :mod:`~pipeline.batch.result`
(``CaseResult``, ``exit_code``), :mod:`~pipeline.batch.runlog` (``segment.log``) and
:mod:`~pipeline.batch.report` (manifest, lesions, sidecars, QC, index page, lock, shards, merge).
:mod:`~pipeline.batch.distributed` runs it under ``torchrun``: a shard per rank, merged by rank 0.
It sits above :mod:`pipeline.infer`, which never imports it.
"""

from __future__ import annotations

_API = {
    "MASK_SUFFIX": "pipeline.batch.report.outputs",
    "CaseResult": "pipeline.batch.result",
    "exit_code": "pipeline.batch.result",
    "summarise": "pipeline.batch.result",
    "segment_folder": "pipeline.batch.folder",
    "rebuild_reports": "pipeline.batch.report.merge",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    # torch and MONAI are imported only when segment_folder is used (`medseg manifest` needs neither).
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline.batch' has no attribute {name!r}")
