"""``inference.backend: auto``: the fastest backend whose masks agree with torch fp32, measured once.

**Candidates**: ``torch`` and ``onnxruntime`` in fp32 and, only when ``inference.precision: int8`` is set
(int8 is an explicit opt-in), ``onnxruntime-int8`` and ``openvino-int8``. OpenVINO fp32 now agrees with
torch (below) but is not a candidate: at 2 threads it was not faster than torch inside a streamed pass of a
512x512x400 CT although its per-call timing here says it is, and a fresh-clone test run in which ``auto``
compiled OpenVINO models died twice with a segfault that could not be reproduced alone (``inference.backend:
openvino`` is the explicit opt-in). A candidate whose package is missing or that fails to export, quantise, convert, load
or run is skipped with its reason logged and recorded; that is never fatal (torch always remains).

**Speed first**: each candidate is timed on one batch of windows (one warm-up, the median of three;
``backend._time_forward``); those slower than torch are dropped (recorded as such).

**Agreement** (:func:`agreement`): the faster ones, fastest first, run the calibration windows
(:mod:`pipeline.infer.calibration`; without them, the seeded timing batch) and are compared with torch fp32;
the first that agrees is chosen (the slower ones are not checked: on a lesion3d-sized network each check
costs minutes of CPU):
the voxel Dice of the foreground masks (argmax, or ``P(lesion) >= inference.threshold`` for a binary model
with a threshold) per window where either mask has foreground, and the largest absolute difference of
any class probability. A candidate agrees when every such Dice is >= :data:`MIN_DICE` (0.98) and, for an
**fp32** candidate, the largest probability difference is <= :data:`FP32_MAX_DIFFERENCE` (1e-3): an fp32
backend computes the same arithmetic as torch up to rounding, so it must agree up to rounding. This is
measured, not cautious: OpenVINO fp32 on the plain ONNX export differed by up to 0.020 in probability on a
briefly trained lesion3d-sized model and lost a lesion of the reference pass (its MVN sums each instance
norm's statistics in one long fp32 pass); OpenVINO therefore runs an export whose instance norms use staged
reductions (:mod:`pipeline.infer.staged_norm`), which agrees with torch to ~1e-5. int8 (an opt-in already) is held to the Dice floor alone.

The decision, every candidate's time, agreement
figures and skip reason, and the CPU's int8 flags are stored as JSON in ``cache_dir()/backend``, keyed by
everything that changes the answer (checkpoint, window, batch, threads, CPU capability, precision asked,
calibration digest, the candidates, the OpenVINO export and the fused torch path's numerics, library versions); another machine, thread
count or version measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from pipeline.infer import backend as B
from pipeline.infer.cache import cache_dir, prune_cache
from pipeline.model.fused import NUMERICS as FUSED_NUMERICS

log = logging.getLogger(__name__)

MIN_DICE = 0.98
FP32_MAX_DIFFERENCE = 1e-3  # fp32 candidates: the largest |P - P_torch| on the calibration windows
RULE = "dice0.98+fp32diff1e-3"  # in the decision key: a changed rule measures again
FP32_CANDIDATES = ("torch", "onnxruntime")  # OpenVINO fp32: the explicit opt-in (module docstring)
INT8_CANDIDATES = ("onnxruntime-int8", "openvino-int8")

__all__ = ["FP32_CANDIDATES", "FP32_MAX_DIFFERENCE", "INT8_CANDIDATES", "MIN_DICE", "agreement", "choose", "decision_path",
           "split_candidate"]


def split_candidate(name: str) -> tuple[str, str]:
    """``"openvino-int8"`` -> ``("openvino", "int8")``; ``"torch"`` -> ``("torch", "fp32")``."""
    backend, _, precision = name.partition("-")
    return backend, precision or "fp32"


def _versions() -> dict:
    out = {"torch": torch.__version__}
    if B.onnxruntime_available():
        out["onnxruntime"] = B._onnxruntime_version()
    from pipeline.infer.ov_runner import openvino_available, openvino_version

    if openvino_available():
        out["openvino"] = openvino_version()
    return out


def decision_key(model_sha256: str, input_shape, batch: int, precision: str, calibration) -> dict:
    return {
        "model_sha16": B._sha16(model_sha256),
        "input_shape": list(B._check_input_shape(input_shape)),
        "batch": int(batch),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "precision": precision,
        "calibration": f"{calibration.rule}:{calibration.digest}" if calibration is not None else "timing-batch",
        "opset": B.OPSET,
        "rule": RULE,
        "candidates": _candidates(precision),
        "openvino_export": B.STAGED_NORM_TAG.strip("-"),
        "torch_fused": FUSED_NUMERICS,
        **_versions(),
    }


def decision_path(key: dict) -> Path:
    """The JSON file holding the backend decision for ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "backend" / f"{key['model_sha16']}-{B._shape_tag(key['input_shape'])}-{digest}.json"


def _read_decision(path: Path, key: dict) -> Optional[tuple[str, str]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    choice = data.get("choice")
    if choice not in (*FP32_CANDIDATES, *INT8_CANDIDATES):
        return None
    return split_candidate(choice)


def _masks(logits: torch.Tensor, threshold: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground mask, probabilities) of logits (B, C, *spatial)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        probs = torch.sigmoid(logits)
        return probs[:, 0] >= (0.5 if threshold is None else threshold), probs
    probs = torch.softmax(logits, dim=1)
    if threshold is not None and logits.shape[1] == 2:
        return probs[:, 1] >= threshold, probs
    return probs.argmax(1) > 0, probs


def agreement(reference: torch.Tensor, candidate: torch.Tensor, threshold: Optional[float] = None,
              max_difference: Optional[float] = None) -> dict:
    """Per-window foreground Dice and the largest probability difference of ``candidate`` logits against
    the ``reference`` (torch fp32) logits, both (N, C, *spatial). ``max_difference``: the largest
    probability difference that still agrees (fp32 candidates; None: the Dice floor alone)."""
    ref_mask, ref_probs = _masks(reference, threshold)
    got_mask, got_probs = _masks(candidate, threshold)
    dices = []
    for a, b in zip(ref_mask, got_mask):
        total = int(a.sum() + b.sum())
        if total:
            dices.append(2.0 * int((a & b).sum()) / total)
    dice_min = min(dices) if dices else 1.0
    difference = float((ref_probs - got_probs).abs().max())
    return {"dice_min": dice_min, "dice_mean": float(np.mean(dices)) if dices else 1.0,
            "windows": int(ref_mask.shape[0]), "windows_with_foreground": len(dices),
            "max_abs_probability_difference": difference,
            "max_difference_allowed": max_difference,
            "agrees": bool(dice_min >= MIN_DICE and (max_difference is None or difference <= max_difference))}


def _run_batched(forward: Callable, windows: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([forward(windows[i:i + batch]).float().cpu() for i in range(0, len(windows), batch)])


def _candidates(precision: str) -> list[str]:
    return list(FP32_CANDIDATES) + (list(INT8_CANDIDATES) if precision == "int8" else [])


def _skip_reason(name: str) -> Optional[str]:
    backend, precision = split_candidate(name)
    if (backend == "onnxruntime" or precision == "int8" or backend == "openvino") and not B.onnxruntime_available():
        return "onnxruntime is not installed"
    if backend == "openvino":
        from pipeline.infer.ov_runner import openvino_available

        if not openvino_available():
            return "openvino is not installed"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"the ONNX export could not be written to the cache {cache_dir()}: {B.first_line(exc)}"
    return f"{type(exc).__name__}: {B.first_line(exc)}"


def choose(network, device: torch.device, model_sha256: str, input_shape, batch: int,
           torch_forward: Callable, precision: str = "fp32", calibration=None,
           threshold: Optional[float] = None, built: Optional[dict] = None) -> tuple[str, str]:
    """``(backend, precision)`` for ``auto`` (module docstring). ``built``: if given, receives the chosen
    candidate's predictor under ``(backend, precision)`` when it was built here (no second compile)."""
    if device.type != "cpu":
        log.info("Backend auto: torch (device %s).", device)
        return "torch", "fp32"
    if not model_sha256:
        log.info("Backend auto: torch (the network was not loaded from a checkpoint, nothing to cache by).")
        return "torch", "fp32"
    input_shape = B._check_input_shape(input_shape)
    batch = max(1, int(batch))
    key = decision_key(model_sha256, input_shape, batch, precision, calibration)
    path = decision_path(key)
    cached = _read_decision(path, key)
    if cached is not None:
        log.info("Backend auto: %s %s (measured before, %s).", *cached, path)
        return cached

    names = _candidates(precision)
    log.info("Backend auto: checking %s against torch fp32 and timing them on %d window(s) of %s "
             "(once per machine setup)...", ", ".join(names[1:]), batch, input_shape)
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    windows = torch.from_numpy(calibration.windows()) if calibration is not None else x
    seconds, agreed, skipped, predictors = {}, {}, {}, {}
    for name in names:  # 1. build and time every candidate (the slower than torch are dropped at once)
        if name != "torch" and (reason := _skip_reason(name)):
            skipped[name] = reason
            continue
        try:
            forward = _predictor(name, network, model_sha256, input_shape, batch, calibration, torch_forward)
            seconds[name] = B._time_forward(forward, x)
        except Exception as exc:  # any failure of a candidate only removes that candidate
            if name == "torch":
                raise
            skipped[name] = _reason(exc)
            continue
        if name == "torch" or seconds[name] < seconds["torch"]:
            predictors[name] = forward
    # 2. the faster ones, fastest first, against torch fp32 on the calibration windows: the first that agrees
    reference = _run_batched(predictors["torch"], windows, batch)
    choice = "torch"
    for name in sorted((n for n in predictors if n != "torch"), key=seconds.get):
        try:
            fp32 = split_candidate(name)[1] == "fp32"
            agreed[name] = agreement(reference, _run_batched(predictors[name], windows, batch), threshold,
                                     max_difference=FP32_MAX_DIFFERENCE if fp32 else None)
        except Exception as exc:
            skipped[name] = _reason(exc)
            continue
        if agreed[name]["agrees"]:
            choice = name
            break
        skipped[name] = (f"it disagrees with torch fp32 (voxel Dice min {agreed[name]['dice_min']:.4f}, floor "
                         f"{MIN_DICE}; largest probability difference "
                         f"{agreed[name]['max_abs_probability_difference']:.2g}, allowed "
                         f"{agreed[name]['max_difference_allowed'] or 'any'})")
    for name in seconds:
        if name not in agreed and name != "torch" and name not in skipped:
            skipped[name] = ("slower than torch" if seconds[name] >= seconds["torch"]
                             else f"slower than {choice}, which agrees") + " (agreement not checked)"
    for name, reason in skipped.items():  # a slower candidate is routine; a failure or disagreement is not
        (log.info if "not checked" in reason else log.warning)("Backend auto: %s skipped (%s).", name, reason)
    log.info("Backend auto: %s; using %s.",
             ", ".join(f"{n} {s:.3f} s" for n, s in seconds.items()) + f" per batch of {batch}", choice)
    _store(path, key, choice, seconds, agreed, skipped)
    if built is not None:
        built[split_candidate(choice)] = predictors[choice]
    return split_candidate(choice)


def _predictor(name: str, network, model_sha256: str, input_shape, batch: int, calibration, torch_forward):
    """The callable of one candidate (``backend[-precision]``): :func:`backend.make_predictor`."""
    backend, precision = split_candidate(name)
    return B.make_predictor(backend, precision, network, model_sha256, input_shape, batch, calibration,
                            torch_forward)


def _store(path: Path, key: dict, choice: str, seconds: dict, agreed: dict, skipped: dict) -> None:
    from pipeline.infer.quantize import int8_cpu

    try:
        B._write_json_atomic(path, {
            "key": key, "choice": choice, "seconds_per_batch": seconds, "agreement": agreed, "skipped": skipped,
            "cpu": int8_cpu(), "min_dice": MIN_DICE, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        prune_cache(keep=[path])
    except OSError as exc:  # measured again next time
        log.warning("Backend auto: the choice could not be cached (%s).", exc)
