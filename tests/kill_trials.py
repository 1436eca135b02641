"""Random kill trials: ``medseg segment`` killed with SIGKILL at a random moment, then resumed.

``python -m tests.kill_trials --trials 20 --seed 0`` writes a batch of tiny synthetic cases (NIfTI
files and a DICOM series), segments it once to warm the cache (backend timing, ONNX export), then
once more without interruption (the reference, whose timeline — when the lock, each sidecar and the
exit appear — sets the kill windows), then for each trial starts
the same command as a subprocess (``python -m pipeline segment ...``), kills it (``kill -9``) at a
seeded random moment in one of the run's phases (start-up: imports, model and discovery; the first
case: planning, reading and inference; the cases: inference and writing; the final reports and
exit), the phases in turn, in every third trial kills the resuming run too, and finally runs the
command to completion. The output folder must then hold exactly the reference's files:
masks with the same voxels and affine, sidecars equal but for times and host, every NIfTI, JSON and
PNG complete, a manifest with one ``done`` row per case, no temporaries and no lock. It prints one
row per trial and a last line ``N of N resumed with identical outputs``; the exit code is 1 when a
trial failed.

The test (``tests/test_kill_trials.py``) runs a few trials of the same code.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (24, 24, 12)
N_NIFTI = 5
# Fields of a sidecar or manifest row that differ from run to run by their nature.
VOLATILE = {"started", "finished", "host", "seconds", "seconds_load", "seconds_infer", "seconds_post",
            "seconds_write", "resumed", "updated"}
PHASES = ("start-up", "first case", "cases", "reports")


# --- the batch -----------------------------------------------------------------------------------


def build_batch(folder: Path) -> tuple[Path, Path, list[str]]:
    """``folder/in`` (5 NIfTI scans + 1 DICOM series) and a tiny seeded checkpoint; the case ids."""
    from pipeline.io.dicom_write import write_dicom_series
    from tests.conftest import make_affine, save_nifti
    from tests.helpers import ct_case, tiny_checkpoint

    input_dir = folder / "in"
    affine = make_affine("LPS", spacing=(1.0, 1.0, 2.5))
    cases = []
    for k in range(N_NIFTI):
        save_nifti(ct_case(SHAPE, seed=k)[0], affine, input_dir / f"scan_{k}_0000.nii.gz")
        cases.append(f"scan_{k}")
    image = ct_case(SHAPE, seed=N_NIFTI)[0].astype(np.int16)
    write_dicom_series(image, make_affine("RAS", spacing=(0.9, 0.9, 2.0)), input_dir / "series")
    cases.append("series")
    # A random U-Net (seed 0): it labels a good part of each scan, so masks and lesion tables are not
    # empty; no component filter, so every labelled voxel stays.
    checkpoint = tiny_checkpoint(folder / "model.pt", "inference.min_component_mm3=0")
    return input_dir, checkpoint, sorted(cases)


def segment_command(input_dir: Path, out: Path, checkpoint: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "segment", "-q", str(input_dir), str(out), "--model",
            str(checkpoint), "--device", "cpu"]


def _env() -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _own_cache(workdir: Path) -> None:
    """ONNX exports and backend timings of the trials in ``workdir``, not the user's cache (the test
    session has its own already). The reference run measures; every later run reuses its choice."""
    os.environ.setdefault("MEDSEG_CACHE_DIR", str(workdir / "cache"))


def run_to_end(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


# --- the reference run and its timeline ------------------------------------------------------------


@dataclass
class Timeline:
    """Seconds from the start of an uninterrupted run: lock taken, first and last sidecar, exit."""

    lock: float
    first_sidecar: float
    last_sidecar: float
    end: float

    def window(self, phase: str) -> tuple[float, float]:
        return {"start-up": (0.0, self.lock), "first case": (self.lock, self.first_sidecar),
                "cases": (self.first_sidecar, self.last_sidecar),
                "reports": (self.last_sidecar, self.end)}[phase]


def reference_run(command: list[str], out: Path, n_cases: int) -> Timeline:
    """Run ``command`` to the end, watching ``out`` to time its phases."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = first = last = None
    while process.poll() is None:
        now = time.monotonic() - start
        if lock is None and (out / ".medseg.lock").exists():
            lock = now
        sidecars = len(list(out.glob("*_seg.json"))) if out.is_dir() else 0
        if first is None and sidecars:
            first = now
        if last is None and sidecars == n_cases:
            last = now
        time.sleep(0.002)
    end = time.monotonic() - start
    if process.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {process.returncode}): {process.stderr.read().decode()}")
    lock = lock if lock is not None else 0.5 * end
    first = first if first is not None else lock
    last = last if last is not None else first
    return Timeline(lock, first, last, end)


# --- checks --------------------------------------------------------------------------------------


def _normalised(data, out: Path):
    """``data`` without the run-to-run fields, with the output folder's path replaced by ``OUT``."""
    if isinstance(data, dict):
        return {k: _normalised(v, out) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [_normalised(v, out) for v in data]
    if isinstance(data, str):
        return data.replace(str(out), "OUT")
    return data


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(out: Path) -> dict:
    """What a finished output folder holds, in comparable form."""
    import nibabel as nib

    masks = {}
    for path in sorted(out.glob("*_seg.nii.gz")):
        image = nib.load(str(path))
        masks[path.name] = (np.asarray(image.dataobj).copy(), image.affine.copy(), path.read_bytes())
    return {
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "segment.log"),
        "masks": masks,
        "sidecars": {p.name: _normalised(json.loads(p.read_text()), out) for p in sorted(out.glob("*_seg.json"))},
        "manifest_csv": [_normalised(r, out) for r in _csv_rows(out / "manifest.csv")],
        "manifest_json": _normalised(json.loads((out / "manifest.json").read_text())["cases"], out),
        "lesions_csv": (out / "lesions.csv").read_text(),
    }


def check_outputs(out: Path, reference: dict, cases: list[str]) -> list[str]:
    """Problems of a resumed output folder against the reference snapshot (empty: none)."""
    from PIL import Image

    problems = []
    hidden = sorted(str(p.relative_to(out)) for p in out.rglob(".*"))
    if hidden:
        problems.append(f"temporaries or lock left: {hidden}")
    partial = sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name or ".partial" in p.name)
    if partial:
        problems.append(f"temporary names left: {partial}")
    try:
        for png in sorted((out / "qc").glob("*.png")):
            with Image.open(png) as picture:
                picture.load()
        got = snapshot(out)
    except Exception as exc:  # a partial NIfTI, JSON, CSV or PNG
        return problems + [f"unreadable output: {type(exc).__name__}: {exc}"]
    if got["files"] != reference["files"]:
        extra = sorted(set(got["files"]) - set(reference["files"]))
        missing = sorted(set(reference["files"]) - set(got["files"]))
        problems.append(f"files differ: extra {extra}, missing {missing}")
    for name, (array, affine, _) in reference["masks"].items():
        if name not in got["masks"]:
            continue
        other, other_affine, _ = got["masks"][name]
        if other.shape != array.shape or not np.array_equal(other, array):
            problems.append(f"{name}: voxels differ from the reference")
        if not np.array_equal(other_affine, affine):
            problems.append(f"{name}: affine differs from the reference")
    for key in ("sidecars", "lesions_csv"):
        if got[key] != reference[key]:
            problems.append(f"{key} differ from the reference")
    for key in ("manifest_csv", "manifest_json"):
        rows = got[key]
        if [r.get("case_id") for r in rows] != cases or any(r.get("status") != "done" for r in rows):
            problems.append(f"{key}: expected one done row per case {cases}, "
                            f"found {[(r.get('case_id'), r.get('status')) for r in rows]}")
        elif rows != reference[key]:
            problems.append(f"{key} rows differ from the reference")
    html = (out / "index.html").read_text(encoding="utf-8") if (out / "index.html").is_file() else ""
    if not html.rstrip().endswith("</html>") or any(c not in html for c in cases):
        problems.append("index.html incomplete")
    return problems


def mask_bytes_identical(out: Path, reference: dict) -> bool:
    return all((out / name).is_file() and (out / name).read_bytes() == data
               for name, (_, _, data) in reference["masks"].items())


# --- one trial -----------------------------------------------------------------------------------


@dataclass
class Kill:
    phase: str  # the phase aimed at: killed a random time into it (its reference length at most)
    delay: float  # seconds after the start
    hit: str  # what the folder showed after the kill: how far the run had got

    def __str__(self) -> str:
        return f"{self.phase} @{self.delay:.2f}s -> {self.hit}"


@dataclass
class Trial:
    number: int
    kills: list[Kill] = field(default_factory=list)
    final_exit: int = -1
    resumed_cases: int = 0
    problems: list[str] = field(default_factory=list)
    bytes_identical: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def _reached(phase: str, out: Path, n_cases: int, pid: int, since: float) -> bool:
    """Has the run ``pid``, started at ``since`` (``time.time()``), got to the start of ``phase``?"""
    if phase == "start-up":
        return True
    try:  # its own lock, not the stale one of a run killed before
        if json.loads((out / ".medseg.lock").read_text()).get("pid") != pid:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    if phase == "first case":
        return True
    sidecars = list(out.glob("*_seg.json"))
    if phase == "cases":
        return len(sidecars) == n_cases or any(_mtime(p) >= since for p in sidecars)
    return len(sidecars) == n_cases  # reports


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def kill_in(command: list[str], out: Path, n_cases: int, phase: str, delay: float) -> tuple[bool, float]:
    """Start ``command``, wait for ``phase`` to begin, SIGKILL it ``delay`` s later. Returns whether
    it was killed (False: it had ended before) and when (s after the start)."""
    since = time.time()
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None and not _reached(phase, out, n_cases, process.pid, since):
        time.sleep(0.002)
    try:
        process.wait(timeout=delay)
        return False, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        return True, time.monotonic() - start


def _how_far(out: Path, n_cases: int) -> str:
    if not out.is_dir() or not (out / ".medseg.lock").exists() and not (out / "manifest.json").exists():
        return "before the lock"
    sidecars = len(list(out.glob("*_seg.json")))
    if not (out / "manifest.json").exists():
        return "locked, no manifest"
    temporaries = len(list(out.rglob(".*.tmp*")))
    return f"{sidecars}/{n_cases} sidecars" + (f", {temporaries} tmp" if temporaries else "")


def run_trial(number: int, rng: random.Random, command: list[str], out: Path, timeline: Timeline,
              reference: dict, cases: list[str]) -> Trial:
    """Trial ``number`` aims its first kill at the phases in turn, a random time into it; every third
    trial kills the resuming run too (in a random phase) before the final run."""
    trial = Trial(number)
    double = number % 3 == 0
    for kill in range(2 if double else 1):
        phase = PHASES[(number - 1) % len(PHASES)] if kill == 0 else rng.choice(PHASES)
        low, high = timeline.window(phase)
        killed, when = kill_in(command, out, len(cases), phase, rng.uniform(0.0, max(high - low, 0.01)))
        trial.kills.append(Kill(phase, when, _how_far(out, len(cases)) if killed else "ended before the kill"))
    final = run_to_end(command)
    trial.final_exit = final.returncode
    if final.returncode != 0:
        trial.problems.append(f"final run exit {final.returncode}: {final.stderr.strip()[-500:]}")
    for line in final.stdout.splitlines():
        if line.startswith("done ") and "from an earlier run" in line:
            trial.resumed_cases = int(line.split("(")[1].split()[0])
    trial.problems += check_outputs(out, reference, cases)
    trial.bytes_identical = mask_bytes_identical(out, reference)
    return trial


def run_trials(n_trials: int, seed: int, workdir: Path, report=print) -> list[Trial]:
    """The whole experiment in ``workdir``; ``report`` gets the table's lines as they come."""
    import shutil

    _own_cache(workdir)
    input_dir, checkpoint, cases = build_batch(workdir)
    # A first run measures the backends and exports ONNX into the cache (once per machine setup):
    # the reference, whose timeline sets the kill windows, then runs as every trial's runs do.
    warm = run_to_end(segment_command(input_dir, workdir / "warm-up", checkpoint))
    if warm.returncode != 0:
        raise RuntimeError(f"the warm-up run failed (exit {warm.returncode}): {warm.stderr}")
    ref_out = workdir / "reference"
    timeline = reference_run(segment_command(input_dir, ref_out, checkpoint), ref_out, len(cases))
    reference = snapshot(ref_out)
    report(f"reference run: {len(cases)} cases ({N_NIFTI} NIfTI, 1 DICOM series), {timeline.end:.2f} s "
           f"(lock at {timeline.lock:.2f} s, sidecars {timeline.first_sidecar:.2f}-{timeline.last_sidecar:.2f} s)")
    labelled = {name: int((array > 0).sum()) for name, (array, _, _) in reference["masks"].items()}
    report(f"labelled voxels per reference mask: {labelled}")
    rng = random.Random(seed)
    report(f"{'trial':>5}  {'kills (aimed phase @ time -> what the folder held)':<78} {'exit':>4} "
           f"{'kept':>4} {'bytes':>5}  result")
    trials = []
    for number in range(1, n_trials + 1):
        out = workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        command = segment_command(input_dir, out, checkpoint)
        trial = run_trial(number, rng, command, out, timeline, reference, cases)
        trials.append(trial)
        kills = "; ".join(str(k) for k in trial.kills)
        report(f"{number:>5}  {kills:<78} {trial.final_exit:>4} {trial.resumed_cases:>4} "
               f"{'same' if trial.bytes_identical else 'diff':>5}  {'ok' if trial.ok else '; '.join(trial.problems)}")
    good = sum(t.ok for t in trials)
    report(f"{good} of {len(trials)} resumed with identical outputs")
    return trials


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kill_trials", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        trials = run_trials(args.trials, args.seed, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="medseg-kill-trials-") as folder:
            trials = run_trials(args.trials, args.seed, Path(folder))
    return 0 if all(t.ok for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
