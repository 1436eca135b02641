"""``medseg bench --levers``: each inference speed lever against the reference pass, with the accuracy contract.

The **reference pass** is today's path at its most careful: overlap 0.5, fp32 on the torch backend,
no window skipped, no cascade, no TTA. The backend levers (``onnxruntime_fp32``, ``onnxruntime_int8``,
``openvino_fp32``, ``openvino_int8``) run the reference's windows on another backend / precision; one that
cannot load here is skipped (``skipped_levers``) with its reason. Each row has ``network_gflops``: the
network FLOPs per window x windows / the network's seconds. Each **lever** (:data:`LEVERS`: dotted ``inference.*`` overrides
on top of the reference) runs the same trained model on the same held-out cases (a dataset's ``test``
list, e.g. the demo's ``data/demo``), in the same process and run. Every case is read and preprocessed
once; what is timed is :meth:`Segmenter.predict` + :meth:`Segmenter.finish` (the network, mapping back,
the decision, post-processing), summed over the cases, the median of ``repeats`` runs after one untimed
warm-up case. Per lever:

* ``seconds`` and ``ratio`` (lever / reference; below 1 is faster), ``cpu_seconds`` (this process's CPU
  time, ``time.process_time``: less sensitive than the wall time to other processes on a shared
  machine) and ``cpu_ratio``, ``windows`` and ``skipped``;
* ``dice_vs_reference_min``: the voxel Dice of its mask against the reference mask, per case, the minimum
  (two empty masks agree: 1.0);
* ``lesion_recall_vs_reference``: the reference's lesions (26-connected components) that the lever's
  mask overlaps (:func:`pipeline.evaluate.lesions.lesion_detection`), pooled over the cases, overall and
  per size bin (< 100, 100–1000, ≥ 1000 mm³);
* ``gt_dice`` / ``gt_dice_delta``: the mean Dice against the ground truth (as ``medseg evaluate``
  scores it, every foreground label, both empty = 1) and its difference to the reference's.

**The accuracy contract** (``meets_contract``): ``dice_vs_reference_min >= 0.98``,
``lesion_recall_vs_reference >= 0.99`` (NaN, no reference lesion, passes) and ``|gt_dice_delta| <= 0.005``.
``best`` names the cheapest lever that meets it: the fewest windows run (a machine-independent cost),
then the least CPU time (on a shared machine the wall time is mostly noise; the reference wins an exact
tie). The ``default`` lever is the checkpoint's own inference settings, as ``medseg segment`` runs them
(``inference.backend: auto`` included), measured in the same run. With ``large_shape``, the synthetic CT of
:mod:`pipeline.benchmarks.synthetic_ct` of that shape is segmented once with every lever (the reference
first), each mask compared with the reference's (Dice, lesion recall); ``segment_seconds_<shape>`` is the
default path's (``default_agrees`` says whether it meets the contract there),
``segment_seconds_<shape>_reference`` the reference's, and ``speedup_vs_reference_pass`` their ratio;
``segment_seconds_<shape>_best`` is the cheapest lever (as ``best``) that met the contract on the held-out
cases and agrees on this case too.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

REFERENCE = ("inference.overlap=0.5", "inference.skip_empty=none", "inference.cascade.enabled=false",
             "inference.tta=none", "inference.backend=torch", "inference.precision=fp32")
DEFAULT = "default"  # the checkpoint's own inference settings, as `medseg segment` runs them (no reference overrides)
LEVERS: dict[str, tuple[str, ...]] = {
    "reference": (),
    DEFAULT: (),
    "overlap_0.25": ("inference.overlap=0.25",),
    "overlap_0.2": ("inference.overlap=0.2",),
    "skip_body": ("inference.skip_empty=body",),
    "cascade": ("inference.cascade.enabled=true",),
    "cascade_strict": ("inference.cascade.enabled=true", "inference.cascade.threshold=0.5",
                       "inference.cascade.margin_mm=5"),
    "skip_body+overlap_0.25": ("inference.skip_empty=body", "inference.overlap=0.25"),
    "skip_body+overlap_0.2": ("inference.skip_empty=body", "inference.overlap=0.2"),
    "cascade+skip_body+overlap_0.25": ("inference.cascade.enabled=true", "inference.skip_empty=body",
                                       "inference.overlap=0.25"),
    # cheaper windows: the same windows on another backend / precision (int8: calibrated QDQ, pipeline.infer.quantize)
    "onnxruntime_fp32": ("inference.backend=onnxruntime",),
    "onnxruntime_int8": ("inference.backend=onnxruntime", "inference.precision=int8"),
    "openvino_fp32": ("inference.backend=openvino",),
    "openvino_int8": ("inference.backend=openvino", "inference.precision=int8"),
}
CONTRACT = {"dice_vs_reference_min": 0.98, "lesion_recall_vs_reference": 0.99, "gt_dice_delta": 0.005}
SIZE_BINS_MM3 = (100.0, 1000.0)


def select_levers(names: Optional[Sequence[str]]) -> Optional[dict[str, tuple[str, ...]]]:
    """The :data:`LEVERS` named (None: all); an unknown name is an InputError listing the known ones."""
    from pipeline.errors import InputError

    if not names:
        return None
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise InputError(f"unknown lever {unknown[0]!r}: expected one of {', '.join(LEVERS)}")
    return {n: LEVERS[n] for n in names}


def held_out_cases(data_root: Union[str, Path]) -> list[tuple[str, Path, Optional[Path]]]:
    """``(case id, image, label or None)`` of a dataset's ``test`` list (``dataset.json``)."""
    import json

    from pipeline.errors import InputError

    root = Path(data_root)
    path = root / "dataset.json"
    if not path.is_file():
        raise InputError(f"--data {root}: expected a dataset folder with a dataset.json (as `medseg synth` "
                         f"writes), found none; run `medseg synth configs/demo.yaml` or pass another folder")
    entries = json.loads(path.read_text()).get("test") or []
    if not entries:
        raise InputError(f"{path}: expected a non-empty 'test' list (the held-out cases), found none")
    out = []
    for entry in entries:
        image = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        case_id = Path(entry["label"]).name.split(".")[0] if entry.get("label") else image.name.split(".")[0]
        out.append((case_id, image, label))
    return out


def lever_config(base, overrides: Sequence[str], name: str = ""):
    """``base`` with the reference settings, then ``overrides``; the :data:`DEFAULT` lever is ``base`` itself."""
    from pipeline.config import override_config

    return override_config(base, list(overrides) if name == DEFAULT else [*REFERENCE, *overrides])


def _read_truth(path: Path, shape) -> np.ndarray:
    from pipeline.errors import InputError
    from pipeline.evaluate.folder import _read_labels

    truth = _read_labels(path)
    if tuple(truth.shape) != tuple(shape):
        raise InputError(f"ground truth {path} has shape {tuple(truth.shape)}, the scan {tuple(shape)}: expected "
                         f"a label map on the scan's grid")
    return truth


def run_levers(model: Union[str, Path], data_root: Union[str, Path], repeats: int = 3,
               levers: Optional[dict[str, Sequence[str]]] = None, max_cases: Optional[int] = None,
               large_shape: Optional[Sequence[int]] = None, work_dir: Union[str, Path] = "runs/bench",
               progress: Optional[Callable[[str], None]] = None) -> dict:
    """Every lever against the reference on the held-out cases of ``data_root`` (module docstring)."""
    import torch

    from pipeline.benchmarks.measure import cpu_info
    from pipeline.evaluate.lesions import lesion_detection
    from pipeline.infer import Segmenter
    from pipeline.io.geometry import voxel_volume_mm3
    from pipeline.metrics import case_dice, dice

    say = progress if progress is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    levers = dict(levers if levers is not None else LEVERS)
    levers = {"reference": (), **{k: v for k, v in levers.items() if k != "reference"}}
    base = Segmenter.from_checkpoint(model, device="cpu", backend="torch")
    foreground = sorted(v for v in base.config.data.labels.values() if v != 0)
    cases = held_out_cases(data_root)[:max_cases]
    say(f"levers: {len(levers)} on {len(cases)} held-out cases of {data_root}, {repeats} timed run(s) each")
    prepared = [(case_id, base.load(str(image)), label) for case_id, image, label in cases]
    truths = [_read_truth(label, p.source_image.shape) if label is not None else None
              for _, p, label in prepared]

    segmenters, skipped_levers = {}, {}
    for name, overrides in levers.items():
        seg = Segmenter(base.network, lever_config(base.config, overrides, name), device="cpu",
                        model_sha256=base.model_sha256)
        try:
            seg.finish(seg.predict(prepared[0][1]), prepared[0][1])  # warm-up (exports, quantises once)
        except Exception as exc:  # a backend that cannot load here (e.g. openvino not installed) is skipped
            if name == "reference":
                raise
            skipped_levers[name] = f"{type(exc).__name__}: {exc}"
            say(f"  {name}: skipped ({skipped_levers[name]})")
            continue
        segmenters[name] = seg
    levers = {name: levers[name] for name in segmenters}
    window_flops = _window_flops(base)

    masks: dict[str, list[np.ndarray]] = {name: [] for name in levers}
    timing: dict[str, list[float]] = {name: [] for name in levers}
    cpu: dict[str, list[float]] = {name: [] for name in levers}
    counts: dict[str, dict] = {}
    network_seconds: dict[str, list[float]] = {}
    for repeat in range(max(1, repeats)):
        for name, seg in segmenters.items():  # alternating: contention hits every lever alike
            total, cpu_total, windows, skipped, network = 0.0, 0.0, 0, 0, 0.0
            out = []
            for _, p, _ in prepared:
                began, began_cpu = time.perf_counter(), time.process_time()
                prediction = seg.predict(p)
                result = seg.finish(prediction, p)
                total += time.perf_counter() - began
                cpu_total += time.process_time() - began_cpu
                windows, skipped = windows + prediction.windows, skipped + prediction.skipped
                network += prediction.network_seconds
                out.append(result.labels)
            timing[name].append(total)
            cpu[name].append(cpu_total)
            network_seconds.setdefault(name, []).append(network)
            counts[name] = {"windows": windows, "skipped": skipped}
            if repeat == 0:
                masks[name] = out
        say(f"  run {repeat + 1}: " + ", ".join(f"{n} {timing[n][-1]:.2f} s" for n in levers))

    reference = masks["reference"]
    ref_seconds = statistics.median(timing["reference"])
    ref_cpu = statistics.median(cpu["reference"])
    rows = {}
    for name in levers:
        lever_masks = masks[name]
        dices, gt_dices = [], []
        tp = n_ref = 0
        by_size: dict[str, dict[str, int]] = {}
        for (_, p, _), ref, got, truth in zip(prepared, reference, lever_masks, truths):
            dices.append(dice(got > 0, ref > 0))
            affine = np.asarray(p.image.meta["original_affine"], dtype=np.float64)
            found = lesion_detection(got > 0, ref > 0, voxel_volume_mm3=voxel_volume_mm3(affine),
                                     size_bins_mm3=SIZE_BINS_MM3)
            tp, n_ref = tp + found.tp, n_ref + found.lesions_gt
            for bin_name, c in found.by_size.items():
                entry = by_size.setdefault(bin_name, {"reference_lesions": 0, "found": 0})
                entry["reference_lesions"] += c["lesions_gt"]
                entry["found"] += c["lesion_tp"]
            if truth is not None:
                gt_dices.append(case_dice(got, truth, foreground))
        for entry in by_size.values():
            entry["recall"] = entry["found"] / entry["reference_lesions"] if entry["reference_lesions"] else math.nan
        seconds = statistics.median(timing[name])
        net = statistics.median(network_seconds[name])
        rows[name] = {
            "overrides": list(levers[name]),
            "backend": segmenters[name].backend, "precision": segmenters[name].runner.precision,
            "network_seconds": net,
            "network_gflops": window_flops * counts[name]["windows"] / net / 1e9 if net else math.nan,
            "seconds": seconds, "runs": timing[name], "ratio": seconds / ref_seconds,
            "cpu_seconds": statistics.median(cpu[name]), "cpu_ratio": statistics.median(cpu[name]) / ref_cpu,
            **counts[name],
            "dice_vs_reference": dices, "dice_vs_reference_min": min(dices),
            "lesion_recall_vs_reference": tp / n_ref if n_ref else math.nan,
            "reference_lesions": n_ref, "recall_by_size": by_size,
            "gt_dice": statistics.mean(gt_dices) if gt_dices else math.nan,
        }
    for row in rows.values():
        row["gt_dice_delta"] = row["gt_dice"] - rows["reference"]["gt_dice"]
        row["meets_contract"] = meets_contract(row)
    passing = [n for n, r in rows.items() if r["meets_contract"]]
    best = min(passing, key=lambda n: _cost(n, rows[n]))
    results = {
        "model": str(model), "data": str(data_root), "cases": [c for c, _, _ in prepared], "repeats": repeats,
        "reference": list(REFERENCE), "contract": CONTRACT, "levers": rows, "best": best,
        "skipped_levers": skipped_levers, "gflop_per_window": window_flops / 1e9,
        "agreement_dice_min": rows[best]["dice_vs_reference_min"],
        "agreement_lesion_recall": rows[best]["lesion_recall_vs_reference"],
        "speedup_vs_reference_pass_held_out": ref_seconds / rows[best]["seconds"],
        "machine": cpu_info(), "torch_threads": torch.get_num_threads(),
    }
    if large_shape:
        results.update(time_large(base, levers, passing, large_shape, work_dir, say))
    return results


def _window_flops(base) -> float:
    """FLOPs of the network on one window (:func:`pipeline.benchmarks.measure.network_flops`)."""
    from pipeline.benchmarks.measure import network_flops

    return float(network_flops(base.network, (base.config.in_channels, *base.config.inference.roi_size)))


def _cost(name: str, row: dict) -> tuple:
    """How levers are ranked: windows run (the machine-independent cost; the cascade's coarse ones
    included), then CPU time (a backend lever runs the reference's windows, cheaper or dearer), then the
    reference before a lever that costs exactly as much."""
    return (row["windows"], row["cpu_seconds"], name != "reference")


def meets_contract(row: dict) -> bool:
    recall = row["lesion_recall_vs_reference"]
    delta = row["gt_dice_delta"]
    return bool(row["dice_vs_reference_min"] >= CONTRACT["dice_vs_reference_min"]
                and (math.isnan(recall) or recall >= CONTRACT["lesion_recall_vs_reference"])
                and (math.isnan(delta) or abs(delta) <= CONTRACT["gt_dice_delta"] + 1e-12))


def time_large(base, levers: dict[str, Sequence[str]], passing: Sequence[str], shape: Sequence[int],
               work_dir: Union[str, Path], say: Callable[[str], None]) -> dict:
    """One segment (read to labels, not written) of the synthetic CT of ``shape`` with every lever, the
    reference first; each one's mask against the reference's (Dice, lesion recall). The default path is
    the cheapest lever that met the contract on the held-out cases (``passing``) and agrees here too."""
    from pipeline.benchmarks.bench import SPACING
    from pipeline.benchmarks.measure import network_flops
    from pipeline.benchmarks.synthetic_ct import make_ct
    from pipeline.evaluate.lesions import lesion_detection
    from pipeline.infer import Segmenter
    from pipeline.io.geometry import voxel_volume_mm3
    from pipeline.metrics import dice

    shape = tuple(int(n) for n in shape)
    tag = "x".join(map(str, shape))
    image = make_ct(Path(work_dir) / "cases", shape, SPACING)
    window_flops = network_flops(base.network, (base.config.in_channels, *base.config.inference.roi_size))
    runs: dict[str, dict] = {}
    reference = None
    for name, extra in levers.items():
        seg = Segmenter(base.network, lever_config(base.config, extra, name), device="cpu",
                        model_sha256=base.model_sha256)
        say(f"{tag}: {name}")
        began, began_cpu = time.perf_counter(), time.process_time()
        prepared = seg.load(str(image))
        prediction = seg.predict(prepared)
        result = seg.finish(prediction, prepared)
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
        mask = result.labels > 0
        if reference is None:
            reference = mask
            volume = voxel_volume_mm3(np.asarray(prepared.image.meta["original_affine"], dtype=np.float64))
        found = lesion_detection(mask, reference, voxel_volume_mm3=volume, size_bins_mm3=SIZE_BINS_MM3)
        runs[name] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "windows": prediction.windows,
                      "skipped": prediction.skipped, "network_seconds": prediction.network_seconds,
                      "dice_vs_reference": dice(mask, reference),
                      "lesion_recall_vs_reference": found.recall, "reference_lesions": found.lesions_gt,
                      "network_gflops": window_flops * prediction.windows / prediction.network_seconds / 1e9
                      if prediction.network_seconds else math.nan}
        say(f"  {seconds:.1f} s (CPU {cpu_seconds:.1f} s; {prediction.windows} windows run, "
            f"{prediction.skipped} skipped; Dice vs reference {runs[name]['dice_vs_reference']:.4f})")
        del prepared, prediction, result
    agreeing = [n for n in passing if n in runs and runs[n]["dice_vs_reference"] >= CONTRACT["dice_vs_reference_min"]
                and (math.isnan(runs[n]["lesion_recall_vs_reference"])
                     or runs[n]["lesion_recall_vs_reference"] >= CONTRACT["lesion_recall_vs_reference"])]
    best = min(agreeing, key=lambda n: _cost(n, runs[n])) if agreeing else "reference"
    default = DEFAULT if DEFAULT in runs else best
    return {
        f"segment_seconds_{tag}": runs[default]["seconds"],
        f"segment_seconds_{tag}_reference": runs["reference"]["seconds"],
        f"segment_seconds_{tag}_best": runs[best]["seconds"],
        "speedup_vs_reference_pass": runs["reference"]["seconds"] / runs[default]["seconds"],
        "speedup_vs_reference_pass_best": runs["reference"]["seconds"] / runs[best]["seconds"],
        "large": {"shape": list(shape), "path": str(image), "lever": best, "default": default,
                  "default_agrees": default in agreeing, "runs": runs, "gflop_per_window": window_flops / 1e9},
    }


def _num(value, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{fmt}}"


def print_levers(results: dict, file=None) -> None:
    """The lever table."""
    out = file or sys.stdout
    m = results.get("machine", {})
    lines = [
        f"medseg bench --levers: {m.get('cpu', '?')} ({' '.join(m.get('vector_extensions') or [])}), "
        f"{m.get('cores', '?')} cores, {results.get('torch_threads')} torch threads; load average at the start "
        f"{m.get('load_average')}",
        f"model {results.get('model')}; {len(results.get('cases', []))} held-out cases of {results.get('data')}; "
        f"medians of {results.get('repeats')} runs; reference: {' '.join(results.get('reference', []))}",
        "",
        f"  {'lever':<32}{'seconds':>8}{'ratio':>7}{'CPU s':>7}{'ratio':>7}{'windows':>8}{'skipped':>8}{'Dice ref min':>13}"
        f"{'recall':>8}{'  <100/100-1000/>=1000 mm3':<28}{'GT Dice':>8}{'delta':>8}{'GFLOP/s':>8}  contract",
    ]
    for name, row in results.get("levers", {}).items():
        bins = "/".join(_num(b.get("recall"), ".2f") for b in row.get("recall_by_size", {}).values())
        lines.append(
            f"  {name:<32}{_num(row['seconds'], '.2f'):>8}{_num(row['ratio'], '.2f'):>7}"
            f"{_num(row['cpu_seconds'], '.2f'):>7}{_num(row['cpu_ratio'], '.2f'):>7}{row['windows']:>8}"
            f"{row['skipped']:>8}{_num(row['dice_vs_reference_min'], '.4f'):>13}"
            f"{_num(row['lesion_recall_vs_reference'], '.3f'):>8}  {bins:<26}{_num(row['gt_dice'], '.4f'):>8}"
            f"{_num(row['gt_dice_delta'], '+.4f'):>8}{_num(row.get('network_gflops'), '.1f'):>8}"
            f"  {'meets' if row['meets_contract'] else 'FAILS'}")
    for name, reason in results.get("skipped_levers", {}).items():
        lines.append(f"  {name:<32}skipped: {reason}")
    lines += ["", f"best lever meeting the contract: {results.get('best')} "
                  f"(x{_num(results.get('speedup_vs_reference_pass_held_out'), '.2f')} on the held-out cases)"]
    large = results.get("large")
    if large:
        tag = "x".join(map(str, large["shape"]))
        lines += ["", f"{tag} synthetic CT, one segment (read to labels) per lever:",
                  f"  {'lever':<32}{'seconds':>8}{'CPU s':>7}{'windows':>8}{'skipped':>8}{'Dice ref':>9}{'recall':>8}"
                  f"{'GFLOP/s':>9}"]
        for name, run in large["runs"].items():
            lines.append(f"  {name:<32}{_num(run['seconds'], '.1f'):>8}{_num(run['cpu_seconds'], '.1f'):>7}"
                         f"{run['windows']:>8}{run['skipped']:>8}{_num(run['dice_vs_reference'], '.4f'):>9}"
                         f"{_num(run['lesion_recall_vs_reference'], '.3f'):>8}{_num(run.get('network_gflops'), '.1f'):>9}")
        agrees = "meets the contract" if large.get("default_agrees") else "does NOT meet the contract"
        lines.append(f"  default path ({large.get('default', large['lever'])}, {agrees}): "
                     f"{_num(results.get(f'segment_seconds_{tag}'), '.1f')} s "
                     f"against the reference's {_num(results.get(f'segment_seconds_{tag}_reference'), '.1f')} s "
                     f"(x{_num(results.get('speedup_vs_reference_pass'), '.2f')})")
        lines.append(f"  cheapest lever meeting the contract: {large['lever']}, "
                     f"{_num(results.get(f'segment_seconds_{tag}_best'), '.1f')} s "
                     f"(x{_num(results.get('speedup_vs_reference_pass_best'), '.2f')})")
    print("\n".join(lines), file=out)
