"""``medseg bench --rss-vs-n``: how peak memory and time of ``segment`` grow with the number of slices.

Method: synthetic CTs of 512×512×N voxels (:func:`~pipeline.benchmarks.synthetic_ct.make_ct`, int16 NIfTI,
0.8×0.8×1.0 mm, cached in ``work_dir/cases``) for N = 200, 400, 800 (and 1600 with ``large``). Each is
segmented once per repeat in a fresh child process (:func:`child_stages`: ``medseg segment``'s stages,
:func:`~pipeline.benchmarks.bench.default_segment`'s, with the given checkpoint, default the demo model);
the child's own ``ru_maxrss`` is its peak RSS (:func:`~pipeline.benchmarks.measure.peak_rss_child`), its
wall seconds are those of the whole child (interpreter start and model loading included) and its CPU
seconds (user + system, every thread) come from ``getrusage`` in the child.

Per stage, the child also records the peak RSS reached inside that stage (``VmHWM`` after resetting it
through ``/proc/self/clear_refs`` at the stage's start; where the kernel does not allow the reset, the
running peak): that is where the bytes go. The stages are ``Segmenter.read``, ``prepare``, ``predict``,
``finish``, the lesion statistics ``medseg segment`` computes for its sidecar
(:func:`~pipeline.batch.report.lesions.lesion_stats`) and ``write_mask``. Resetting ``VmHWM`` resets what
``ru_maxrss`` reports too, so a child's peak is the highest of its stage peaks (``setup``: interpreter,
torch and the model, before the first reset) and its ``ru_maxrss``. The slopes are least-squares fits over the Ns: peak RSS
against source voxels (bytes per source voxel: the growth; the intercept is the fixed cost of the
interpreter, torch and the model) and wall/CPU seconds against slices. ``time_ratio_800_vs_400`` is
wall(800) / wall(400): 2.0 is linear. With ``repeats`` > 1 the figures per N are medians.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from pipeline.benchmarks.bench import CHILD_MARKER, GIB, SPACING, child_result, mask_name

DEFAULT_MODEL = "runs/demo/model/best.pt"
SLICES = (200, 400, 800)
LARGE_SLICES = (1600,)
IN_PLANE = (512, 512)
TARGET_BYTES_PER_VOXEL = 6.0
STAGES = ("load", "preprocess", "infer", "postprocess", "lesions", "write")

__all__ = ["DEFAULT_MODEL", "fit_line", "print_rss_vs_n", "rss_vs_n"]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``ys`` against ``xs`` (two points or more)."""
    n = len(xs)
    if n < 2 or len(ys) != n:
        raise ValueError(f"fit_line: expected two or more (x, y) pairs, found {n} x and {len(ys)} y")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_line: every x is the same, no slope to fit")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def rss_vs_n(work_dir: Union[str, Path], model: Union[str, Path] = DEFAULT_MODEL, *, large: bool = False,
             slices: Optional[Sequence[int]] = None, repeats: int = 1, in_plane: Sequence[int] = IN_PLANE,
             spacing: Sequence[float] = SPACING, timeout: Optional[float] = None,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Peak RSS, wall and CPU seconds of one ``segment`` per N (child processes), and their slopes."""
    from pipeline.benchmarks.synthetic_ct import make_ct
    from pipeline.errors import InputError

    say = progress if progress is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    model = Path(model)
    if not model.is_file():
        raise InputError(f"bench --rss-vs-n: model '{model}' not found: expected a checkpoint (.pt); train the "
                         "demo model with 'medseg demo' or pass --model PATH")
    ns = [int(n) for n in (slices if slices is not None else SLICES + (LARGE_SLICES if large else ()))]
    if len(ns) < 2:
        raise InputError(f"bench --rss-vs-n: expected two or more slice counts to fit a slope, found {ns}")
    work_dir = Path(work_dir)
    rows = []
    for n in ns:
        shape = (int(in_plane[0]), int(in_plane[1]), n)
        say(f"synthetic CT {shape[0]}x{shape[1]}x{n} (int16 NIfTI)")
        image = make_ct(work_dir / "cases", shape, spacing)
        runs = []
        for r in range(repeats):
            result = child_stages(model, image, work_dir / "out" / f"rss_vs_n_{n}", timeout=timeout)
            say(f"  N={n} run {r + 1}/{repeats}: peak RSS {_peak(result) / GIB:.3f} GiB, wall {result['wall']:.1f} s, "
                f"CPU {result['cpu_seconds']:.1f} s")
            runs.append(result)
        voxels = shape[0] * shape[1] * n
        rows.append({
            "slices": n, "shape": list(shape), "voxels": voxels,
            "peak_rss_bytes": statistics.median(_peak(r) for r in runs),
            "wall_seconds": statistics.median(r["wall"] for r in runs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "segment_seconds": statistics.median(r["total"] for r in runs),
            "stage_peak_rss_bytes": runs[len(runs) // 2]["stage_peak_rss_bytes"],
            "stage_seconds": {s: runs[len(runs) // 2][s] for s in STAGES},
            "runs": runs,
        })
    for row in rows:
        row["peak_rss_gb"] = row["peak_rss_bytes"] / GIB
    slope_bytes, base_bytes = fit_line([r["voxels"] for r in rows], [r["peak_rss_bytes"] for r in rows])
    slope_wall, _ = fit_line([r["slices"] for r in rows], [r["wall_seconds"] for r in rows])
    slope_cpu, _ = fit_line([r["slices"] for r in rows], [r["cpu_seconds"] for r in rows])
    by_n = {r["slices"]: r for r in rows}
    ratio = by_n[800]["wall_seconds"] / by_n[400]["wall_seconds"] if 800 in by_n and 400 in by_n else None
    cpu_ratio = by_n[800]["cpu_seconds"] / by_n[400]["cpu_seconds"] if 800 in by_n and 400 in by_n else None
    return {
        "model": str(model), "in_plane": list(in_plane), "spacing": list(spacing), "repeats": repeats,
        "rows": rows,
        "rss_bytes_per_source_voxel": slope_bytes, "rss_fixed_gb": base_bytes / GIB,
        "seconds_per_slice_wall": slope_wall, "seconds_per_slice_cpu": slope_cpu,
        "time_ratio_800_vs_400": ratio, "cpu_ratio_800_vs_400": cpu_ratio,
        "target_bytes_per_voxel": TARGET_BYTES_PER_VOXEL,
    }


def _peak(run: dict) -> int:
    """A child's peak RSS: the highest of its stages' peaks and its ``ru_maxrss`` (resetting ``VmHWM``
    also resets what ``ru_maxrss`` reports, which is then the peak since the last reset only)."""
    return max([int(run["peak_rss_bytes"])] + [int(v) for v in run["stage_peak_rss_bytes"].values()])


def print_rss_vs_n(results: dict, file=None) -> None:
    out = file or sys.stdout
    lines = [f"segment of 512x512xN synthetic CT, model {results['model']} (child process per run, "
             f"median of {results['repeats']}):",
             f"  {'N':>5} {'peak RSS GiB':>13} {'wall s':>8} {'CPU s':>8}   stage peaks GiB "
             f"({' / '.join(('setup',) + STAGES)})"]
    for row in results["rows"]:
        stages = row["stage_peak_rss_bytes"]
        peaks = " / ".join(f"{stages.get(s, float('nan')) / GIB:.2f}" for s in ("setup",) + STAGES)
        lines.append(f"  {row['slices']:>5} {row['peak_rss_gb']:>13.3f} {row['wall_seconds']:>8.1f} "
                     f"{row['cpu_seconds']:>8.1f}   {peaks}")
    ratio = results["time_ratio_800_vs_400"]
    lines += [
        f"  growth: {results['rss_bytes_per_source_voxel']:.2f} bytes per source voxel (target <= "
        f"{results['target_bytes_per_voxel']:.0f}), fixed {results['rss_fixed_gb']:.2f} GiB",
        f"  time: {results['seconds_per_slice_wall']:.3f} s per slice wall, {results['seconds_per_slice_cpu']:.3f} "
        f"s per slice CPU" + (f"; time(800)/time(400) = {ratio:.2f} (CPU {results['cpu_ratio_800_vs_400']:.2f})"
                              if ratio is not None else ""),
    ]
    print("\n".join(lines), file=out)


# --- the child ----------------------------------------------------------------------------------


def child_stages(model: Path, image: Path, out_dir: Path, timeout: Optional[float] = None) -> dict:
    """One ``segment`` with per-stage peak RSS in a child process (:func:`segment_stages`)."""
    return child_result(["pipeline.benchmarks.rss_vs_n", "--child", str(model), str(image), str(out_dir)],
                        timeout, "the rss-vs-n benchmark's child segment")


class StagePeaks:
    """Peak RSS per stage: ``VmHWM`` reset at each stage's start (``/proc/self/clear_refs``, value 5)."""

    def __init__(self):
        self.peaks: dict[str, int] = {"setup": self._status("VmHWM")}  # interpreter, torch, the model
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(field: str) -> int:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self) -> None:
        if self.resettable:
            self._reset()

    def end(self, stage: str) -> None:
        self.peaks[stage] = self._status("VmHWM")

    def rss(self) -> int:
        return self._status("VmRSS")


def segment_stages(model: Path, image: Path, out_dir: Path) -> dict:
    """:func:`~pipeline.benchmarks.bench.default_segment`'s stages, each with its peak RSS."""
    from pipeline.batch.report.lesions import lesion_stats
    from pipeline.infer import Segmenter
    from pipeline.io.write import write_mask

    began = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = Segmenter.from_checkpoints(model)
    for runner in segmenter.runners:
        runner.forward()
    peaks = StagePeaks()
    base = peaks.rss()
    seconds: dict[str, float] = {}

    def stage(name, fn, *args, **kwargs):
        peaks.start()
        t = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds[name] = time.perf_counter() - t
        peaks.end(name)
        return value

    loaded = stage("load", segmenter.read, str(image))
    prepared = stage("preprocess", segmenter.prepare, loaded)
    del loaded
    prediction = stage("infer", segmenter.predict, prepared)
    segmentation = stage("postprocess", segmenter.finish, prediction, prepared)
    del prediction, prepared
    lesions = stage("lesions", lesion_stats, segmentation.labels, segmentation.affine, image=segmentation.image,
                    probability=segmentation.foreground)
    mask_path = stage("write", write_mask, segmentation.labels, segmentation.affine, out_dir / mask_name(image),
                      source=image)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {**seconds, "total": time.perf_counter() - began, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "stage_peak_rss_bytes": peaks.peaks, "stage_peaks_reset": peaks.resettable, "base_rss_bytes": base,
            "backend": segmenter.backend, "mask_path": str(mask_path),
            "labelled_voxels": int((segmentation.labels > 0).sum()), "lesion_count": len(lesions)}


def _child_main(argv: list[str]) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    model, image, out_dir = argv
    result = segment_stages(Path(model), Path(image), Path(out_dir))
    sys.stdout.flush()
    print(CHILD_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        raise SystemExit(_child_main(sys.argv[2:]))
    raise SystemExit("usage: medseg bench --rss-vs-n [--large] [--model PATH]")
