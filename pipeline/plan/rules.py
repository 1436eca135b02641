"""The planning rules, in one place: each a small pure function of fingerprint facts (and the device's
budget) returning ``(value, reason)``. ``plan_dataset`` applies them in order; ``plans.yaml`` carries each
reason beside its value. The rules follow nnU-Net's where our U-Net allows (it pools every axis by 2 at
every level, so a patch axis must be a multiple of ``2**(depth-1)``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from pipeline.plan.cost import unet_cost

ANISOTROPY = 3.0  # nnU-Net: spacings differing more than 3x are anisotropic
ANISOTROPY_2D = 5.0  # beyond this ratio (slices > 5x thicker than the pixels) train on 2D axial slices
MIN_SLICES_3D = 16  # fewer slices (median, at the target spacing) than this: 2D
START_VOXELS = {3: 256**3, 2: 2048**2}  # nnU-Net's initial patch (isotropic in mm), before it is fitted
MIN_BOTTOM = 4  # pool until an axis would drop below 4 voxels at the bottom of the U
MAX_DEPTH = 6
MIN_PATCH = {3: 16, 2: 32}  # an axis is not shrunk below this (voxels)
FEATURES = 32  # nnU-Net's first-level width
MIN_FEATURES = 8
PATCHES_3D = 2  # nnU-Net's 3D batch
MAX_2D_BATCH = 32
MAX_BATCH_DATASET_FRACTION = 0.05  # nnU-Net: a batch covers at most 5% of the dataset's voxels
MIN_STEPS = 500  # the least training worth having (optimiser steps)
VALIDATION_ALLOWANCE = 0.15  # share of the time budget kept for validation
GPU_EPOCHS, GPU_STEPS = 1000, 250  # nnU-Net's schedule (not measured)
MAX_POS_RATIO, MIN_POS_RATIO = 4.0, 0.5
MAX_MIN_COMPONENT_MM3 = 10.0  # never remove predicted components larger than this by default


def target_spacing(spacings: Sequence[Sequence[float]]) -> tuple[list[float], str]:
    """The median spacing per axis; when one axis is more than :data:`ANISOTROPY` times coarser than the
    finest, that axis takes the 10th percentile of its spacings instead (nnU-Net: resample the few thicker
    scans finer rather than the many thin ones coarser), never finer than the other axes' coarsest."""
    values = np.asarray(spacings, dtype=np.float64)
    median = np.median(values, axis=0)
    worst = int(np.argmax(median))
    ratio = float(median[worst] / median.min())
    if ratio <= ANISOTROPY:
        return _round(median), f"median spacing of {len(values)} cases (max/min {ratio:.2f} <= {ANISOTROPY:g})"
    others = [a for a in range(len(median)) if a != worst]
    low_res = max(float(np.percentile(values[:, worst], 10)), float(median[others].max()))
    target = median.copy()
    target[worst] = low_res
    return _round(target), (f"median spacing; anisotropic (axis {worst} {ratio:.2f}x coarser than the finest > "
                            f"{ANISOTROPY:g}): axis {worst} takes the 10th percentile of its spacings")


def median_shape(shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]],
                 target: Sequence[float]) -> list[int]:
    """The median shape of the cases once resampled to ``target``."""
    resampled = np.asarray(shapes, np.float64) * np.asarray(spacings, np.float64) / np.asarray(target, np.float64)
    return [int(round(v)) for v in np.median(resampled, axis=0)]


def spatial_dims(target: Sequence[float], shape: Sequence[int]) -> tuple[int, str]:
    """3D patches, unless the slice axis (the last) is so much coarser (> :data:`ANISOTROPY_2D` x) or so
    short (< :data:`MIN_SLICES_3D` slices) that a 3D U-Net pooling every axis alike has nothing to pool:
    then 2D axial slices."""
    ratio = max(target) / min(target)
    low_res = int(np.argmax(target))
    if low_res == 2 and ratio > ANISOTROPY_2D:
        return 2, f"slices {ratio:.1f}x thicker than the pixels (> {ANISOTROPY_2D:g}): 2D axial slices"
    if shape[2] < MIN_SLICES_3D:
        return 2, f"median {shape[2]} slices (< {MIN_SLICES_3D}): too few for 3D patches, 2D axial slices"
    return 3, f"3D patches (spacing ratio {ratio:.1f} <= {ANISOTROPY_2D:g}, median {shape[2]} slices)"


def depth_for(patch: Sequence[int]) -> int:
    """Levels of the U: pool while every axis keeps >= :data:`MIN_BOTTOM` voxels at the bottom."""
    poolings = min(int(math.floor(math.log2(max(p, 1) / MIN_BOTTOM))) for p in patch)
    return int(min(max(poolings + 1, 2), MAX_DEPTH))


def fit_patch(shape: Sequence[int], target: Sequence[float], dims: int, budget_bytes: float,
              in_channels: int, out_channels: int, patches: int, features: int = FEATURES) -> tuple[dict, str]:
    """Patch size, depth and features fitted to ``budget_bytes`` (nnU-Net's procedure).

    Start from a patch isotropic in mm of :data:`START_VOXELS` voxels, clipped to the median shape; while the
    step's estimated memory (:func:`pipeline.plan.cost.unet_cost`, ``patches`` patches) exceeds the budget,
    shrink the axis largest relative to the median shape (ties: the longest in mm) by one multiple of
    ``2**(depth-1)``; once every axis is at :data:`MIN_PATCH`, halve the features (down to :data:`MIN_FEATURES`).
    ``shape``/``target``: 3 axes (2D: the first two are used).
    """
    shape = [int(s) for s in shape[:dims]]
    spacing = [float(s) for s in target[:dims]]
    inverse = [1.0 / s for s in spacing]
    scale = (START_VOXELS[dims] / float(np.prod(inverse))) ** (1.0 / dims)
    patch = [min(int(round(i * scale)), s) for i, s in zip(inverse, shape)]
    start = list(patch)
    while True:
        depth = depth_for(patch)
        rounded = _round_to(patch, 2 ** (depth - 1))
        need = unet_cost(rounded, features, depth, in_channels, out_channels, deep_supervision=depth > 2).bytes(patches)
        if need <= budget_bytes:
            break
        shrinkable = [a for a in range(dims) if patch[a] > MIN_PATCH[dims]]
        if shrinkable:
            axis = max(shrinkable, key=lambda a: (patch[a] / shape[a], patch[a] * spacing[a]))
            patch[axis] = max(MIN_PATCH[dims], patch[axis] - 2 ** (depth - 1))
        elif features > MIN_FEATURES:
            features //= 2
        else:
            break
    value = {"patch_size": rounded, "depth": depth, "features": features}
    fits = need <= budget_bytes
    reason = (f"memory: {start} (isotropic start within the median shape) -> {rounded}, features {features}: "
              f"estimated {need / 2**30:.2f} GiB for {patches} patch(es) of {budget_bytes / 2**30:.1f} GiB"
              + ("" if fits else " (DOES NOT FIT even at the smallest patch: lower the batch or add memory)"))
    return value, reason


def batch(dims: int, patch: Sequence[int], patch_bytes: float, budget_bytes: float,
          dataset_voxels: float) -> tuple[dict, str]:
    """3D: :data:`PATCHES_3D` patches (nnU-Net), two volumes one patch each. 2D: as many slices as the memory
    holds (``budget_bytes`` left after the parameters, ``patch_bytes`` of activations per slice), at most
    :data:`MAX_2D_BATCH` and :data:`MAX_BATCH_DATASET_FRACTION` of the dataset's voxels, from two volumes."""
    if dims == 3:
        return {"batch_size": 2, "samples_per_volume": 1}, "nnU-Net's 3D batch: 2 patches (2 volumes x 1)"
    by_memory = int(budget_bytes // max(patch_bytes, 1))
    by_data = int(MAX_BATCH_DATASET_FRACTION * dataset_voxels // max(int(np.prod(patch)), 1))
    total = max(2, min(by_memory, by_data, MAX_2D_BATCH))
    per_volume = max(1, total // 2)
    return ({"batch_size": 2, "samples_per_volume": per_volume},
            f"{2 * per_volume} slices per step (memory allows {by_memory}, 5% of the data {by_data}, "
            f"cap {MAX_2D_BATCH}), 2 volumes x {per_volume}")


def schedule(step_seconds: Optional[float], budget_seconds: Optional[float]) -> tuple[dict, str]:
    """Epochs x steps per epoch: every step the time budget holds (less :data:`VALIDATION_ALLOWANCE` for
    validation), 20 epochs or more with 10-250 steps each; without a measurement nnU-Net's 1000 x 250."""
    if step_seconds is None or budget_seconds is None:
        return ({"epochs": GPU_EPOCHS, "steps_per_epoch": GPU_STEPS, "val_every": 50, "warmup_epochs": 5},
                f"not measured: nnU-Net's {GPU_EPOCHS} x {GPU_STEPS} steps (pass --hours to fit a time budget)")
    total = max(1, int(budget_seconds * (1 - VALIDATION_ALLOWANCE) / step_seconds + 1e-6))  # no float shortfall
    steps = int(min(max(total // 20, 10), GPU_STEPS))
    epochs = max(1, total // steps)
    value = {"epochs": epochs, "steps_per_epoch": steps, "val_every": max(1, epochs // 10),
             "warmup_epochs": min(5, max(1, epochs // 50))}
    return value, (f"{step_seconds:.3f} s/step measured: {epochs * steps} steps fill "
                   f"{budget_seconds / 3600:.2f} h less {VALIDATION_ALLOWANCE:.0%} for validation")


def fits_minimum(step_seconds: float, budget_seconds: float) -> bool:
    """Whether at least :data:`MIN_STEPS` steps fit the budget (less the validation allowance)."""
    return step_seconds * MIN_STEPS <= budget_seconds * (1 - VALIDATION_ALLOWANCE) + 1e-9


def learning_rate(total_steps: int) -> tuple[float, str]:
    """AdamW: 1e-3 (our reference); a short training (< 2000 steps) 3e-3 to get somewhere in time."""
    if total_steps < 2000:
        return 0.003, f"short training ({total_steps} steps < 2000): AdamW 3e-3"
    return 0.001, f"{total_steps} steps: AdamW 1e-3"


def normalization(channels: Sequence[str], intensity: dict) -> tuple[list[dict], str]:
    """Per channel (nnU-Net): CT clips to the foreground's 0.5/99.5 percentiles and z-scores with the
    foreground mean/std of the values inside them; any other channel a per-image z-score."""
    out, parts = [], []
    for name in channels:
        stats = intensity.get(name)
        if name.strip().upper() == "CT" and stats:
            out.append({"name": name, "scheme": "ct",
                        "clip": [round(stats["percentile_00_5"], 2), round(stats["percentile_99_5"], 2)],
                        "mean": round(stats["clipped_mean"], 3), "std": round(stats["clipped_std"], 3)})
            parts.append(f"{name}: CT, clip to foreground 0.5/99.5 percentiles + mean/std")
        else:
            out.append({"name": name, "scheme": "zscore"})
            parts.append(f"{name}: per-image z-score")
    return out, "; ".join(parts)


def pos_ratio(class_fractions: dict, cases_with_lesion: float) -> tuple[float, str]:
    """Lesion-centred : random patch centres from the lesion voxels' share ``f`` of the data:
    ``-log10(f) - 1`` (1% -> 1, 0.1% -> 2, 0.01% -> 3), within [:data:`MIN_POS_RATIO`, :data:`MAX_POS_RATIO`]."""
    names = list(class_fractions)
    foreground = float(sum(class_fractions[n] for n in names[1:]))
    if foreground <= 0:
        return 1.0, "no lesion voxel in the training data: 1"
    value = round(min(max(-math.log10(foreground) - 1.0, MIN_POS_RATIO), MAX_POS_RATIO), 1)
    return value, (f"lesions are {foreground:.3%} of the voxels, in {cases_with_lesion:.0%} of the cases: "
                   f"-log10(f) - 1 within [{MIN_POS_RATIO:g}, {MAX_POS_RATIO:g}]")


def min_component_mm3(lesions: dict) -> tuple[float, str]:
    """Half the smallest training lesion (any class), at most :data:`MAX_MIN_COMPONENT_MM3`."""
    volumes = [v for facts in lesions.values() for v in facts["volumes_mm3"]]
    if not volumes:
        return 0.0, "no training lesion: nothing removed"
    smallest = min(volumes)
    value = round(min(0.5 * smallest, MAX_MIN_COMPONENT_MM3), 2)
    return value, (f"half the smallest training lesion ({smallest:.1f} mm3), at most {MAX_MIN_COMPONENT_MM3:g}; "
                   "data-chosen post-processing is set by `medseg cv`")


def overlap(device: str) -> tuple[float, str]:
    """Sliding-window overlap: nnU-Net's 0.5 on every device.

    0.25 runs about a third of the windows in 3D, but its masks failed the accuracy contract against 0.5
    (``medseg bench --levers``: Dice vs the 0.5 pass 0.939 on the worst tall case, a small lesion lost), so
    a CPU plan is made cheaper by the ``inference_budget`` rule (a smaller network or a coarser grid, timed)
    rather than by fewer windows; 0.25 stays an explicit opt-in."""
    if device == "cuda":
        return 0.5, "nnU-Net's 0.5"
    return 0.5, ("nnU-Net's 0.5 (0.25 is ~3x cheaper on a CPU but failed the accuracy contract against 0.5: "
                 "`medseg bench --levers`; opt in by setting it)")


def _round(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def _round_to(patch: Sequence[int], divisor: int) -> list[int]:
    return [max(divisor, (int(p) // divisor) * divisor) for p in patch]


def shrink_for_time(net: dict, samples_per_volume: int, shape: Sequence[int],
                    spacing: Sequence[float]) -> Optional[tuple[dict, int, str]]:
    """One step smaller when training does not fit the time budget: halve the features (down to
    :data:`MIN_FEATURES`), then shrink the patch as :func:`fit_patch` does, then (2D) halve the slices per
    volume. ``None`` when nothing is left to shrink."""
    if net["features"] > MIN_FEATURES:
        return {**net, "features": net["features"] // 2}, samples_per_volume, "halved the features"
    patch = list(net["patch_size"])
    dims = len(patch)
    divisor = 2 ** (net["depth"] - 1)
    shrinkable = [a for a in range(dims) if patch[a] - divisor >= MIN_PATCH[dims]]
    if shrinkable:
        axis = max(shrinkable, key=lambda a: (patch[a] / max(shape[a], 1), patch[a] * spacing[a]))
        patch[axis] -= divisor
        depth = depth_for(patch)
        patch = _round_to(patch, 2 ** (depth - 1))
        return {**net, "patch_size": patch, "depth": depth}, samples_per_volume, f"shrank patch axis {axis}"
    if samples_per_volume > 1:
        return dict(net), samples_per_volume // 2, "halved the slices per volume"
    return None


# --- what the data costs: reading it, caching it, validating on it ---------------------------------

DATA_PASSES = 2.5  # training start: the check reads every case (1), the cache reads and preprocesses it (~1.5)
CACHE_BYTES_PER_VOXEL = 4 + 8  # float32 label + int64 crop indices (lesion / background), beside 4 per channel
CACHE_RAM_FRACTION = 0.5  # the cache may take half the RAM (the training step has its own budget)
MAX_VALIDATION_CASES = 25  # a larger validation set only costs time: its Dice barely moves
DATA_SHARE = 0.25  # reading the training cases may take this share of the time budget
MIN_CASES = 20  # data.max_cases never draws fewer cases than this


def training_budget(budget_seconds: float, read_seconds: float) -> tuple[float, str]:
    """Seconds left for optimiser steps and validation once training has read its data:
    ``budget - DATA_PASSES x`` the time one read of the dataset took here (the fingerprint's)."""
    data = DATA_PASSES * read_seconds
    left = max(budget_seconds - data, 0.25 * budget_seconds)
    return left, (f"{budget_seconds / 60:.1f} min budget less {data / 60:.1f} min for the data "
                  f"({DATA_PASSES:g} reads at {read_seconds:.0f} s each, measured)")


def case_count(num_cases: int, read_seconds: float, bytes_per_case: float, budget_seconds: Optional[float],
               ram_bytes: Optional[float]) -> tuple[int, str]:
    """``data.max_cases``: every case, unless reading them (:data:`DATA_PASSES` reads at ``read_seconds`` a
    case, measured here) would take more than :data:`DATA_SHARE` of the time budget, or their preprocessed
    cache (``bytes_per_case``) more than :data:`CACHE_RAM_FRACTION` of the RAM; then as many cases as fit
    both, at least :data:`MIN_CASES` (0 = all). A CPU budget holds a few thousand patches: a larger dataset
    adds reading time, and memory, but not much that the training could learn from."""
    limits = []
    if budget_seconds is not None and read_seconds > 0:
        by_time = int(DATA_SHARE * budget_seconds // (DATA_PASSES * read_seconds))
        limits.append((by_time, f"reading {DATA_PASSES:g}x at {read_seconds:.1f} s a case (measured) fits "
                                f"{DATA_SHARE:.0%} of the {budget_seconds / 60:.0f} min budget for {by_time} cases"))
    if ram_bytes is not None and bytes_per_case > 0:
        by_ram = int(CACHE_RAM_FRACTION * ram_bytes // bytes_per_case)
        limits.append((by_ram, f"the cache holds {by_ram} cases of {bytes_per_case / 2**20:.0f} MiB in "
                               f"{CACHE_RAM_FRACTION:.0%} of the RAM"))
    if not limits or min(n for n, _ in limits) >= num_cases:
        return 0, f"all {num_cases} cases" + (f" ({'; '.join(r for _, r in limits)})" if limits else "")
    n, _ = min(limits)
    chosen = max(MIN_CASES, n)
    if chosen >= num_cases:
        return 0, f"all {num_cases} cases (at least {MIN_CASES}; {'; '.join(r for _, r in limits)})"
    return chosen, (f"{chosen} of the {num_cases} cases, a seeded draw ({'; '.join(r for _, r in limits)}"
                    f"{'' if chosen == n else f'; at least {MIN_CASES}'})")


def cache(num_cases: int, channels: int, shape: Sequence[int], ram_bytes: Optional[float]) -> tuple[bool, str]:
    """Keep the preprocessed training set in memory where it fits :data:`CACHE_RAM_FRACTION` of the RAM
    (per voxel: 4 bytes per channel + the label and its crop indices); else read each volume as drawn."""
    voxels = float(np.prod([int(s) for s in shape]))
    need = num_cases * voxels * (4 * channels + CACHE_BYTES_PER_VOXEL)
    if ram_bytes is None:
        return True, f"RAM unknown; the cache needs about {need / 2**30:.1f} GiB"
    allowed = CACHE_RAM_FRACTION * ram_bytes
    if need <= allowed:
        return True, f"the preprocessed cases take about {need / 2**30:.1f} GiB, within {allowed / 2**30:.1f} GiB"
    return False, (f"the preprocessed cases would take about {need / 2**30:.1f} GiB, more than "
                   f"{CACHE_RAM_FRACTION:.0%} of the RAM: each volume is read as it is drawn")


def validation(num_cases: int, step_seconds: Optional[float], patches_per_step: int, shape: Sequence[int],
               patch: Sequence[int], overlap_fraction: float, epochs: int,
               seconds: Optional[float]) -> tuple[dict, str]:
    """``data.val_fraction`` and ``train.val_every``: 20% of the cases (at most
    :data:`MAX_VALIDATION_CASES`), validated as often as :data:`VALIDATION_ALLOWANCE` of the time allows
    (a window's forward pass ~ a third of a training step's per patch), at most 10 times, at least at the end."""
    val_cases = max(1, min(round(0.2 * num_cases), MAX_VALIDATION_CASES)) if num_cases > 1 else 0
    fraction = round(val_cases / num_cases, 3) if num_cases else 0.2
    if step_seconds is None or seconds is None or val_cases == 0:
        return {"val_fraction": fraction, "val_every": max(1, epochs // 10)}, f"{val_cases} validation cases"
    step = [max(1, int(p * (1 - overlap_fraction))) for p in patch]
    windows = int(np.prod([max(1, math.ceil((max(s, p) - p) / st) + 1) for s, p, st in zip(shape, patch, step)]))
    windows *= int(np.prod([int(s) for s in shape[len(patch):]]))  # 2D: every slice
    per_case = windows * step_seconds / (3 * max(patches_per_step, 1))
    runs = int(min(10, max(1, VALIDATION_ALLOWANCE * seconds // max(per_case * val_cases, 1e-9))))
    value = {"val_fraction": fraction, "val_every": max(1, math.ceil(epochs / runs))}
    return value, (f"{val_cases} validation cases of ~{windows} windows (~{per_case:.0f} s each): "
                   f"{runs} validation(s) fit {VALIDATION_ALLOWANCE:.0%} of the time")


# --- inference time: the planned network at the planned spacing, window by window -----------------

INFER_SECONDS_CPU = 30.0  # default --infer-seconds with --device cpu (issue 14: a CT in 30 s on a 2-core CPU)
MIN_INFER_DEPTH = 3  # the inference budget removes levels down to this (a 2-level U-Net sees too little)
MAX_COARSEN = 2.0  # the budget coarsens the spacing to at most this x the median spacing, per axis
COARSEN_STEPS = (1.25, 1.5, 1.75, 2.0)  # factors on the target spacing, tried in turn
CT_SHAPE, CT_SPACING = (512, 512, 400), (0.8, 0.8, 1.0)  # `medseg bench`'s large CT, reported beside


def window_count(shape: Sequence[int], roi: Sequence[int], overlap_fraction: float) -> int:
    """Sliding windows ``medseg segment`` runs over a preprocessed grid of ``shape`` (3 axes) with windows
    ``roi`` (2D: every slice) at ``overlap_fraction``: MONAI's grid (:class:`~pipeline.infer.windows.WindowGrid`)."""
    from pipeline.infer.windows import WindowGrid

    roi = [int(r) for r in roi] + [1] * (len(shape) - len(roi))
    return len(WindowGrid(tuple(int(s) for s in shape), tuple(roi), float(overlap_fraction)))


def _smaller_for_inference(net: dict, spacing: list[float], target: Sequence[float],
                           median_spacing: Sequence[float]) -> Optional[tuple[dict, list[float], str]]:
    """The next step down for a faster inference, in this order: halve the features (down to
    :data:`MIN_FEATURES`), then drop a level (down to :data:`MIN_INFER_DEPTH`), then coarsen the spacing
    (the target x :data:`COARSEN_STEPS`, each axis at most :data:`MAX_COARSEN` x its median spacing).
    The overlap is kept. ``None`` when nothing is left."""
    if net["features"] > MIN_FEATURES:
        return {**net, "features": max(MIN_FEATURES, net["features"] // 2)}, spacing, "halved the features"
    if net["depth"] > MIN_INFER_DEPTH:
        return {**net, "depth": net["depth"] - 1}, spacing, "dropped a level"
    for factor in COARSEN_STEPS:
        coarser = _round([min(t * factor, MAX_COARSEN * m) for t, m in zip(target, median_spacing)])
        if all(c >= s for c, s in zip(coarser, spacing)) and coarser != list(spacing):
            return dict(net), coarser, f"coarsened the spacing {factor:g}x"
    return None


def _patch_within(patch: Sequence[int], shape: Sequence[int], depth: int) -> list[int]:
    """``patch`` no larger than ``shape`` needs: an axis longer than the grid shrinks to the grid rounded up
    to the pooling (a little padding, one window on that axis)."""
    divisor = 2 ** (depth - 1)
    return [min(int(p), max(divisor, -(-int(s) // divisor) * divisor)) for p, s in zip(patch, shape)]


def inference_budget(net: dict, target: Sequence[float], median_spacing: Sequence[float],
                     shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]], overlap_fraction: float,
                     budget_seconds: Optional[float], seconds_per_window,
                     ct_shape: Sequence[int] = CT_SHAPE, ct_spacing: Sequence[float] = CT_SPACING,
                     body_fraction: Optional[Sequence[float]] = None, crop_margin: int = 0) -> tuple[dict, str]:
    """The network and spacing whose ``medseg segment`` (network time) of the median training case fits
    ``budget_seconds`` (``None``: not budgeted, only estimated).

    Estimate = windows of the median case at the candidate spacing (:func:`window_count`, the overlap as
    planned) x ``seconds_per_window(net)`` (measured: :func:`pipeline.plan.inference.window_timer`; a fake
    in tests). Over budget, step down (:func:`_smaller_for_inference`: features, then depth, then spacing)
    until it fits; when nothing fits, keep the fastest candidate and say so. The same figures for
    ``ct_shape`` at ``ct_spacing`` (`medseg bench`'s 512x512x400 CT, its whole grid) are reported beside.
    ``body_fraction`` (per axis, :func:`pipeline.plan.inference.body_fraction`): the share of the grid the
    crop to the body keeps; then the median case is that share of the median shape plus ``crop_margin``
    voxels each side (what ``preprocess.crop_foreground`` leaves ``segment`` to run over).

    Returns ``{"net": {patch_size, depth, features}, "spacing": [...], "estimate": {...}, "tried": [...],
    "changed": [keys], "fits": bool}`` and the reason.
    """
    def evaluate(candidate: dict, spacing: list[float], step: str) -> dict:
        full = median_shape(shapes, spacings, spacing)
        shape = full if body_fraction is None else [
            min(n, max(1, int(round(n * f))) + 2 * int(crop_margin)) for n, f in zip(full, body_fraction)]
        dims = len(candidate["patch_size"])
        candidate = {**candidate, "patch_size": _patch_within(candidate["patch_size"], shape[:dims],
                                                              candidate["depth"])}
        per_window = float(seconds_per_window(candidate))
        windows = window_count(shape, candidate["patch_size"], overlap_fraction)
        ct_grid = [max(1, int(round(n * s / t))) for n, s, t in zip(ct_shape, ct_spacing, spacing)]
        ct_windows = window_count(ct_grid, candidate["patch_size"], overlap_fraction)
        return {"step": step, "features": candidate["features"], "depth": candidate["depth"],
                "patch_size": list(candidate["patch_size"]), "spacing": list(spacing), "median_shape": full,
                "segment_shape": shape,
                "overlap": overlap_fraction, "seconds_per_window": round(per_window, 5), "windows": windows,
                "estimated_seconds": round(windows * per_window, 2),
                "ct_shape": list(ct_shape), "ct_spacing": list(ct_spacing), "ct_grid": ct_grid,
                "ct_windows": ct_windows, "ct_estimated_seconds": round(ct_windows * per_window, 2)}

    def fits(row: dict) -> bool:
        return budget_seconds is None or row["estimated_seconds"] <= budget_seconds

    current, spacing = {k: net[k] for k in ("patch_size", "depth", "features")}, _round(target)
    tried = [evaluate(current, spacing, "as planned")]
    while not fits(tried[-1]):
        smaller = _smaller_for_inference(current, spacing, target, median_spacing)
        if smaller is None:
            break
        current, spacing, step = smaller
        tried.append(evaluate(current, spacing, step))
    ok = fits(tried[-1])
    chosen = tried[-1] if ok else min(tried, key=lambda row: row["estimated_seconds"])
    first = tried[0]
    changed = [key for key, row_key in (("model.features", "features"), ("model.depth", "depth"),
                                        ("sampling.patch_size", "patch_size"), ("preprocess.spacing", "spacing"))
               if chosen[row_key] != first[row_key]]
    if "sampling.patch_size" in changed:
        changed.append("inference.roi_size")
    figures = (f"est. {chosen['estimated_seconds']:.1f} s network time for the median case "
               f"({chosen['windows']} windows x {chosen['seconds_per_window']:.3f} s measured), "
               f"{chosen['ct_estimated_seconds']:.0f} s for a 512x512x400 CT ({chosen['ct_windows']} windows)")
    if budget_seconds is None:
        reason = f"inference not budgeted: {figures}"
    elif len(tried) == 1:
        reason = f"inference fits {budget_seconds:g} s as planned: {figures}"
    else:
        steps = []
        for key, row_key in (("features", "features"), ("depth", "depth"), ("patch", "patch_size"),
                             ("spacing", "spacing")):
            if chosen[row_key] != first[row_key]:
                steps.append(f"{key} {first[row_key]} -> {chosen[row_key]}")
        reason = (f"inference budget {budget_seconds:g} s (est. {first['estimated_seconds']:.1f} s as planned): "
                  + ", ".join(steps) + f": {figures}")
        if not ok:
            reason += (f"; DOES NOT FIT even at features {MIN_FEATURES}, depth {MIN_INFER_DEPTH} and "
                       f"{MAX_COARSEN:g}x the median spacing: kept the fastest")
    estimate = {**chosen, "budget_seconds": budget_seconds, "fits": ok}
    value = {"net": {"patch_size": chosen["patch_size"], "depth": chosen["depth"], "features": chosen["features"]},
             "spacing": chosen["spacing"], "estimate": estimate, "tried": tried, "changed": changed, "fits": ok}
    return value, reason
