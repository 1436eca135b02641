"""Inference backends: PyTorch eager, or ONNX Runtime on the CPU, and an automatic choice between them.

Design
------
* **One window, one graph.** The network is exported for exactly one window input shape
  ``(channels, *roi)``: spatial axes are static (ONNX Runtime plans convolutions for them), only the
  batch axis is dynamic, so the same file serves every ``sw_batch_size`` and the last, smaller batch
  of a sliding-window run. :class:`OnnxRunner` is a drop-in *predictor* for MONAI's
  ``sliding_window_inference``: ``runner(x)`` takes and returns torch tensors.
* **Exported once, cached by checkpoint.** The ONNX file is named after the checkpoint's sha256 (first
  16 hex digits), the window shape, the opset and the torch version (:func:`onnx_path`), in
  :func:`cache_dir`. The first :class:`OnnxRunner` for a checkpoint exports it; later ones (in this or
  another process) reuse it. A network that was not loaded from a checkpoint has no sha256 and is not
  exported (there would be nothing to key the cache on).
* **Safe files.** Exports and calibration results are written with :func:`pipeline.io.atomic.atomic_path`
  (a temporary file in the target folder, synced, moved into place), so a reader never sees half a
  file, even with two processes exporting at once. A cached ONNX file that ONNX Runtime cannot load
  (truncated, corrupt, from another exporter) is deleted and exported again, once.
* **The exporter.** The legacy TorchScript exporter (``dynamo=False``, opset 17) works for every U-Net
  variant (2D/3D, same/valid padding, deep supervision). It runs on a deep copy of the network moved to
  the CPU in eval mode, so the caller's module, its device and its train/eval mode are untouched. Its
  warnings (deprecation, tracer warnings from our shape checks, "instance_norm is set to train=True")
  are expected and silenced: instance norm always normalises with the statistics of its input, which is
  what the exported graph does too. With deep supervision only the main (full-resolution) output is
  exported.
* **Choosing the backend** (:func:`select_backend`). ``"torch"`` and ``"onnxruntime"`` are taken as
  given (after checking that ONNX Runtime is installed and the device is the CPU). ``"auto"`` picks torch
  on a GPU, without ONNX Runtime, or without a checkpoint sha256; otherwise it times one batch of windows
  on both backends once (one warm-up, median of three), picks the faster and stores the decision as a
  small JSON file keyed by everything that changes the answer: checkpoint, window shape, batch, torch
  threads, CPU capability (AVX2/AVX512...), torch and ONNX Runtime versions. Another machine, thread
  count or library version therefore measures again.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import BACKENDS, PRECISIONS
from pipeline.errors import ConfigError, first_line
from pipeline.infer.cache import cache_dir, prune_cache, touch
from pipeline.io.atomic import atomic_path

log = logging.getLogger(__name__)

OPSET = 17
TIMING_REPEATS = 3
_INPUT_NAME = "x"
_OUTPUT_NAME = "y"
_EXPORT_BATCH = 2

__all__ = [
    "BACKENDS",
    "OPSET",
    "PRECISIONS",
    "OnnxRunner",
    "cache_dir",
    "export_onnx",
    "make_predictor",
    "onnx_path",
    "onnxruntime_available",
    "select_backend",
    "select_runtime",
]


# ---- environment -----------------------------------------------------------------------------------


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# ---- names -----------------------------------------------------------------------------------------


def _sha16(model_sha256: str) -> str:
    sha = (model_sha256 or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{16,64}", sha):
        raise ConfigError(
            f"model_sha256: expected the hex sha256 of the checkpoint file (at least 16 hex digits), "
            f"found {model_sha256!r}. Load the network with load_checkpoint() and pass checkpoint.sha256, "
            "or use the 'torch' backend for a network that was not loaded from a checkpoint."
        )
    return sha[:16]


def _shape_tag(input_shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in input_shape)


def _version_tag(version: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "_", version)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (3, 4) or any(s <= 0 for s in shape):
        raise ConfigError(
            f"input_shape: expected the window shape (channels, *roi) with 2 or 3 positive spatial sizes, "
            f"found {tuple(input_shape)}. Pass (in_channels, *inference.roi_size), without the batch axis."
        )
    return shape


STAGED_NORM_TAG = "-stagednorm"  # the OpenVINO fp32 export's file name (pipeline.infer.staged_norm)


def onnx_path(model_sha256: str, input_shape: Sequence[int], staged_norm: bool = False) -> Path:
    """Cache file of the exported network, e.g. ``onnx/<sha16>-1x128x128x32-op17-torch2.13.0_cpu.onnx``
    (``...-stagednorm.onnx`` with ``staged_norm``: the OpenVINO fp32 export)."""
    shape = _check_input_shape(input_shape)
    name = (f"{_sha16(model_sha256)}-{_shape_tag(shape)}-op{OPSET}-torch{_version_tag(torch.__version__)}"
            f"{STAGED_NORM_TAG if staged_norm else ''}.onnx")
    return cache_dir() / "onnx" / name


# ---- atomic files ----------------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- export ----------------------------------------------------------------------------------------


class _MainOutput(nn.Module):
    """The network's full-resolution logits only (deep supervision returns a list in training mode)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(x)
        return y[0] if isinstance(y, (list, tuple)) else y


def _cpu_eval_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` on the CPU in eval mode; the caller's module is not touched."""
    clone = copy.deepcopy(network)
    return clone.to("cpu", dtype=torch.float32).eval()


def export_onnx(network: nn.Module, input_shape: Sequence[int], path: str | Path,
                dynamic_spatial: bool = False, staged_norm: bool = False) -> Path:
    """Export ``network`` for windows of shape ``(batch, *input_shape)`` (dynamic batch) to ``path``.

    ``dynamic_spatial``: the spatial axes are dynamic too (``medseg export``; the cache keeps them static).
    ``staged_norm``: instance norms exported with staged reductions (:mod:`pipeline.infer.staged_norm`;
    the OpenVINO fp32 export) instead of ``InstanceNormalization``.

    The file is written atomically and checked before it is moved into place. Exporter warnings are
    silenced (see the module docstring). Raises :class:`ConfigError` if the network cannot be exported.
    """
    shape = _check_input_shape(input_shape)
    path = Path(path)
    copy_ = _cpu_eval_copy(network)
    if staged_norm:
        from pipeline.infer.staged_norm import with_staged_norms

        copy_ = with_staged_norms(copy_)
    model = _MainOutput(copy_).eval()
    example = torch.randn((_EXPORT_BATCH, *shape), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=[_INPUT_NAME],
                    output_names=[_OUTPUT_NAME],
                    dynamic_axes=_dynamic_axes(len(shape) - 1, dynamic_spatial),
                    opset_version=OPSET,
                    do_constant_folding=True,
                )
        except Exception as exc:
            raise ConfigError(
                f"ONNX export: expected {type(network).__name__} to export for windows of shape {shape}, "
                f"found an error: {type(exc).__name__}: {first_line(exc)}. "
                "Check that the window shape fits the network (inference.roi_size), "
                "or use the 'torch' backend."
            ) from exc
        _check_onnx_file(tmp)
    log.info("Exported the network to ONNX in %.1f s: %s", time.perf_counter() - started, path)
    return path


def _dynamic_axes(spatial_dims: int, dynamic_spatial: bool) -> dict:
    axes = {0: "batch"}
    if dynamic_spatial:
        axes.update({2 + a: f"spatial{a}" for a in range(spatial_dims)})
    return {_INPUT_NAME: dict(axes), _OUTPUT_NAME: dict(axes)}


def _check_onnx_file(path: Path) -> None:
    """Raise if ``path`` is not a valid ONNX model (onnx.checker if installed, else an ORT session)."""
    try:
        import onnx
    except ImportError:
        _new_session(path, threads=1, optimise=False)
        return
    onnx.checker.check_model(str(path))


# ---- ONNX Runtime ----------------------------------------------------------------------------------


def _require_onnxruntime() -> None:
    if not onnxruntime_available():
        raise ConfigError(
            "Backend 'onnxruntime': expected the onnxruntime package, found it is not installed. "
            "Install it (pip install onnxruntime) or use the 'torch' backend."
        )


def _new_session(path: Path, threads: int, optimise: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _session_input_shape(session) -> tuple:
    return tuple(session.get_inputs()[0].shape[1:])


class OnnxRunner:
    """Run an exported copy of ``network`` with ONNX Runtime on the CPU; a sliding-window predictor.

    Args:
        network: the torch network (not modified; a CPU copy is exported on first use).
        model_sha256: sha256 of the checkpoint the network was loaded from (the cache key).
        input_shape: the window shape without batch, ``(channels, *roi)``.
        threads: ONNX Runtime intra-op threads; default ``torch.get_num_threads()``.
        precision: ``fp32`` (the export) or ``int8`` (its static QDQ quantisation, :mod:`pipeline.infer.quantize`).
        calibration: with ``int8``, the :class:`~pipeline.infer.calibration.Calibration` windows (read only
            when the int8 model is not cached yet).

    Attributes:
        path: the ONNX file run (the int8 one with ``int8``); ``fp32_path``: the cached export.
        exported: True if this construction exported the network (no usable cached file).
    """

    def __init__(self, network: nn.Module, model_sha256: str, input_shape: Sequence[int],
                 threads: int | None = None, precision: str = "fp32", calibration=None):
        _require_onnxruntime()
        self.input_shape = _check_input_shape(input_shape)
        self.fp32_path = self.path = onnx_path(model_sha256, self.input_shape)
        self.threads = int(threads or torch.get_num_threads())
        self.precision = precision
        self.exported = False
        self.session = self._load_or_export(network)
        if precision == "int8":
            self.path = int8_model(self.fp32_path, model_sha256, self.input_shape, calibration)
            self.session = _load_int8(self.path, self.fp32_path, self.threads, calibration)
        self._output_name = self.session.get_outputs()[0].name
        self._input_name = self.session.get_inputs()[0].name

    def _load_or_export(self, network: nn.Module):
        if self.path.is_file():
            try:
                session = _new_session(self.path, self.threads)
                if _session_input_shape(session) == self.input_shape:
                    touch(self.path)
                    return session
                problem = f"input shape {_session_input_shape(session)}, expected {self.input_shape}"
            except Exception as exc:  # onnxruntime raises its own (pybind) exception types
                problem = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            log.warning("Cached ONNX model %s is unusable (%s); exporting it again.", self.path, problem)
            self.path.unlink(missing_ok=True)
        export_onnx(network, self.input_shape, self.path)
        self.exported = True
        prune_cache(keep=[self.path])
        try:
            return _new_session(self.path, self.threads)
        except Exception as exc:
            raise ConfigError(
                f"ONNX Runtime: expected to load the freshly exported model {self.path}, found an error: "
                f"{type(exc).__name__}: {str(exc).strip()[:300]}. Use the 'torch' backend, or update "
                "onnxruntime."
            ) from exc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, *out_spatial)`` (float32) for windows ``x`` of shape ``(B, *input_shape)``."""
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor
            x = x.as_tensor()
        if tuple(x.shape[1:]) != self.input_shape:
            raise ConfigError(
                f"OnnxRunner: expected windows of shape (batch, {', '.join(map(str, self.input_shape))}), "
                f"found {tuple(x.shape)}. The ONNX model is exported for one window size; build the runner "
                "with input_shape = (in_channels, *inference.roi_size) of this run."
            )
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy(), dtype=np.float32)
        (y,) = self.session.run([self._output_name], {self._input_name: array})
        out = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        return out if x.device.type == "cpu" else out.to(x.device)

    def __repr__(self) -> str:
        return (f"OnnxRunner(path={str(self.path)!r}, input_shape={self.input_shape}, threads={self.threads}, "
                f"precision={self.precision!r})")


def cached_export(network: nn.Module, model_sha256: str, input_shape: Sequence[int],
                  staged_norm: bool = False) -> Path:
    """The cached ONNX export of ``network`` (:func:`onnx_path`), exported now if missing or unreadable."""
    path = onnx_path(model_sha256, input_shape, staged_norm)
    if path.is_file():
        try:
            _check_onnx_file(path)
            touch(path)
            return path
        except Exception as exc:  # onnx raises its own exception types
            log.warning("Cached ONNX model %s is unusable (%s); exporting it again.", path, first_line(exc))
            path.unlink(missing_ok=True)
    export_onnx(network, input_shape, path, staged_norm=staged_norm)
    prune_cache(keep=[path])
    return path


def int8_model(fp32_path: Path, model_sha256: str, input_shape: Sequence[int], calibration) -> Path:
    """The cached int8 QDQ model of the export ``fp32_path`` (quantised now if not cached)."""
    from pipeline.infer.quantize import cached_int8, int8_cpu, int8_key

    if calibration is None:
        raise ConfigError(
            "inference.precision int8: expected calibration windows (the checkpoint's training data, or the "
            "case being segmented), found none. Run through Segmenter/NetworkRunner, or use precision fp32."
        )
    key = int8_key(model_sha256, input_shape, calibration, int8_cpu()["reduce_range"])
    return cached_int8(fp32_path, key, calibration)


def _load_int8(path: Path, fp32_path: Path, threads: int, calibration):
    try:
        return _new_session(path, threads)
    except Exception as exc:  # a truncated or foreign cached file: quantised again, once
        from pipeline.infer.quantize import quantize_onnx

        log.warning("Cached int8 model %s is unusable (%s); quantising again.", path, first_line(exc))
        path.unlink(missing_ok=True)
        from pipeline.infer.quantize import int8_cpu

        quantize_onnx(fp32_path, path, calibration.windows(), int8_cpu()["reduce_range"])
        return _new_session(path, threads)


def make_predictor(backend: str, precision: str, network: nn.Module, model_sha256: str,
                   input_shape: Sequence[int], batch: int, calibration=None,
                   torch_forward: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """A callable mapping windows ``(B, *input_shape)`` to logits, on ``backend`` at ``precision``."""
    if backend == "torch":
        if precision != "fp32":
            raise ConfigError(f"Backend 'torch': expected precision fp32, found {precision!r}. int8 runs on "
                              "the 'onnxruntime' or 'openvino' backend.")
        return torch_forward or network
    if backend == "openvino":
        from pipeline.infer.ov_runner import OpenVinoRunner, require_openvino

        require_openvino()
        if precision == "fp32":  # instance norms with staged reductions: OpenVINO's MVN drifts (staged_norm)
            return OpenVinoRunner(cached_export(network, model_sha256, input_shape, staged_norm=True),
                                  input_shape, batch=batch)
        runner = OnnxRunner(network, model_sha256, input_shape, precision=precision, calibration=calibration)
        return OpenVinoRunner(runner.path, input_shape, batch=batch)
    if backend == "onnxruntime":
        return OnnxRunner(network, model_sha256, input_shape, precision=precision, calibration=calibration)
    _check_requested(backend)
    raise ConfigError(f"backend {backend!r}: expected a concrete backend (torch, onnxruntime, openvino), "
                      "found 'auto'; choose it with select_runtime() first.")


# ---- backend choice --------------------------------------------------------------------------------


def _time_forward(forward: Callable[[torch.Tensor], object], x: torch.Tensor,
                  repeats: int = TIMING_REPEATS) -> float:
    """Seconds per call of ``forward(x)``: one warm-up call, then the median of ``repeats`` calls."""
    with torch.inference_mode():
        forward(x)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _check_requested(requested: str) -> None:
    if requested not in BACKENDS:
        listed = ", ".join(repr(b) for b in BACKENDS)
        raise ConfigError(
            f"backend: expected one of {listed}, found {requested!r}. "
            "Set the inference backend to one of them "
            "('auto' measures them on the first run and keeps the fastest that agrees with torch)."
        )


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, found {precision!r}. "
                          "Set inference.precision to fp32 (the default) or int8.")


def _require_cpu(backend: str, device: torch.device) -> None:
    if device.type != "cpu":
        raise ConfigError(
            f"Backend '{backend}': expected the CPU device, found {device}. It runs here on the CPU only; use "
            "the 'torch' (or 'auto') backend on a GPU, or run on the CPU."
        )


def select_runtime(
    requested: str,
    network: nn.Module,
    device: torch.device | str,
    model_sha256: str,
    input_shape: Sequence[int],
    batch: int,
    torch_forward: Callable[[torch.Tensor], object] | None = None,
    precision: str = "fp32",
    calibration=None,
    threshold: float | None = None,
    built: dict | None = None,
) -> tuple[str, str]:
    """``(backend, precision)`` to run ``network`` with.

    ``requested`` is one of :data:`BACKENDS`, ``precision`` one of :data:`PRECISIONS`. Explicit backends
    are taken as given (after checking the package, the device and, for int8, that the backend is not
    torch). ``"auto"`` chooses torch fp32 on a GPU or without ``model_sha256``; otherwise it keeps the
    candidates (torch, onnxruntime, openvino in fp32; with ``precision="int8"`` also both int8 ones)
    whose masks agree with torch fp32 on the ``calibration`` windows and picks the fastest
    (:mod:`pipeline.infer.auto`; measured once per machine setup, cached in :func:`cache_dir`). ``built``:
    a dict that receives the chosen predictor under ``(backend, precision)`` if ``auto`` built it.
    """
    _check_requested(requested)
    _check_precision(precision)
    device = torch.device(device)
    if requested == "torch":
        if precision != "fp32":
            raise ConfigError("Backend 'torch': expected inference.precision fp32, found int8. int8 runs on "
                              "the 'onnxruntime' or 'openvino' backend (or 'auto').")
        return "torch", "fp32"
    if requested in ("onnxruntime", "openvino"):
        if requested == "onnxruntime" or precision == "int8":
            _require_onnxruntime()  # the int8 model is quantised by ONNX Runtime
        if requested == "openvino":
            from pipeline.infer.ov_runner import require_openvino

            require_openvino()
        _require_cpu(requested, device)
        _sha16(model_sha256)  # a clear error now rather than at export time
        if precision == "int8":
            from pipeline.infer.quantize import int8_cpu

            log.info("int8 on %s: CPU %s (reduce_range=%s).", requested, int8_cpu()["isa"],
                     int8_cpu()["reduce_range"])
        return requested, precision

    from pipeline.infer.auto import choose

    return choose(network, device, model_sha256, input_shape, batch, torch_forward or network, precision,
                  calibration, threshold, built)


def select_backend(requested: str, network: nn.Module, device: torch.device | str, model_sha256: str,
                   input_shape: Sequence[int], batch: int,
                   torch_forward: Callable[[torch.Tensor], object] | None = None, **kwargs) -> str:
    """The backend of :func:`select_runtime` (fp32 unless ``precision="int8"`` is passed)."""
    return select_runtime(requested, network, device, model_sha256, input_shape, batch, torch_forward,
                          **kwargs)[0]
