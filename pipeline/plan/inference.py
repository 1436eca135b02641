"""Measured inference windows: how long one sliding window of a planned network takes on this machine.

A window is what ``medseg segment`` runs on a CPU (:class:`~pipeline.infer.runner.NetworkRunner`): the
U-Net in eval mode, fused for inference (:func:`~pipeline.model.fused.fuse_for_inference`, channels-last
where it pays), float32 under ``inference_mode``, :data:`WINDOW_BATCH` windows per call, with the torch
threads this process has (``torch.get_num_threads()``, as segment runs in it). The figure is the median
of :data:`REPEATS` calls after one warm-up call, divided by the windows per call. The rule that uses it,
:func:`pipeline.plan.rules.inference_budget`, multiplies it by the windows a case needs. The budget is on
wall-clock time (what a user waits); the process CPU time of the same calls is recorded beside it
(:func:`window_timer`'s ``cpu``), since on a shared machine the wall time also counts the waiting.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

REPEATS = 5
WINDOW_BATCH = 2  # segment's windows per network call on a CPU (inference.sw_batch_size, at least 2)
MAX_MEASURED_CALL_S = 10.0  # a warm-up call longer than this is not repeated (keeps planning quick)
BODY_CASES = 3  # cases preprocessed to find how much of the grid the crop to the body keeps


def measure_window(patch: Sequence[int], features: int, depth: int, in_channels: int, out_channels: int,
                   device: str = "cpu", repeats: int = REPEATS, batch: int = WINDOW_BATCH) -> float:
    """Median seconds per window of the planned U-Net's inference forward pass on ``patch`` windows."""
    return time_window(patch, features, depth, in_channels, out_channels, device, repeats, batch)[0]


def time_window(patch: Sequence[int], features: int, depth: int, in_channels: int, out_channels: int,
                device: str = "cpu", repeats: int = REPEATS, batch: int = WINDOW_BATCH) -> tuple[float, float]:
    """``(wall, cpu)``: median wall-clock and process CPU seconds per window (see :func:`measure_window`)."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.model import build_model
    from pipeline.model.fused import fuse_for_inference

    target = torch.device(device)
    cfg = ModelConfig(spatial_dims=len(patch), features=int(features), depth=int(depth), deep_supervision=False)
    model = build_model(cfg, in_channels, out_channels).to(target).eval()
    fast = fuse_for_inference(model, target)
    x = torch.randn((batch, in_channels, *[int(p) for p in patch]), generator=torch.Generator().manual_seed(0))
    x = x.to(target)

    def call() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            fast(x).float()
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        return time.perf_counter() - start, time.process_time() - cpu

    first = call()
    runs = [first] if first[0] > MAX_MEASURED_CALL_S else [call() for _ in range(repeats)]
    return (statistics.median(r[0] for r in runs) / batch, statistics.median(r[1] for r in runs) / batch)


def window_timer(in_channels: int, out_channels: int, device: str = "cpu") -> Callable[[dict], float]:
    """``net -> seconds per window`` (``net``: patch_size, features, depth), each network measured once;
    ``.cpu(net)``: its CPU seconds per window, ``.threads``: torch's threads here."""
    import torch

    measured: dict = {}

    def key_of(net: dict) -> tuple:
        return tuple(int(p) for p in net["patch_size"]), int(net["features"]), int(net["depth"])

    def seconds(net: dict) -> float:
        key = key_of(net)
        if key not in measured:
            measured[key] = time_window(key[0], key[1], key[2], in_channels, out_channels, device)
        return measured[key][0]

    def cpu(net: dict) -> float:
        seconds(net)
        return measured[key_of(net)][1]

    seconds.threads = torch.get_num_threads()  # type: ignore[attr-defined]
    seconds.measured = measured  # type: ignore[attr-defined]
    seconds.cpu = cpu  # type: ignore[attr-defined]
    return seconds


def body_fraction(dataset, cases: Sequence[dict], channels: Sequence[str], norms: Sequence[dict],
                  target: Sequence[float], orientation: str = "RAS", margin: int = 4,
                  count: int = BODY_CASES) -> Optional[list[float]]:
    """Per axis, the median share of the grid (at ``target``) that preprocessing's crop to the body keeps,
    its ``margin`` voxels excluded: ``count`` of the fingerprint's ``cases`` (those nearest the median
    volume) run through the real preprocessing (:func:`~pipeline.transforms.preprocess.preprocess_transforms`
    with the planned normalisation ``norms``), as ``segment`` and training run it. None: no case read."""
    import numpy as np

    from pipeline.config import ChannelNormConfig, IntensityConfig, PreprocessConfig
    from pipeline.dataset.layout import read_dataset
    from pipeline.training.dataset_config import dataset_items
    from pipeline.transforms.preprocess import preprocess_transforms

    items = {item["case_id"]: item for item in dataset_items(read_dataset(dataset)) if item["label"]}
    cfg = PreprocessConfig(orientation=orientation, spacing=[float(t) for t in target],
                           intensity=IntensityConfig(mode="auto", channels=[ChannelNormConfig(**n) for n in norms]),
                           crop_foreground=True, crop_margin=int(margin))
    transform = preprocess_transforms(cfg, channels=list(channels))
    volumes = [float(np.prod(np.asarray(c["shape"], float) * np.asarray(c["spacing"], float))) for c in cases]
    middle = float(np.median(volumes)) if volumes else 0.0
    picked = sorted(range(len(cases)), key=lambda i: abs(volumes[i] - middle))[:count]
    fractions = []
    for i in picked:
        case = cases[i]
        if case["case_id"] not in items:
            continue
        cropped = transform({"image": items[case["case_id"]]["image"]})["image"].shape[1:]
        full = [max(1, int(round(n * s / t))) for n, s, t in zip(case["shape"], case["spacing"], target)]
        fractions.append([min(1.0, max(0.0, (c - 2 * margin) / f)) for c, f in zip(cropped, full)])
    if not fractions:
        return None
    return [round(float(v), 4) for v in np.median(np.asarray(fractions), axis=0)]
