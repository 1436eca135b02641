"""``medseg bench --ensemble N --tta mirror``: peak RSS of segmenting the 512x512x400 bench case with an
ensemble of N models and mirror TTA, against one model without TTA, measured in the same run.

Method: the bench's synthetic CT (:func:`~pipeline.benchmarks.synthetic_ct.make_ct`, 512x512x400 at
0.8x0.8x1.0 mm, cached in ``work_dir/cases``); N randomly initialised networks (seeds 0..N-1) of the
config, saved as checkpoints (``work_dir/models/ensemble_K.pt``). Each measurement is one ``segment`` in
a child process (:func:`~pipeline.benchmarks.bench.default_segment` with the checkpoints and ``tta``:
read, preprocess, predict, finish, write the mask), its own ``ru_maxrss``
(:func:`~pipeline.benchmarks.measure.peak_rss_child`); single and ensemble runs alternate, ``repeats``
each, and the figures are medians; the ratio is ensemble / single of the median peaks.

N models x 8 flips is 8N network passes: with the reference network that is hours on a few CPU cores,
so :data:`REDUCED` (a network of 4 features, a 2x2x2.5 mm inference grid, the torch backend) is applied
on top of the config unless ``reduced=False``; the output says so. Memory is dominated by the volume
buffers (the scan, its preprocessed copy, the probabilities on the preprocessed and the source grid),
not by the windows, which is what the ratio checks: an ensemble must not hold a volume per model.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from pipeline.benchmarks.bench import (
    CHILD_MARKER,
    GIB,
    LARGE_SHAPE,
    SPACING,
    _fmt_shape,
    bench_config,
    child_result,
)

REDUCED = ("model.features=4", "preprocess.spacing=[2.0, 2.0, 2.5]", "inference.backend=torch")
TARGET_RATIO = 1.15

__all__ = ["REDUCED", "ensemble_rss", "print_ensemble_rss"]


def ensemble_models(folder: Union[str, Path], config, n: int) -> list[Path]:
    """N random 2-class networks of ``config`` (seeds 0..N-1) as checkpoints; reused when the config matches."""
    import hashlib

    import torch

    from pipeline.config import config_to_dict
    from pipeline.model import build_model
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(config, 2)
    digest = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
    paths = []
    for k in range(n):
        path, stamp = folder / f"ensemble_{k}.pt", folder / f"ensemble_{k}.recipe"
        paths.append(path)
        if path.is_file() and stamp.is_file() and stamp.read_text() == digest:
            continue
        torch.manual_seed(k)
        network = build_model(cfg.model, in_channels=1, out_channels=2).eval()
        save_checkpoint(path, Checkpoint(config=cfg, state_dict=network.state_dict()))
        stamp.write_text(digest)
    return paths


def child_ensemble_segment(checkpoints: Sequence[Path], image: Path, out_dir: Path, tta: str,
                           timeout: Optional[float] = None) -> dict:
    """One ``segment`` with ``checkpoints`` and ``tta`` in a child process: its result + ``peak_rss_bytes``."""
    return child_result(["pipeline.benchmarks.ensemble_rss", "--child", tta, str(image), str(out_dir),
                         *[str(c) for c in checkpoints]], timeout, "the ensemble benchmark's child segment")


def ensemble_rss(config_path, work_dir: Union[str, Path], *, ensemble: int = 5, tta: str = "mirror",
                 repeats: int = 1, overrides: Sequence[str] = (), reduced: bool = True,
                 shape: Sequence[int] = LARGE_SHAPE, spacing: Sequence[float] = SPACING,
                 progress: Optional[Callable[[str], None]] = None) -> dict:
    """Peak RSS of one model (no TTA) and of ``ensemble`` models with ``tta``, alternating, ``repeats`` each.

    ``reduced``: :data:`REDUCED` goes on top of the config (then ``overrides``, which may undo it).
    """
    from pipeline.benchmarks.synthetic_ct import make_ct
    from pipeline.config import load_config

    say = progress if progress is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    work_dir = Path(work_dir)
    changes = (list(REDUCED) if reduced else []) + list(overrides)
    config = load_config(str(config_path) if config_path is not None else None, changes)
    shape = tuple(int(n) for n in shape)
    say(f"synthetic CT {_fmt_shape(shape)}; {ensemble} random models"
        + (f" (reduced for CPU time: {', '.join(REDUCED)})" if reduced else ""))
    image = make_ct(work_dir / "cases", shape, spacing)
    models = ensemble_models(work_dir / "models", config, ensemble)
    runs: dict[str, list[dict]] = {"single": [], "ensemble": []}
    for n in range(repeats):
        for name, checkpoints, mode in (("single", models[:1], "none"), ("ensemble", models, tta)):
            say(f"  run {n + 1}/{repeats}: {name} ({len(checkpoints)} model(s), tta {mode})")
            result = child_ensemble_segment(checkpoints, image, work_dir / "out" / f"ensemble_rss_{name}", mode)
            say(f"    peak RSS {result['peak_rss_gb']:.3f} GiB, {result['total']:.1f} s, {result['forwards']} "
                "network calls")
            runs[name].append(result)
    single = statistics.median(r["peak_rss_bytes"] for r in runs["single"])
    many = statistics.median(r["peak_rss_bytes"] for r in runs["ensemble"])
    return {
        "shape": list(shape), "ensemble": ensemble, "tta": tta, "repeats": repeats,
        "reduced": list(REDUCED) if reduced else [], "overrides": list(overrides), "config": str(config_path),
        "peak_rss_gb_single": single / GIB, "peak_rss_gb_ensemble": many / GIB,
        "peak_rss_ratio_ensemble_vs_single": many / single, "target_ratio": TARGET_RATIO,
        "seconds_single": statistics.median(r["total"] for r in runs["single"]),
        "seconds_ensemble": statistics.median(r["total"] for r in runs["ensemble"]),
        "runs": runs,
    }


def print_ensemble_rss(results: dict, file=None) -> None:
    out = file or sys.stdout
    reduced = results.get("reduced") or []
    lines = [
        f"peak RSS, segment of {_fmt_shape(results['shape'])} in a child process (median of "
        f"{results['repeats']} run(s) each, alternating):",
        f"  {'1 model, no TTA:':<28}{results['peak_rss_gb_single']:.3f} GiB ({results['seconds_single']:.1f} s)",
        f"  {str(results['ensemble']) + ' models, tta ' + results['tta'] + ':':<28}"
        f"{results['peak_rss_gb_ensemble']:.3f} GiB ({results['seconds_ensemble']:.1f} s)",
        f"  ratio {results['peak_rss_ratio_ensemble_vs_single']:.3f} (target <= {results['target_ratio']})",
    ]
    if reduced:
        lines.append(f"  reduced for CPU time (memory is dominated by the volume buffers, not the windows): "
                     f"{', '.join(reduced)}; config {results['config']}")
    print("\n".join(lines), file=out)


def _child_main(argv: list[str]) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    tta, image, out_dir, *checkpoints = argv
    from pipeline.benchmarks import bench

    result = bench.default_segment([Path(c) for c in checkpoints], Path(image), Path(out_dir), tta=tta)
    result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, list, type(None)))}
    sys.stdout.flush()
    print(CHILD_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        raise SystemExit(_child_main(sys.argv[2:]))
    raise SystemExit("usage: medseg bench --ensemble N [--tta mirror]")
