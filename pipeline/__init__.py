"""medseg: lesion segmentation for CT/MR scans with masks in the exact source geometry.

The public Python API (the CLI is a thin layer over it)::

    from pipeline import load_config, synthesize, train, segment_folder, evaluate_folder
    from pipeline import synthesize_mr     # synthetic FLAIR + T1c MR (labels oedema, core)
    from pipeline import rebuild_reports   # merge shard manifests / rebuild reports from sidecars
    from pipeline import export_model      # a checkpoint as ONNX, TorchScript or a MONAI bundle
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "load_config": "pipeline.config",
    "synthesize": "pipeline.synth",
    "synthesize_mr": "pipeline.synth",
    "train": "pipeline.training",
    "segment_folder": "pipeline.batch",
    "rebuild_reports": "pipeline.batch",
    "evaluate_folder": "pipeline.evaluate",
    "export_model": "pipeline.export",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    # Heavy imports (torch, MONAI) happen only when the API is used, so `medseg --help` is instant.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
