"""``medseg export --format onnx``: the network with dynamic batch (and, with same padding, spatial) axes,
the spec (:mod:`pipeline.export.spec`) in its ``metadata_props``, verified with ONNX Runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.export.network import Exportable, verify_outputs
from pipeline.export.spec import flat_metadata
from pipeline.infer.backend import OPSET, _new_session, _require_onnxruntime, export_onnx
from pipeline.io.atomic import atomic_path


def write_onnx(target: Exportable, spec: dict, path: Path) -> float:
    """Write the ONNX file atomically; the largest logit difference found by the verification."""
    _require_onnxruntime()
    import onnx

    spec = dict(spec, onnx={"opset": OPSET, "dynamic_spatial": target.dynamic_spatial,
                            "spatial_multiple": target.step})
    with tempfile.TemporaryDirectory(prefix=".medseg-export-", dir=path.parent) as work:
        raw = export_onnx(target.network, target.window, Path(work) / "raw.onnx",
                          dynamic_spatial=target.dynamic_spatial)
        model = onnx.load(str(raw))
    for key, value in flat_metadata(spec).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "medseg"
    model.doc_string = "medseg lesion segmentation network; metadata 'medseg' holds the inference spec (JSON)"
    with atomic_path(path, suffix=".tmp.onnx") as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        return verify_outputs("onnx", _ort_runner(tmp), target)


def _ort_runner(path: Path):
    try:
        session = _new_session(path, threads=1)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ConfigError(f"export verification (onnx): expected ONNX Runtime to load the export, found "
                          f"{type(exc).__name__}: {str(exc).strip()[:300]}. Update onnxruntime") from exc
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
    return run
