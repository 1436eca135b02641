"""Inference: a trained model applied to scans, masks back in each scan's own geometry.

A folder of scans (``segment_folder``, ``CaseResult``, ``exit_code``, ``summarise``) is the batch
service's, :mod:`pipeline.batch`, which imports this package; those names are kept here for older
callers, looked up in :mod:`pipeline.batch` on first access (an import at the top would be a cycle).
"""

from pipeline.infer.segmenter import Prepared, Segmentation, Segmenter

_BATCH = ("MASK_SUFFIX", "CaseResult", "exit_code", "segment_folder", "summarise")

__all__ = ["MASK_SUFFIX", "CaseResult", "Prepared", "Segmentation", "Segmenter", "exit_code", "segment_folder",
           "summarise"]


def __getattr__(name: str):
    if name in _BATCH:
        import pipeline.batch

        return getattr(pipeline.batch, name)
    raise AttributeError(f"module 'pipeline.infer' has no attribute {name!r}")
