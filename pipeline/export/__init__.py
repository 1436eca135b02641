"""``medseg export``: a checkpoint as files other tools load, each carrying what ``segment`` needs.

* ``onnx`` (:mod:`~pipeline.export.to_onnx`): the network, spec in ``metadata_props``;
* ``torchscript`` (:mod:`~pipeline.export.to_torchscript`): the traced network, spec as ``medseg.json``;
* ``bundle`` (:mod:`~pipeline.export.to_bundle`): a MONAI bundle folder that segments a folder of NIfTI
  files with ``python -m monai.bundle run``.

Every export is verified before it is kept (:func:`~pipeline.export.network.verify_outputs`): on a
mismatch, or anything the format cannot represent, nothing is left at ``out``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from pipeline.config.schema import EXPORT_FORMATS
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "ExportResult", "export_model"]


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float  # the verification's largest logit difference against the checkpoint's network
    seconds: float


def export_model(checkpoint: Union[str, Path], out: Union[str, Path], format: str = "onnx",
                 overwrite: bool = False) -> ExportResult:
    """Export ``checkpoint`` to ``out`` (a file for onnx/torchscript, a folder for bundle), verified."""
    from pipeline.export.network import exportable
    from pipeline.export.spec import inference_spec
    from pipeline.model.checkpoint import load_checkpoint

    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format: expected one of {', '.join(EXPORT_FORMATS)}, found {format!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"export: '{out}' already exists; expected a new path. Choose another OUT or pass "
                          "--overwrite")
    started = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = inference_spec(ckpt)
    target = exportable(ckpt)
    if format == "onnx":
        from pipeline.export.to_onnx import write_onnx

        diff = write_onnx(target, spec, out)
    elif format == "torchscript":
        from pipeline.export.to_torchscript import write_torchscript

        diff = write_torchscript(target, spec, out)
    else:
        from pipeline.export.to_bundle import write_bundle

        diff = write_bundle(ckpt, target, spec, out, overwrite=overwrite)
    seconds = time.perf_counter() - started
    log.info("Exported %s as %s in %.1f s (verified: largest logit difference %.2g)", checkpoint, format,
             seconds, diff)
    return ExportResult(path=out, format=format, max_abs_diff=diff, seconds=seconds)
