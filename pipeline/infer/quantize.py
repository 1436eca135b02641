"""int8: ONNX Runtime static QDQ quantisation of the cached fp32 ONNX export, calibrated on real windows.

* **What is quantised** (:func:`fp32_convs`): the convolutions (``Conv``, ``ConvTranspose``) at the full
  resolution (the first encoder level, the last decoder level), but not the first one (the input's) nor
  the head; the coarser levels stay fp32. Measured on the demo model (4 held-out cases, OpenVINO): every
  convolution but the first and the head in int8 failed the contract (Dice vs reference 0.939, GT Dice
  -0.0066), the full-resolution ones in fp32 and the rest int8 failed worse (0.921), and this rule met it
  (0.982, +0.0003) at half the reference's CPU time: the coarse levels are the sensitive ones, and the
  full-resolution ones hold most of the FLOPs. Weights int8 per output channel,
  activations uint8 per tensor (min/max over the calibration windows, :mod:`pipeline.infer.calibration`;
  the 99.999th percentile agreed better on the calibration windows of the demo model, per-window Dice min
  0.983 against 0.971, but worse on its held-out cases, Dice vs reference 0.933 against 0.939 and GT Dice
  -0.0127 against -0.0066, and took 3x as long),
  in QDQ format (QuantizeLinear/DequantizeLinear pairs around float ops). Normalisations, activations and
  the head's softmax input stay float: ONNX Runtime fuses each Q-DQ-Conv-Q into an int8 ``QLinearConv``,
  OpenVINO reads the same file as FakeQuantize and runs its int8 kernels, so one file serves both.
* **CPU flags at run time** (:func:`int8_cpu`): with ``avx512_vnni`` / ``avx_vnni`` the u8 x s8 dot
  products are exact; without VNNI (AVX2 only: ``vpmaddubsw`` sums pairs into int16 and can saturate)
  the weights are quantised with ``reduce_range`` (7 bits), as ONNX Runtime advises. The flags are recorded
  in the cache key and the ``auto`` decision.
* **Cached** in ``cache_dir()/int8`` by everything that changes the file: checkpoint sha256, window shape,
  calibration rule and set digest, reduce_range, torch, onnx and ONNX Runtime versions
  (:func:`int8_path`); written atomically, then the cache is pruned to its cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import ConfigError
from pipeline.infer.cache import cache_dir, prune_cache, touch
from pipeline.io.atomic import atomic_path

log = logging.getLogger(__name__)

QUANTISED_OPS = ("Conv", "ConvTranspose")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

__all__ = ["QUANTISED_OPS", "int8_cpu", "int8_key", "int8_path", "quantize_onnx"]


def int8_cpu() -> dict:
    """The CPU's int8-relevant vector flags (read now, never assumed) and the weight range used."""
    from pipeline.runtime import cpu_flags

    flags = cpu_flags()
    vnni = [f for f in VNNI_FLAGS if f in flags]
    return {"flags": flags, "vnni": bool(vnni), "reduce_range": not vnni,
            "isa": vnni[0] if vnni else ("avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse")}


def int8_key(model_sha256: str, input_shape: Sequence[int], calibration, reduce_range: bool) -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"model_sha16": model_sha256[:16].lower(), "input_shape": [int(s) for s in input_shape],
            "calibration_rule": calibration.rule, "calibration_digest": calibration.digest,
            "reduce_range": bool(reduce_range), "ops": list(QUANTISED_OPS), "int8_convs": "full-resolution-but-first-and-head",
            "calibration_method": "minmax", "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def int8_path(key: dict) -> Path:
    """``int8/<sha16>-<shape>-<digest of the key>.onnx`` in :func:`cache_dir`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    shape = "x".join(str(s) for s in key["input_shape"])
    return cache_dir() / "int8" / f"{key['model_sha16']}-{shape}-{digest}.onnx"


def fp32_convs(model) -> list[str]:
    """The convolutions (node names) kept in fp32 in the ONNX ``model``: all but those at the full
    resolution (output voxels more than half the largest conv output's: the first encoder level, the last
    decoder level and its up-convolution), and of those the first (the input's) and the last (the head).
    Unknown shapes: only the first and the last."""
    import math

    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*graph.value_info, *graph.output, *graph.input)}
    convs = [n for n in graph.node if n.op_type in QUANTISED_OPS]
    if len(convs) <= 2:
        return []
    sizes = {}
    for node in convs:
        dims = shapes.get(node.output[0], [])[2:]
        sizes[node.name] = math.prod(dims) if dims and all(d > 0 for d in dims) else 0
    largest = max(sizes.values())
    ends = {convs[0].name, convs[-1].name}
    if not largest:
        return sorted(ends)
    return [n.name for n in convs if n.name in ends or 2 * sizes[n.name] <= largest]


class _Windows:
    """An ONNX Runtime CalibrationDataReader over calibration windows, one window per run; ``set_range``
    (ONNX Runtime's strided calibration) limits it to some of them."""

    def __init__(self, input_name: str, windows: np.ndarray):
        self.input_name, self.windows, self.index, self.end = input_name, windows, 0, len(windows)

    def __len__(self) -> int:
        return len(self.windows)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.index, self.end = start_index, min(end_index, len(self.windows))

    def get_next(self):
        if self.index >= self.end:
            return None
        window = self.windows[self.index:self.index + 1]
        self.index += 1
        return {self.input_name: np.ascontiguousarray(window, dtype=np.float32)}

    def rewind(self) -> None:
        self.index = 0


def quantize_onnx(fp32_path: Path, path: Path, windows: np.ndarray, reduce_range: bool) -> Path:
    """Quantise the fp32 ONNX model ``fp32_path`` to ``path`` (QDQ, per-channel int8 weights, uint8
    activations, min/max calibration on ``windows`` (N, C, *roi)); atomic; the cache then pruned."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(fp32_path))
    keep_fp32 = fp32_convs(model)
    reader = type("WindowReader", (_Windows, CalibrationDataReader), {})(model.graph.input[0].name, windows)
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        chatter = io.StringIO()  # ONNX Runtime's calibrators print their progress
        try:
            with contextlib.redirect_stdout(chatter):
                quantize_static(str(fp32_path), str(tmp), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(QUANTISED_OPS), per_channel=True,
                                reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                                # one window per collection (bounded memory; min/max accumulate)
                                extra_options={"CalibStridedMinMax": 1},
                                nodes_to_exclude=keep_fp32)
        except Exception as exc:
            raise ConfigError(
                f"int8 quantisation: expected ONNX Runtime to quantise {fp32_path.name}, found an error: "
                f"{type(exc).__name__}: {str(exc).strip()[:300]}. Use inference.precision: fp32."
            ) from exc
    log.debug("ONNX Runtime calibration: %s", chatter.getvalue().strip()[-500:])
    for leftover in Path(".").glob("augmented_model*.onnx"):  # older ORT versions leave their work file
        leftover.unlink(missing_ok=True)
    log.info("Quantised the network to int8 (QDQ, %d calibration windows, reduce_range=%s) in %.1f s: %s",
             len(windows), reduce_range, time.perf_counter() - started, path)
    prune_cache(keep=[path])
    return path


def cached_int8(fp32_path: Path, key: dict, calibration) -> Path:
    """The int8 model for ``key``: the cached file (marked used), else quantised now."""
    path = int8_path(key)
    if path.is_file():
        touch(path)
        return path
    return quantize_onnx(fp32_path, path, calibration.windows(), key["reduce_range"])
