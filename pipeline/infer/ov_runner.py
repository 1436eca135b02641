"""OpenVINO backend: the cached ONNX export (fp32, or its int8 QDQ quantisation) run by OpenVINO on the CPU.

* **Converted once, cached.** The ONNX file is converted to OpenVINO IR (``.xml`` + ``.bin``, weights kept
  in fp32: ``compress_to_fp16=False``) in ``cache_dir()/openvino``, named after the ONNX file and the
  OpenVINO version; later runs read the IR (faster than parsing ONNX). The ``.bin`` is moved into place
  before the ``.xml``, so a reader that finds the ``.xml`` finds both.
* **Compiled for one batch.** The model is reshaped to a static ``(batch, *input_shape)`` and compiled
  for the CPU with ``INFERENCE_NUM_THREADS`` = torch's thread count, the ``LATENCY`` hint and
  ``INFERENCE_PRECISION_HINT: f32`` (OpenVINO would otherwise run in bf16 on CPUs that have it). A smaller
  last batch is padded (by repeating its last window), a larger one split.
* **One ``ov.Core`` per process** (:func:`shared_core`), shared by every runner: creating a Core per model
  load is a known cause of segfaults after repeated loads in one process (it crashed a test run here
  after dozens of compiled models; openvinotoolkit/openvino#35338, ultralytics/ultralytics#25864).
* :class:`OpenVinoRunner` is a drop-in predictor like :class:`~pipeline.infer.backend.OnnxRunner`:
  ``runner(x)`` takes and returns torch tensors.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.infer.cache import cache_dir, prune_cache, touch

log = logging.getLogger(__name__)

__all__ = ["OpenVinoRunner", "openvino_available", "openvino_version", "ir_path"]


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


def require_openvino() -> None:
    if not openvino_available():
        raise ConfigError("Backend 'openvino': expected the openvino package, found it is not installed. "
                          "Install it (pip install openvino) or use the 'torch' or 'onnxruntime' backend.")


_core = None
_core_lock = threading.Lock()


def shared_core():
    """This process's one ``openvino.Core``, created on first use (see the module docstring)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


def ir_path(onnx_file: Path) -> Path:
    """``openvino/<onnx file stem>-ov<version>.xml`` in :func:`cache_dir`."""
    return cache_dir() / "openvino" / f"{Path(onnx_file).stem}-ov{openvino_version()}.xml"


def convert_to_ir(onnx_file: Path, xml: Path) -> Path:
    """Convert ``onnx_file`` to OpenVINO IR at ``xml`` (+ ``.bin``), atomically; the cache then pruned."""
    import openvino as ov

    started = time.perf_counter()
    xml.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=xml.parent))
    try:
        model = ov.convert_model(str(onnx_file))
        ov.save_model(model, str(work / xml.name), compress_to_fp16=False)
        os.replace(work / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(work / xml.name, xml)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("Converted %s to OpenVINO IR in %.1f s: %s", onnx_file.name, time.perf_counter() - started, xml)
    prune_cache(keep=[xml, xml.with_suffix(".bin")])
    return xml


class OpenVinoRunner:
    """Run a cached ONNX model with OpenVINO on the CPU; a sliding-window predictor.

    Args:
        onnx_file: the ONNX model (fp32 export or int8 QDQ), batch axis dynamic.
        input_shape: the window shape without batch, ``(channels, *roi)``.
        batch: windows per compiled call (smaller batches are padded).
        threads: OpenVINO inference threads; default ``torch.get_num_threads()``.
    """

    def __init__(self, onnx_file: Path, input_shape: Sequence[int], batch: int = 2, threads: Optional[int] = None):
        require_openvino()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.batch = max(1, int(batch))
        self.threads = int(threads or torch.get_num_threads())
        self.path = ir_path(Path(onnx_file))
        if self.path.is_file() and self.path.with_suffix(".bin").is_file():
            touch(self.path)
            touch(self.path.with_suffix(".bin"))
        else:
            convert_to_ir(Path(onnx_file), self.path)
        core = shared_core()
        try:
            model = core.read_model(str(self.path))
            model.reshape({model.inputs[0].get_any_name(): [self.batch, *self.input_shape]})
            self.compiled = core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as exc:  # OpenVINO raises its own (pybind) exception types
            raise ConfigError(
                f"OpenVINO: expected to compile {self.path.name} for the CPU, found an error: "
                f"{type(exc).__name__}: {str(exc).strip()[:300]}. Clear it (medseg cache clear --what openvino) "
                "or use the 'onnxruntime' or 'torch' backend."
            ) from exc
        self.request = self.compiled.create_infer_request()

    def _run(self, array: np.ndarray) -> np.ndarray:
        n = array.shape[0]
        if n < self.batch:  # pad with the last window
            array = np.concatenate([array, np.repeat(array[-1:], self.batch - n, axis=0)])
        result = self.request.infer({0: array})
        return np.array(result[self.compiled.outputs[0]][:n], dtype=np.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, *out_spatial)`` (float32) for windows ``x`` of shape ``(B, *input_shape)``."""
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor
            x = x.as_tensor()
        if tuple(x.shape[1:]) != self.input_shape:
            raise ConfigError(
                f"OpenVinoRunner: expected windows of shape (batch, {', '.join(map(str, self.input_shape))}), "
                f"found {tuple(x.shape)}. Build the runner with input_shape = (in_channels, *inference.roi_size)."
            )
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy(), dtype=np.float32)
        parts = [self._run(array[i:i + self.batch]) for i in range(0, array.shape[0], self.batch)]
        out = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
        return out if x.device.type == "cpu" else out.to(x.device)

    def __repr__(self) -> str:
        return (f"OpenVinoRunner(path={str(self.path)!r}, input_shape={self.input_shape}, batch={self.batch}, "
                f"threads={self.threads})")
