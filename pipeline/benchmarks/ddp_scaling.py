"""1 process against N under ``torchrun``: training steps/s and batch-segmentation cases/min.

``python -m pipeline.benchmarks.ddp_scaling [--work-dir runs/ddp_bench] [--nproc 2]`` writes a synthetic CT
dataset (``pipeline.synth``, 160x160x48 voxels), then runs, each as its own command line:

* training, the demo config (``configs/demo.yaml``: features 8, patch 64x64x32, batch 2 x 2 patches) for 2
  epochs of ``--steps`` steps, no validation: one process with 1 thread, one process with N threads, and
  ``torchrun --nproc_per_node N`` with 1 thread per rank. The figure is epoch 2's time from ``log.csv``
  (epoch 1 holds the start-up): steps/s, and patches/s over every rank (the global batch);
* ``medseg segment`` of the training images (``--overwrite``) with the 1-process model, the same three
  ways; the figure is the whole command's wall time (process start, model load and the merge included).

The figures only mean something for the machine they were measured on; on a CPU, N processes share its
cores with each other (and with whatever else runs there), so this measures how DDP's overhead and the
split of the work compare with one process using the same cores through its threads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def _command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pipeline", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "pipeline", *args]


def _run(nproc: int, threads: int, args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(_command(nproc, args), cwd=ROOT, env=_env(threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} with {nproc} process(es) failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def measure_training(data: Path, out: Path, nproc: int, threads: int, steps: int) -> dict:
    from pipeline.config import load_config

    config = load_config(DEMO_CONFIG)
    wall = _run(nproc, threads, ["train", "-q", str(DEMO_CONFIG), f"data.root={data}", f"train.out_dir={out}",
                                 "train.epochs=2", f"train.steps_per_epoch={steps}", "data.val_fraction=0",
                                 "train.device=cpu", "train.warmup_epochs=0"])
    with open(out / "log.csv", newline="") as handle:
        row = list(csv.DictReader(handle))[-1]
    seconds = float(row["seconds"])
    patches = int(row["global_batch"]) * config.sampling.samples_per_volume
    return {"what": "train", "processes": nproc, "threads_per_process": threads, "steps": steps,
            "epoch_seconds": seconds, "steps_per_s": steps / seconds, "patches_per_s": steps * patches / seconds,
            "global_batch": int(row["global_batch"]), "wall_s": wall}


def measure_segment(images: Path, model: Path, out: Path, nproc: int, threads: int) -> dict:
    cases = len(list(images.glob("*.nii.gz")))
    wall = _run(nproc, threads, ["segment", "-q", str(images), str(out), "--model", str(model), "--device", "cpu",
                                 "--overwrite", "--no-qc"])
    return {"what": "segment", "processes": nproc, "threads_per_process": threads, "cases": cases, "wall_s": wall,
            "cases_per_min": 60.0 * cases / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/ddp_bench")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="training steps per epoch (default 8)")
    parser.add_argument("--cases", type=int, default=8, help="synthetic training cases = cases segmented")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from pipeline.synth import synthesize

    work = Path(args.work_dir)
    data = synthesize(work / "data", cases=args.cases, seed=0, test_fraction=0.0, dicom_test_cases=0)
    images = data / "imagesTr"
    n = args.nproc
    ways = [(1, 1), (1, n), (n, 1)]
    results = []
    for nproc, threads in ways:
        results.append(measure_training(data, work / f"train_{nproc}p{threads}t", nproc, threads, args.steps))
        print(json.dumps(results[-1]), flush=True)
    model = work / "train_1p1t" / "last.pt"
    for nproc, threads in ways:
        results.append(measure_segment(images, model, work / f"segment_{nproc}p{threads}t", nproc, threads))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'':<10}{'processes x threads':>22}{'steps/s':>10}{'patches/s':>11}{'cases/min':>11}{'wall s':>9}")
    for r in results:
        speed = (f"{r['steps_per_s']:>10.2f}{r['patches_per_s']:>11.1f}{'':>11}" if r["what"] == "train"
                 else f"{'':>10}{'':>11}{r['cases_per_min']:>11.1f}")
        print(f"{r['what']:<10}{r['processes']:>14} x {r['threads_per_process']:<5}{speed}{r['wall_s']:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
