"""Batch throughput: does reading and writing hide behind inference?

``python -m pipeline.benchmarks.throughput`` writes 8 synthetic CT cases (``pipeline.synth``, the demo
config's size), builds a randomly initialised model from the demo config (its output bias shifted so
that it labels about 1 % of the voxels, as a trained model would: a random network labels ~40 %, and
lesion statistics and pictures of such masks are not what a real batch costs; ``--model`` takes a
trained checkpoint instead), and runs ``segment_folder`` on them, with the background loader/writer threads and without (the sequential baseline), alternating,
``--repeats`` times each after a warm-up. For each run it reports the wall time, the sum of the pure
inference times (``seconds_infer`` in the manifest: the network's sliding window) and their ratio;
then the medians. A ratio of 1.0 means reading, preprocessing, mapping back, statistics, QC pictures
and writing cost nothing on top of inference; the target with background threads is <= 1.15.

The ratio depends on the machine: the background stages need CPU time of their own. Where inference
runs on a GPU (or leaves cores idle) they overlap it for free; where CPU inference already keeps every
core busy, they take their time from it instead, so the inference time grows and the wall time does
not shrink. The summary therefore also prints both wall times and both inference totals.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def build_cases(folder: Path, n: int, shape, spacing, seed: int = 0) -> list[Path]:
    import nibabel as nib

    from pipeline.synth import make_case

    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        case = make_case(rng, shape=tuple(shape), spacing=tuple(spacing), n_lesions=3)
        image = nib.Nifti1Image(case.image, case.affine)
        image.set_sform(case.affine, code=1)
        image.set_qform(case.affine, code=1)
        path = folder / f"bench_{k:03d}_0000.nii.gz"
        nib.save(image, str(path))
        paths.append(path)
    return paths


def build_model(folder: Path, config_path: Path, overrides: list[str], calibrate_on: Path | None = None,
                lesion_fraction: float = 0.01) -> Path:
    """A random model from the config; with ``calibrate_on`` its lesion fraction on that scan is set."""
    import torch

    from pipeline.config import load_config
    from pipeline.infer import Segmenter
    from pipeline.model import build_model as build_network
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    config = load_config(str(config_path) if config_path.is_file() else None, overrides)
    network = build_network(config.model, in_channels=1, out_channels=config.num_classes)
    if calibrate_on is not None and config.num_classes == 2:
        segmenter = Segmenter(network, config, device="cpu")
        probs = segmenter.probabilities(segmenter.load(str(calibrate_on)).image)
        margin = torch.logit(probs[1].clamp(1e-6, 1 - 1e-6)).flatten()  # lesion - background logit
        shift = torch.quantile(margin[:: max(1, margin.numel() // 1_000_000)], 1 - lesion_fraction)
        with torch.no_grad():
            for module in network.modules():  # the output head(s)
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.out_channels == 2 \
                        and module.bias is not None:
                    module.bias[1] -= shift
    return save_checkpoint(folder / "bench.pt", Checkpoint(config=config, state_dict=network.state_dict()))


def one_run(input_dir: Path, output_dir: Path, segmenter, background: bool, qc: bool) -> dict:
    from pipeline.batch import segment_folder

    start = time.perf_counter()
    results = segment_folder(input_dir, output_dir, segmenter, overwrite=True, background=background, qc=qc)
    wall = time.perf_counter() - start
    failed = [r for r in results if r.status != "done"]
    if failed:
        raise RuntimeError(f"benchmark case {failed[0].case_id} did not finish: {failed[0].error}")
    infer = sum(r.seconds_infer for r in results)
    return {
        "background": background, "wall_s": wall, "infer_s": infer, "ratio": wall / infer,
        "load_s": sum(r.seconds_load for r in results), "post_s": sum(r.seconds_post for r in results),
        "write_s": sum(r.seconds_write for r in results),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.throughput",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode after the warm-up")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="model/inference config (default: demo)")
    parser.add_argument("--model", type=Path, default=None, help="a trained checkpoint instead of a random model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--no-qc", action="store_true", help="without QC pictures")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. synth.shape=[96,96,32]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from pipeline.config import load_config
    from pipeline.infer import Segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp:
        tmp = Path(tmp)
        config = load_config(str(args.config) if args.config.is_file() else None, args.overrides)
        (tmp / "in").mkdir()
        cases = build_cases(tmp / "in", args.cases, config.synth.shape, config.synth.spacing)
        model = args.model or build_model(tmp, args.config, args.overrides, calibrate_on=cases[0])
        segmenter = Segmenter.from_checkpoint(model, device=args.device)
        one_run(tmp / "in", tmp / "warmup", segmenter, background=True, qc=not args.no_qc)
        runs = []
        for repeat in range(args.repeats):
            for background in (True, False):
                run = one_run(tmp / "in", tmp / f"out_{int(background)}_{repeat}", segmenter, background,
                              qc=not args.no_qc)
                runs.append(run)
                print(f"{'background' if background else 'sequential':<11} wall {run['wall_s']:6.2f} s  "
                      f"inference {run['infer_s']:6.2f} s  ratio {run['ratio']:.3f}  (load {run['load_s']:.2f} s, "
                      f"post {run['post_s']:.2f} s, write {run['write_s']:.2f} s)", flush=True)
    summary = {
        "cases": args.cases, "shape": list(config.synth.shape), "device": str(segmenter.device),
        "model": str(args.model or "random (demo config, ~1 % lesion)"),
        "torch_threads": torch.get_num_threads(), "qc": not args.no_qc, "runs": runs,
        "ratio_background": statistics.median(r["ratio"] for r in runs if r["background"]),
        "ratio_sequential": statistics.median(r["ratio"] for r in runs if not r["background"]),
        "wall_background_s": statistics.median(r["wall_s"] for r in runs if r["background"]),
        "wall_sequential_s": statistics.median(r["wall_s"] for r in runs if not r["background"]),
        "infer_background_s": statistics.median(r["infer_s"] for r in runs if r["background"]),
        "infer_sequential_s": statistics.median(r["infer_s"] for r in runs if not r["background"]),
    }
    print(f"median ratio wall/inference over {args.repeats} run(s) of {args.cases} cases "
          f"{'x'.join(map(str, config.synth.shape))} on {summary['device']} ({summary['torch_threads']} threads): "
          f"background {summary['ratio_background']:.3f} (target <= 1.15), "
          f"sequential {summary['ratio_sequential']:.3f}")
    print(f"wall: background {summary['wall_background_s']:.2f} s, sequential {summary['wall_sequential_s']:.2f} s "
          f"(x{summary['wall_sequential_s'] / summary['wall_background_s']:.2f}); inference: "
          f"{summary['infer_background_s']:.2f} s alongside the background threads, "
          f"{summary['infer_sequential_s']:.2f} s alone")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
