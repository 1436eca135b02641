"""``plan_dataset``: a complete training config chosen from the dataset itself (as nnU-Net plans).

The skeleton: check the dataset → fingerprint it (:mod:`~pipeline.plan.fingerprint`) → apply the rules
(:mod:`~pipeline.plan.rules`) → on a CPU, or with ``hours``, time real training steps and fit the training
into the budget (:mod:`~pipeline.plan.timing`) → write ``plans.yaml`` and ``fingerprint.json``
(:mod:`~pipeline.plan.write`). Every planned value can be changed afterwards: edit ``plans.yaml``, or pass
dotted overrides to ``medseg train plans.yaml key=value``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pipeline.errors import ConfigError, InputError
from pipeline.plan import rules
from pipeline.plan.cost import unet_cost
from pipeline.plan.write import Choice, flat_choices, write_fingerprint, write_plans

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
CPU_HOURS = 0.5  # default time budget on a CPU: 30 minutes of training, validation included
ORIENTATION = "RAS"
SEED = 0  # train.seed of the plan: data.max_cases draws its cases with it
CROP_MARGIN = 4  # preprocess.crop_margin of the plan
MAX_PROBLEMS_SHOWN = 8


@dataclass
class PlanResult:
    out_dir: Path
    plans: Path  # plans.yaml
    fingerprint: Path  # fingerprint.json
    config: Any  # the pipeline.config.Config plans.yaml loads as
    choices: list[tuple[str, Any, str]] = field(default_factory=list)  # (dotted key, value, reason)
    step_seconds: Optional[float] = None  # measured training step (None: not measured)
    inference_estimate: Optional[dict] = None  # fingerprint.json's inference_estimate (None: not estimated)


def default_out_dir(dataset: Union[str, Path]) -> Path:
    """``runs/plan/<dataset folder name>`` (relative to the working directory)."""
    return Path("runs") / "plan" / Path(dataset).resolve().name


def plan_dataset(dataset: Union[str, Path], out_dir: Union[str, Path, None] = None, device: str = "cpu",
                 memory_gb: Optional[float] = None, hours: Optional[float] = None, *, check: bool = True,
                 progress: bool = False, infer_seconds: Optional[float] = None) -> PlanResult:
    """Plan training on ``dataset``; write ``plans.yaml`` and ``fingerprint.json`` into ``out_dir``.

    ``device``: where training will run (``cpu``: steps are timed here and the training fits ``hours``,
    default 0.5; ``cuda``: timed only when ``hours`` is given, else nnU-Net's schedule). ``memory_gb``:
    the memory a training step may use (default: :func:`pipeline.plan.memory.memory_budget`). ``check``:
    refuse a dataset with problems (:func:`pipeline.dataset.check_dataset`), listing them.
    ``infer_seconds``: the network time ``medseg segment`` may take on the median training case
    (:func:`pipeline.plan.rules.inference_budget`, window time measured here); default
    :data:`~pipeline.plan.rules.INFER_SECONDS_CPU` on ``cpu``, none on ``cuda``; 0: not budgeted (on ``cpu``
    still estimated). The estimate is ``fingerprint.json``'s ``inference_estimate``.
    """
    from pipeline.plan.fingerprint import dataset_fingerprint
    from pipeline.plan.memory import memory_budget

    if device not in DEVICES:
        raise ConfigError(f"plan device {device!r}: expected one of {', '.join(DEVICES)}")
    if hours is not None and hours <= 0:
        raise ConfigError(f"plan hours {hours!r}: expected a number of hours > 0, e.g. 0.5")
    if infer_seconds is not None and infer_seconds < 0:
        raise ConfigError(f"plan infer_seconds {infer_seconds!r}: expected seconds >= 0 (0: no inference budget)")
    if device == "cuda" and infer_seconds and not _cuda_available():
        raise ConfigError("--infer-seconds on --device cuda times inference windows on the GPU, but no CUDA GPU is "
                          "visible here: plan on the GPU machine, or drop --infer-seconds")
    if device == "cuda" and hours is not None and not _cuda_available():
        raise ConfigError("--hours on --device cuda times training steps on the GPU, but no CUDA GPU is visible "
                          "here: plan on the GPU machine, or drop --hours (nnU-Net's schedule, not measured)")
    began = time.perf_counter()
    draw = _case_draw(dataset, (hours if hours is not None else CPU_HOURS) * 3600
                      if device == "cpu" or hours is not None else None)
    if check:
        _check(dataset, draw["case_ids"])
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(dataset)
    read_began = time.perf_counter()
    fingerprint = dataset_fingerprint(dataset, ORIENTATION, progress=progress, case_ids=draw["case_ids"])
    fingerprint["case_draw"] = {k: v for k, v in draw.items() if k != "case_ids"}
    # one read of the dataset here: training reads it again (check, cache), inside the time budget
    fingerprint["read_seconds"] = round(time.perf_counter() - read_began, 2)
    fingerprint["check_seconds"] = round(read_began - began, 2)
    if not fingerprint["num_cases"]:
        raise InputError(f"the dataset '{dataset}' has no training case with a label: nothing to plan from")
    fingerprint_path = write_fingerprint(fingerprint, out_dir / "fingerprint.json")
    budget, budget_reason = memory_budget(device, memory_gb)
    plan, step_seconds = _plan(fingerprint, out_dir, device, budget, budget_reason, hours, infer_seconds)
    if "inference_estimate" in fingerprint:
        fingerprint_path = write_fingerprint(fingerprint, out_dir / "fingerprint.json")
    header = (f"Planned by `medseg plan {fingerprint['dataset']}` for {device}"
              f" ({budget_reason}; {_budget_text(device, hours)}).\n"
              "Train it as it is: medseg train plans.yaml   (change any value here, or override it: "
              "medseg train plans.yaml train.epochs=50)\n"
              "data.root and train.out_dir are absolute paths, so it trains from any folder. "
              "The dataset's facts: fingerprint.json.\n"
              "Post-processing chosen from the data (a postprocess section) is set by `medseg cv`.")
    plans_path = out_dir / "plans.yaml"
    config = write_plans(plan, plans_path, header)
    return PlanResult(out_dir, plans_path, fingerprint_path, config, list(flat_choices(plan)), step_seconds,
                      fingerprint.get("inference_estimate"))


def _case_draw(dataset, budget_seconds: Optional[float]) -> dict:
    """``data.max_cases`` (:func:`pipeline.plan.rules.case_count`) from a timed read of a few cases, and the
    ids of the cases drawn (None: all), which the plan checks and fingerprints: the cases training will see."""
    from pipeline.dataset.layout import read_dataset
    from pipeline.plan.fingerprint import probe_reads
    from pipeline.plan.memory import ram_bytes
    from pipeline.training.data import select_cases
    from pipeline.training.dataset_config import dataset_items

    listed = read_dataset(dataset)
    items = [item for item in dataset_items(listed) if item["label"]]
    if listed.problems or len(items) <= rules.MIN_CASES:
        # a small dataset is read whole (a broken layout: the check lists its problems)
        return {"max_cases": 0, "reason": f"all {len(items)} cases", "read_seconds_per_case": None, "case_ids": None}
    channels = max(1, len(listed.channel_names))
    probe = probe_reads(items, channels)
    per_case = probe.voxels * (4 * channels + rules.CACHE_BYTES_PER_VOXEL)
    n, reason = rules.case_count(len(items), probe.seconds, per_case, budget_seconds, ram_bytes())
    ids = [item["case_id"] for item in select_cases(items, n, SEED)] if n else None
    if n:
        log.info("planning on %d of %d cases: %s", n, len(items), reason)
    return {"max_cases": n, "reason": reason, "read_seconds_per_case": round(probe.seconds, 3), "case_ids": ids}


def _check(dataset, case_ids=None) -> None:
    from pipeline.dataset import check_dataset

    report = check_dataset(dataset, case_ids=case_ids)
    if not report.ok:
        lines = report.lines()
        shown = "; ".join(lines[:MAX_PROBLEMS_SHOWN]) + (f"; ... ({len(lines)} in all)"
                                                          if len(lines) > MAX_PROBLEMS_SHOWN else "")
        raise InputError(f"the dataset '{dataset}' has {len(lines)} problem(s): {shown}. Run `medseg check "
                         f"{dataset}` for the full list, fix them, and plan again")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _budget_text(device: str, hours: Optional[float]) -> str:
    if hours is not None:
        return f"{hours:g} h of training"
    return f"{CPU_HOURS:g} h of training" if device == "cpu" else "training time not budgeted"


def _plan(fp: dict, out_dir: Path, device: str, budget: float, budget_reason: str,
          hours: Optional[float], infer_seconds: Optional[float] = None) -> tuple[dict, Optional[float]]:
    """The plan tree (sections of :class:`Choice`) and the measured step time."""
    from pipeline.plan.timing import fit_time_budget

    spacings = [case["spacing"] for case in fp["cases"]]
    shapes = [case["shape"] for case in fp["cases"]]
    channels, labels = fp["channels"], fp["labels"]
    in_ch, out_ch = len(channels), len(labels)
    target, target_reason = rules.target_spacing(spacings)
    shape = rules.median_shape(shapes, spacings, target)
    dims, dims_reason = rules.spatial_dims(target, shape)
    net, net_reason = rules.fit_patch(shape, target, dims, budget, in_ch, out_ch, patches=2)
    cost = unet_cost(net["patch_size"], net["features"], net["depth"], in_ch, out_ch, net["depth"] > 2)
    dataset_voxels = sum(float(s[0]) * s[1] * s[2] for s in shapes)
    # the parameters (and their gradients and moments) are there once, whatever the batch
    sizes, batch_reason = rules.batch(dims, net["patch_size"], cost.bytes(1) - cost.bytes(0),
                                      budget - cost.bytes(0), dataset_voxels)
    net_reason = f"{net_reason}; {budget_reason}"
    step_seconds = None
    seconds, data_reason = None, ""
    budget_minutes = ((hours if hours is not None else CPU_HOURS) * 60) if device == "cpu" or hours is not None else None
    if device == "cpu" or hours is not None:
        seconds, data_reason = rules.training_budget((hours if hours is not None else CPU_HOURS) * 3600,
                                                     max(fp.get("read_seconds", 0.0), fp.get("check_seconds", 0.0)))
        timed = fit_time_budget(net, sizes["samples_per_volume"], sizes["batch_size"], shape[:dims], target[:dims],
                                in_ch, out_ch, seconds, device)
        net, step_seconds = timed.net, timed.step_seconds
        if timed.samples_per_volume != sizes["samples_per_volume"]:
            sizes = {**sizes, "samples_per_volume": timed.samples_per_volume}
            batch_reason += f"; {timed.reason}"
        net_reason = f"{net_reason}; {timed.reason}"
        sched, sched_reason = rules.schedule(step_seconds, seconds)
        sched_reason = f"{sched_reason} ({data_reason})"
    else:
        sched, sched_reason = rules.schedule(None, None)
    overlap, overlap_reason = rules.overlap(device)
    norms, norm_reason = rules.normalization(channels, fp["intensity"])
    infer = _inference_budget(fp, net, target, shapes, spacings, overlap, device, infer_seconds, in_ch, out_ch,
                              norms)
    infer_reasons: dict = {}
    if infer is not None:
        infer_value, infer_reason = infer
        fp["inference_estimate"] = {**infer_value["estimate"], "threads": infer_value["threads"],
                                    "reason": infer_reason, "tried": infer_value["tried"]}
        infer_reasons = {key: f"; {infer_reason}" for key in infer_value["changed"]}
        if infer_value["changed"]:
            from pipeline.plan.timing import measure_step

            net, target = {**net, **infer_value["net"]}, infer_value["spacing"]
            target_reason += infer_reasons.get("preprocess.spacing", "")
            shape = rules.median_shape(shapes, spacings, target)
            if step_seconds is not None:  # the smaller network trains faster: measure it, refill the budget
                # (never slower than the larger one was measured: a slower figure is the machine's load)
                step_seconds = min(step_seconds, measure_step(net["patch_size"], net["features"], net["depth"],
                                                              in_ch, out_ch,
                                                              sizes["batch_size"] * sizes["samples_per_volume"],
                                                              device))
                sched, sched_reason = rules.schedule(step_seconds, seconds)
                sched_reason = f"{sched_reason} ({data_reason}; re-timed after the inference budget)"
        else:
            infer_reasons = {"inference.roi_size": f"; {infer_reason}"}
    lr, lr_reason = rules.learning_rate(sched["epochs"] * sched["steps_per_epoch"])
    pos, pos_reason = rules.pos_ratio(fp["class_fractions"], fp["cases_with_lesion_fraction"])
    min_mm3, min_reason = rules.min_component_mm3(fp["lesions"])
    from pipeline.plan.memory import ram_bytes

    cached, cache_reason = rules.cache(fp["num_cases"], in_ch, shape, ram_bytes())
    val, val_reason = rules.validation(fp["num_cases"], step_seconds,
                                       sizes["batch_size"] * sizes["samples_per_volume"], shape,
                                       list(net["patch_size"]), overlap, sched["epochs"], seconds)
    deep = net["depth"] > 2
    from pipeline.plan.channels import channel_rules

    channel_list, channel_notes, channel_reason = channel_rules(channels)
    patch = list(net["patch_size"])
    plan = {
        "data": {
            "root": Choice(fp["dataset"], "the planned dataset (absolute path)"),
            "labels": Choice(labels, "from the dataset"),
            "channels": Choice(channels, "from the dataset, in order"),
            "max_cases": Choice(fp.get("case_draw", {}).get("max_cases", 0),
                                fp.get("case_draw", {}).get("reason", "all cases")),
            "val_fraction": Choice(val["val_fraction"], val_reason),
            "val_cases": [],
        },
        "preprocess": {
            "orientation": ORIENTATION,
            "spacing": Choice(target, target_reason),
            "intensity": {"mode": Choice("auto", "per channel by name"),
                          "window": [-150.0, 250.0],
                          "channels": Choice(norms, norm_reason)},
            "crop_foreground": True,
            "crop_margin": CROP_MARGIN,
        },
        "model": {
            "name": "unet",
            "spatial_dims": Choice(dims, dims_reason),
            "features": Choice(net["features"], "fitted with the patch (see sampling.patch_size)"
                               + infer_reasons.get("model.features", "")),
            "depth": Choice(net["depth"], f"pool until an axis is {rules.MIN_BOTTOM}-{2 * rules.MIN_BOTTOM - 1} "
                                          f"voxels at the bottom (patch {patch})"
                                          + infer_reasons.get("model.depth", "")),
            "norm": "instance",
            "upsample": "transpose",
            "padding": "same",
            "deep_supervision": Choice(deep, "nnU-Net's deep supervision" if deep else "depth 2: no lower decoder"),
            "dropout": 0.0,
        },
        "sampling": {
            "patch_size": Choice(patch, f"median shape {shape[:dims]} at the target spacing; {net_reason}"
                                 + infer_reasons.get("sampling.patch_size", "")),
            "pos_ratio": Choice(pos, pos_reason),
            "lesion_slice_ratio": Choice(round(pos / (pos + 1), 2), "2D: pos_ratio / (pos_ratio + 1)"),
            "samples_per_volume": Choice(sizes["samples_per_volume"], batch_reason),
            "batch_size": Choice(sizes["batch_size"], "volumes per step (x samples_per_volume)"),
            "cache": Choice(cached, cache_reason),
        },
        "augment": {
            "flip_prob": 0.5, "rotate_prob": 0.2, "rotate_deg": 15.0, "scale_prob": 0.2, "scale_range": 0.15,
            "elastic_prob": Choice(0.2 if dims == 2 else 0.0, "2D elastic deformation is cheap" if dims == 2
                                   else "3D elastic deformation is slow"),
            "intensity_scale_prob": 0.3, "intensity_shift_prob": 0.3, "noise_prob": 0.2,
        },
        "loss": {"dice_weight": 1.0, "focal_weight": 1.0, "gamma": 2.0, "include_background": False},
        "train": {
            "out_dir": Choice(str((out_dir / "model").resolve()), "beside plans.yaml (absolute path)"),
            "epochs": Choice(sched["epochs"], sched_reason),
            "steps_per_epoch": Choice(sched["steps_per_epoch"], "epochs >= 20 of 10-250 steps"),
            "lr": Choice(lr, lr_reason),
            "weight_decay": 0.0001,
            "warmup_epochs": Choice(sched["warmup_epochs"], "2% of the epochs, 1-5"),
            "schedule": "poly",
            "grad_clip": 12.0,
            "val_every": Choice(val["val_every"], val_reason),
            "amp": True,
            "seed": SEED,
            "num_workers": 0,
            "device": Choice(device, "planned for"),
            "max_minutes": Choice(round(budget_minutes, 2) if budget_minutes else 0.0,
                                  "the time budget, held: past it at the measured pace, the run is shortened"
                                  if budget_minutes else "no time budget"),
        },
        **({"input": {"channels": Choice([Choice(r, n) for r, n in zip(channel_list, channel_notes)],
                                         channel_reason)}} if channel_list else {}),
        "inference": {
            "roi_size": Choice(patch, "the training patch" + infer_reasons.get("inference.roi_size", "")),
            "overlap": Choice(overlap, overlap_reason),
            "sw_batch_size": 2,
            "blend": "gaussian",
            "threshold": None,
            "min_component_mm3": Choice(min_mm3, min_reason),
            "device": "auto",
            "backend": "auto",
            "amp": True,
        },
    }
    return plan, step_seconds


def _inference_budget(fp: dict, net: dict, target, shapes, spacings, overlap: float, device: str,
                      infer_seconds: Optional[float], in_ch: int, out_ch: int,
                      norms: Optional[list] = None) -> Optional[tuple[dict, str]]:
    """:func:`pipeline.plan.rules.inference_budget` with windows timed here (None: not estimated, on
    ``cuda`` without ``--infer-seconds``)."""
    import numpy as np

    from pipeline.plan.inference import body_fraction, window_timer

    if device == "cuda" and not infer_seconds:
        return None
    if infer_seconds is None:
        infer_seconds = rules.INFER_SECONDS_CPU
    timer = window_timer(in_ch, out_ch, device)
    median_spacing = [float(v) for v in np.median(np.asarray(spacings, np.float64), axis=0)]
    body = None
    if norms is not None:
        try:  # segment runs over the body's box: a few cases preprocessed as planned say how much of the grid
            body = body_fraction(fp["dataset"], fp["cases"], fp["channels"], norms, target, ORIENTATION, CROP_MARGIN)
        except Exception as exc:  # noqa: BLE001 - unreadable here: estimate on the whole grid, and say so
            log.warning("inference estimate on the whole grid (the crop to the body could not be measured: %s)", exc)
    value, reason = rules.inference_budget(net, target, median_spacing, shapes, spacings, overlap,
                                           infer_seconds or None, timer, body_fraction=body,
                                           crop_margin=CROP_MARGIN if body is not None else 0)
    value["estimate"] = {**value["estimate"], "body_fraction": body}
    log.info("inference estimate: %s", reason)
    cpu = getattr(timer, "cpu", None)
    if cpu is not None:  # the CPU seconds of the same calls (on a shared machine wall time counts the waiting)
        est = value["estimate"]
        per_window = cpu({"patch_size": est["patch_size"], "features": est["features"], "depth": est["depth"]})
        value["estimate"] = {**est, "cpu_seconds_per_window": round(per_window, 5),
                             "estimated_cpu_seconds": round(est["windows"] * per_window, 2),
                             "ct_estimated_cpu_seconds": round(est["ct_windows"] * per_window, 2)}
    return {**value, "threads": timer.threads}, reason


__all__ = ["PlanResult", "default_out_dir", "plan_dataset"]
