"""HD95 / ASSD / NSD speed on a large pair of masks, against MONAI as the baseline.

    python -m pipeline.benchmarks.hd95                 # 512×512×300 at 0.8×0.8×1.5 mm
    python -m pipeline.benchmarks.hd95 --shape 256 256 150 --repeats 5

Builds two large, offset ellipsoids, times our functions (median of ``--repeats`` runs, each from the
masks, as a user would call them) and MONAI's ``compute_hausdorff_distance(percentile=95)`` once on the
same pair, checks that both give the same HD95, and prints the seconds and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def ellipsoid_pair(shape=(512, 512, 300), spacing=(0.8, 0.8, 1.5)) -> tuple[np.ndarray, np.ndarray]:
    """Two ellipsoids filling most of the volume, the prediction offset by a few mm and a little smaller."""
    shape_mm = np.asarray(shape) * np.asarray(spacing)
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]

    def ellipsoid(centre, radii):
        out = np.zeros(shape, bool)
        x2 = ((axes[0] - centre[0]) / radii[0])[:, None] ** 2
        y2 = ((axes[1] - centre[1]) / radii[1])[None, :] ** 2
        for k, z in enumerate(axes[2]):  # slice by slice: no full float64 volume in memory
            out[:, :, k] = x2 + y2 + ((z - centre[2]) / radii[2]) ** 2 <= 1.0
        return out

    truth = ellipsoid(shape_mm * 0.5, shape_mm * [0.35, 0.32, 0.36])
    pred = ellipsoid(shape_mm * 0.5 + [4.0, -3.0, 6.0], shape_mm * [0.34, 0.33, 0.35])
    return pred, truth


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.hd95",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true", help="skip MONAI (slow on large volumes)")
    args = parser.parse_args(argv)

    from pipeline.evaluate.surface import assd, hd95, nsd, surface_distances

    spacing = tuple(args.spacing)
    pred, truth = ellipsoid_pair(tuple(args.shape), spacing)
    print(f"masks {tuple(args.shape)} at {spacing} mm: {int(pred.sum()):,} and {int(truth.sum()):,} voxels")

    ours = {
        "hd95": lambda: hd95(pred, truth, spacing),
        "assd": lambda: assd(pred, truth, spacing),
        "nsd (1 mm)": lambda: nsd(pred, truth, spacing, 1.0),
        "all three (one surface pass)": lambda: surface_distances(pred, truth, spacing),
    }
    timings = {}
    for name, fn in ours.items():
        seconds, value = _median_seconds(fn, args.repeats)
        timings[name] = seconds
        shown = "" if not isinstance(value, float) else f" = {value:.3f}"
        print(f"ours   {name:<30}{seconds:8.2f} s (median of {args.repeats}){shown}")
    our_hd95 = hd95(pred, truth, spacing)

    if args.no_baseline:
        return 0
    import torch
    from monai.metrics import compute_hausdorff_distance

    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(truth)[None, None].float()
    start = time.perf_counter()
    monai_hd95 = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                  spacing=spacing)[0, 0])
    baseline = time.perf_counter() - start
    print(f"MONAI  compute_hausdorff_distance(percentile=95) {baseline:8.2f} s (one run) = {monai_hd95:.3f}")
    ratio = baseline / timings["hd95"]
    print(f"HD95: ours {timings['hd95']:.2f} s, MONAI {baseline:.2f} s, ratio {ratio:.1f}x; "
          f"values differ by {abs(our_hd95 - monai_hd95):.2g} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
