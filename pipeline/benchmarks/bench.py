"""``medseg bench``: segment against a plain-MONAI baseline, the network against a matmul ceiling, memory,
loading and training throughput, in one run on synthetic CT.

:func:`run_bench` does everything and returns a dict (:data:`REQUIRED_KEYS` and the details);
:func:`print_table` prints it. Method:

* **Cases** (:mod:`pipeline.benchmarks.synthetic_ct`, cached in ``work_dir/cases``): a 512×512×400 and a
  256×256×128 CT at 0.8×0.8×1.0 mm, NIfTI, plus the large one as a DICOM series.
* **Models** (cached in ``work_dir/models``): a randomly initialised network from the config (seed 0)
  whose background bias is raised until ~1 % of the small case's voxels are labelled (as
  :mod:`pipeline.benchmarks.throughput` does: a random network labels ~40 %, which is not what a
  trained one costs downstream), with 2 output classes, and the same recipe with 8 classes.
* **segment vs plain MONAI**, on the small case by default (``compare_on``): ``segment_fn`` (ours: load /
  preprocess / infer / postprocess / write) and :func:`monai_baseline` (``LoadImaged`` + our preprocessing
  after the load step + ``sliding_window_inference`` with ``sw_batch_size=1``, eager network, the same roi,
  overlap, blending and weights + ``Invertd`` + argmax + ``SaveImage``), one untimed warm-up of each, then
  ``repeats`` alternating runs (ours, baseline, ours, ...). Figures are medians; the speedup is the ratio
  of the median wall times of whole calls (checkpoint loading included in both). The two masks are
  compared (Dice), since a fast wrong answer is no speedup.
* **Network efficiency**: FLOPs of one forward (``torch.utils.flop_counter``) × forwards ÷ the time spent
  in the network (``segment_fn``'s ``network_seconds``), against two ceilings: the **measured ceiling**,
  the best of an fp32 matmul (:func:`~pipeline.benchmarks.measure.matmul_ceiling`) and a large 64-channel
  ``conv3d`` (:func:`~pipeline.benchmarks.measure.conv3d_ceiling`) in the same process (on an AVX2 EPYC
  the network beat the matmul: it was no ceiling), and the CPU's **FMA peak**
  (:func:`~pipeline.benchmarks.measure.fma_peak`: cores × vector bits / 32 × FMA units × 2 × clock, from
  ``/proc/cpuinfo``; FMA units per core are assumed, 2 unless ``MEDSEG_FMA_UNITS`` says otherwise). The
  CPU model and its vector extensions (avx2, avx512f, avx512_vnni, amx, fma) are in ``machine``.
* **Peak RSS**: a ``segment`` of the large case in a child process (``python -m
  pipeline.benchmarks.bench --child-segment``, :func:`default_segment`), its own ``ru_maxrss``
  (:func:`~pipeline.benchmarks.measure.peak_rss_child`), with the 2- and the 8-class model. The
  2-class child's stage times are also ``segment_seconds_512x512x400`` (one run: it is the slowest
  figure here). GB means GiB (2**30 bytes).
* **Loading** (:func:`load_comparison`) the large case: our reader (``LoadScand``; for DICOM, discovery
  + ``LoadScand`` of the case) vs SimpleITK (``ReadImage`` / ``ImageSeriesReader`` +
  ``GetArrayFromImage``) and, for the record, MONAI's ``LoadImage``; alternating, medians, ratio ours /
  SimpleITK (target ≤ 1.2).
* **Training** (:func:`train_step_benchmark`): a ``Trainer`` on a small synthetic dataset (the config's
  ``synth`` shape), two warm-up steps, then ``train_steps`` optimiser steps; the data-wait fraction is the
  time blocked waiting for a batch over the whole step time.

``quick=True`` skips the large case (its figures are then those of the small case; ``cases`` in the result
says which shapes were used) and trains 2 steps: for tests and smoke runs. On a 2-core CPU a full run
with ``configs/demo.yaml`` took about 2 minutes (``repeats=2``; the synthetic cases are written once, ~20 s);
the ``lesion3d.yaml`` model (~240 GFLOP per 128×128×32 window; the demo's: 3.5 per 64×64×32) needs
minutes per segment of the large case and per baseline run, so count on half an hour or more.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from pipeline.benchmarks.measure import (
    conv3d_ceiling,
    cpu_info,
    fma_peak,
    matmul_ceiling,
    network_flops,
    peak_rss_child,
)
from pipeline.benchmarks.synthetic_ct import dicom_series_dir, make_ct

log = logging.getLogger(__name__)

LARGE_SHAPE = (512, 512, 400)
SMALL_SHAPE = (256, 256, 128)
SPACING = (0.8, 0.8, 1.0)
STAGES = ("load", "preprocess", "infer", "postprocess", "write")
REQUIRED_KEYS = (
    "speedup_vs_monai_baseline",
    "network_fraction_of_ceiling",
    "load_ratio_vs_simpleitk_nifti",
    "load_ratio_vs_simpleitk_dicom",
    "peak_rss_gb_512x512x400",
    "peak_rss_ratio_8_vs_2_classes",
    "segment_seconds_512x512x400",
    "train_data_wait_fraction",
)
CHILD_MARKER = "MEDSEG_BENCH_RESULT "
MODEL_RECIPE = 1  # bump when the benchmark model recipe changes, so cached checkpoints are rebuilt
GIB = float(2**30)

SegmentFn = Callable[[Path, Path, Path], dict]


# --- the segment under test ------------------------------------------------------------------------


def default_segment(checkpoint_path: Union[str, Path, Sequence[Union[str, Path]]], image_path: Union[str, Path],
                    out_dir: Union[str, Path], tta: Optional[str] = None) -> dict:
    """Segment ``image_path`` with the checkpoint and write the mask into ``out_dir``: what ``segment`` does.

    The contract (the benchmark relies on these keys): seconds per stage ``load``, ``preprocess``,
    ``infer``, ``postprocess``, ``write`` and ``total``; ``network_seconds`` (time inside the network's
    forward calls), ``forwards`` (their number), ``batch`` (windows per forward), optionally
    ``input_shape`` (one window, channels first; default ``(1, *inference.roi_size)``); ``mask_path``.

    The stages are those of ``medseg segment`` (:class:`~pipeline.infer.Segmenter`: ``read``, ``prepare``,
    ``predict``, ``finish``, then :func:`~pipeline.io.write.write_mask`); ``total`` includes loading the
    checkpoint and choosing the backend (timed once per machine, then remembered). Several checkpoints:
    an ensemble; ``tta``: ``none | mirror`` instead of the model's ``inference.tta``
    (:mod:`pipeline.benchmarks.ensemble_rss`).
    """
    from pipeline.infer import Segmenter
    from pipeline.io.write import write_mask

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = Segmenter.from_checkpoints(checkpoint_path, tta=tta)
    for runner in segmenter.runners:  # the backend choice: part of the total, not of the inference stage
        runner.forward()
    t0 = time.perf_counter()
    loaded = segmenter.read(str(image_path))
    t1 = time.perf_counter()
    prepared = segmenter.prepare(loaded)
    del loaded
    t2 = time.perf_counter()
    prediction = segmenter.predict(prepared)
    t3 = time.perf_counter()
    segmentation = segmenter.finish(prediction, prepared)
    t4 = time.perf_counter()
    mask_path = write_mask(segmentation.labels, segmentation.affine, out_dir / mask_name(image_path),
                           source=image_path)
    t5 = time.perf_counter()
    return {
        "load": t1 - t0, "preprocess": t2 - t1, "infer": t3 - t2, "postprocess": t4 - t3, "write": t5 - t4,
        "total": t5 - start, "network_seconds": prediction.network_seconds, "forwards": prediction.forwards,
        "windows": prediction.windows, "batch": segmenter.window_batch, "backend": segmenter.backend,
        "input_shape": [1, *segmenter.config.inference.roi_size], "mask_path": str(mask_path),
    }


def mask_name(image_path: Union[str, Path]) -> str:
    name = Path(image_path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return f"{name}_seg.nii.gz"


class NetworkTimer:
    """Counts a module's forward calls and the wall time spent in them (forward hooks)."""

    def __init__(self, network):
        self.network = network
        self.forwards, self.seconds, self.batch, self.input_shape = 0, 0.0, 0, None
        self._handles: list = []
        self._start = 0.0

    def _pre(self, module, args):
        self._start = time.perf_counter()
        if args and hasattr(args[0], "shape"):
            self.batch = max(self.batch, int(args[0].shape[0]))
            self.input_shape = tuple(int(s) for s in args[0].shape[1:])

    def _post(self, module, args, output):
        self.seconds += time.perf_counter() - self._start
        self.forwards += 1

    def __enter__(self) -> NetworkTimer:
        self._handles = [self.network.register_forward_pre_hook(self._pre),
                         self.network.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --- the plain-MONAI baseline ----------------------------------------------------------------------


def monai_baseline(checkpoint_or_network, config, image_path: Union[str, Path], out_dir: Union[str, Path],
                   device: Optional[str] = None) -> dict:
    """The same segmentation written the way a MONAI tutorial would, timed per stage.

    ``LoadImaged`` (MONAI's default reader, ``image_only``, ``ensure_channel_first``) → our preprocessing
    after its load step → ``sliding_window_inference`` (``sw_batch_size=1``, the config's roi, overlap and
    blending, eager network under ``no_grad``) → softmax → ``Invertd`` to the source grid → argmax →
    uint8 → ``SaveImage``. ``checkpoint_or_network``: a checkpoint path (``config`` may then be None: the
    checkpoint's) or a network (``config`` required). Same-padding 3D networks only. ``device``: default
    ``inference.device`` of the config (``auto``: CUDA when available).

    Returns seconds per stage and ``total`` (checkpoint loading included), ``network_seconds``,
    ``forwards``, ``batch``, ``mask_path`` and ``mask`` (the uint8 array, the source's shape).
    """
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, Invertd, LoadImaged, SaveImage

    from pipeline.runtime import resolve_device
    from pipeline.transforms.preprocess import preprocess_transforms

    start = time.perf_counter()
    network, config = _network_and_config(checkpoint_or_network, config)
    device = resolve_device(device or config.inference.device)
    network = network.to(device).eval()
    if config.model.spatial_dims != 3:
        raise ValueError("monai_baseline: 3D networks only (model.spatial_dims=3)")
    margin = getattr(network, "margin", None)
    if margin is not None and any(margin(tuple(config.inference.roi_size))):
        raise ValueError("monai_baseline: 'valid'-padding networks do not fit a plain sliding window")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = Compose(preprocess_transforms(config.preprocess).transforms[1:])
    inference = config.inference
    with NetworkTimer(network) as timer:
        t0 = time.perf_counter()
        data = LoadImaged(keys="image", image_only=True, ensure_channel_first=True)({"image": str(image_path)})
        t1 = time.perf_counter()
        data = preprocess(data)
        t2 = time.perf_counter()
        with torch.no_grad():
            logits = sliding_window_inference(
                data["image"][None].to(device), roi_size=list(inference.roi_size), sw_batch_size=1,
                predictor=network, overlap=inference.overlap, mode=inference.blend,
            )
        t3 = time.perf_counter()
        data["pred"] = torch.softmax(logits[0].float(), dim=0).cpu()
        del logits
        data = Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=False,
                       to_tensor=True)(data)
        pred = data["pred"]
        mask = pred.argmax(dim=0, keepdim=True).to(torch.uint8)
        mask.meta = dict(pred.meta)
        t4 = time.perf_counter()
        SaveImage(output_dir=str(out_dir), output_postfix="seg", output_ext=".nii.gz", output_dtype=np.uint8,
                  resample=False, separate_folder=False, print_log=False)(mask)
        t5 = time.perf_counter()
    mask_path = out_dir / mask_name(image_path)
    return {
        "load": t1 - t0, "preprocess": t2 - t1, "infer": t3 - t2, "postprocess": t4 - t3, "write": t5 - t4,
        "total": t5 - start, "network_seconds": timer.seconds, "forwards": timer.forwards, "batch": 1,
        "input_shape": list(timer.input_shape) if timer.input_shape else None,
        "mask_path": str(mask_path), "mask": np.asarray(mask[0].cpu().numpy(), dtype=np.uint8),
    }


def _network_and_config(checkpoint_or_network, config):
    import torch

    from pipeline.model import build_model
    from pipeline.model.checkpoint import load_checkpoint

    if isinstance(checkpoint_or_network, torch.nn.Module):
        if config is None:
            raise ValueError("monai_baseline: pass the config along with a network")
        return checkpoint_or_network, config
    ckpt = load_checkpoint(checkpoint_or_network)
    config = config or ckpt.config
    network = build_model(config.model, in_channels=1, out_channels=config.num_classes)
    network.load_state_dict(ckpt.state_dict)
    return network, config


# --- benchmark models ------------------------------------------------------------------------------


def bench_config(config, num_classes: int):
    """``config`` with ``num_classes`` labels (2: background + lesion; more: ``class_1`` ...) and no
    small-component removal (the plain-MONAI baseline has no such step: both do the same work)."""
    from pipeline.config import config_from_dict, config_to_dict

    raw = config_to_dict(config)
    raw["inference"]["min_component_mm3"] = 0.0
    if num_classes == 2:
        raw["data"]["labels"] = {"background": 0, "lesion": 1}
    else:
        raw["data"]["labels"] = {"background": 0, **{f"class_{c}": c for c in range(1, num_classes)}}
    return config_from_dict(raw)


def build_bench_models(folder: Union[str, Path], config, calibrate_on: Union[str, Path],
                       lesion_fraction: float = 0.01, classes: Sequence[int] = (2, 8)) -> dict[int, Path]:
    """Random networks (seed 0) from ``config`` with ``classes`` outputs, saved as checkpoints in ``folder``.

    Each one's background bias is raised so that ``lesion_fraction`` of the preprocessed ``calibrate_on``
    voxels get a foreground label (the calibration is plain MONAI sliding-window inference). The configs
    saved are :func:`bench_config`'s. Cached: a checkpoint made with the same recipe is reused.
    """
    import torch

    from pipeline.config import config_to_dict
    from pipeline.model import build_model
    from pipeline.model.checkpoint import Checkpoint, save_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    calibrate_on = Path(calibrate_on)
    image = None
    paths = {}
    for k in classes:
        cfg = bench_config(config, k)
        recipe = {"recipe": MODEL_RECIPE, "config": config_to_dict(cfg), "fraction": lesion_fraction,
                  "calibrate_on": calibrate_on.name, "calibrate_size": calibrate_on.stat().st_size,
                  "torch": str(torch.__version__)}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path, stamp = folder / f"bench_{k}class.pt", folder / f"bench_{k}class.recipe"
        paths[k] = path
        if path.is_file() and stamp.is_file() and stamp.read_text() == digest:
            continue
        if image is None:
            image = _preprocessed(cfg, calibrate_on)
        torch.manual_seed(0)
        network = build_model(cfg.model, in_channels=1, out_channels=k).eval()
        logits = _plain_logits(network, cfg, image)
        margin = (logits[1:].amax(dim=0) - logits[0]).flatten()
        sample = margin[:: max(1, margin.numel() // 1_000_000)].float()
        shift = float(torch.quantile(sample, 1 - lesion_fraction))
        with torch.no_grad():
            for head in _output_heads(network, k):
                head.bias[0] += shift
        save_checkpoint(path, Checkpoint(config=cfg, state_dict=network.state_dict()))
        stamp.write_text(digest)
    return paths


def _preprocessed(config, path: Path):
    from pipeline.transforms.preprocess import preprocess_transforms

    return preprocess_transforms(config.preprocess)({"image": str(path)})["image"]


def _plain_logits(network, config, image):
    import torch
    from monai.inferers import sliding_window_inference

    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    with torch.no_grad():
        return sliding_window_inference(x[None].float(), roi_size=list(config.inference.roi_size),
                                        sw_batch_size=config.inference.sw_batch_size, predictor=network,
                                        overlap=config.inference.overlap, mode=config.inference.blend)[0]


def _output_heads(network, k: int) -> list:
    """The convolutions that output the class logits: ``head`` (+ ``aux_heads``), else the last k-channel conv."""
    import torch

    heads = [getattr(network, "head", None)] + list(getattr(network, "aux_heads", None) or [])
    heads = [h for h in heads if h is not None and getattr(h, "bias", None) is not None]
    if heads:
        return heads
    convs = [m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
             and m.out_channels == k and m.bias is not None]
    if not convs:
        raise ValueError("build_bench_models: cannot find the network's output convolution")
    return convs[-1:]


# --- loading -----------------------------------------------------------------------------------------


def _read_ours_nifti(path: Path):
    from pipeline.transforms.load import LoadScand

    return LoadScand(keys="image")({"image": str(path)})["image"]


def _read_ours_dicom(folder: Path):
    from pipeline.config import InputConfig
    from pipeline.io.discover import discover
    from pipeline.transforms.load import LoadScand

    case = discover(folder, InputConfig()).cases[0]
    return LoadScand(keys="image")({"image": case.reader_input})["image"]


def _read_sitk_nifti(path: Path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _read_sitk_dicom(folder: Path):
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return sitk.GetArrayFromImage(reader.Execute())


def _read_monai(path: Path):
    from monai.transforms import LoadImage

    return LoadImage(image_only=True, ensure_channel_first=True)(str(path))


def load_comparison(nifti_path: Union[str, Path], dicom_dir: Optional[Union[str, Path]] = None,
                    repeats: int = 3, monai: bool = True) -> dict:
    """Seconds to read ``nifti_path`` (and the ``dicom_dir`` series): ours vs SimpleITK (vs MONAI ``LoadImage``).

    One untimed round (imports, page cache), then ``repeats`` rounds, each timing ours, SimpleITK, MONAI
    in turn. Returns per format the medians, every run and ``ratio`` = ours / SimpleITK.
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    formats = {"nifti": (Path(nifti_path), _read_ours_nifti, _read_sitk_nifti)}
    if dicom_dir is not None:
        formats["dicom"] = (Path(dicom_dir), _read_ours_dicom, _read_sitk_dicom)
    results: dict = {}
    for name, (path, ours, simpleitk) in formats.items():
        readers = {"ours": ours, "simpleitk": simpleitk}
        if monai:
            readers["monai"] = _read_monai
        times: dict[str, list] = {k: [] for k in readers}
        shapes = {}
        for round_ in range(repeats + 1):
            for reader_name, read in readers.items():
                if reader_name in shapes and shapes[reader_name] is None:
                    continue  # failed in the warm-up round
                try:
                    start = time.perf_counter()
                    array = read(path)
                    seconds = time.perf_counter() - start
                except Exception as exc:  # noqa: BLE001 - MONAI's reader for a format is optional here
                    if reader_name != "monai":
                        raise
                    log.warning("MONAI LoadImage cannot read %s: %s", path, exc)
                    shapes[reader_name] = None
                    continue
                shapes.setdefault(reader_name, list(array.shape))
                del array
                if round_ > 0:
                    times[reader_name].append(seconds)
        entry = {"path": str(path), "runs": times,
                 "seconds": {k: statistics.median(v) if v else None for k, v in times.items()}}
        entry["ratio"] = entry["seconds"]["ours"] / entry["seconds"]["simpleitk"]
        results[name] = entry
    return results


# --- training --------------------------------------------------------------------------------------


def train_step_benchmark(config, data_root: Union[str, Path], steps: int = 5, warmup: int = 2,
                         cases: int = 8, out_dir: Optional[Union[str, Path]] = None) -> dict:
    """Median optimiser-step seconds and the fraction of step time spent waiting for data.

    ``config``: a Config or a config path. A synthetic dataset (``cases`` training cases of the config's
    ``synth`` shape, no validation) is written to ``data_root`` (reused when present); a ``Trainer`` is set
    up on it (caching included, not timed) and runs ``warmup`` untimed steps (the first ones pay one-time
    costs: allocator growth, lazy initialisation) then ``steps`` timed ones. Each step is the wait for its
    batch (:meth:`Trainer.next_batch`) plus :meth:`Trainer.train_step`; the fraction is the sum of the
    waits over the sum of the steps. ``prefetch_depth`` in the result says whether batches were prepared
    in a background thread (see :mod:`pipeline.training.trainer`).
    """
    from pipeline.config import load_config
    from pipeline.synth import synthesize
    from pipeline.training.trainer import Trainer

    cfg = copy.deepcopy(load_config(config) if isinstance(config, (str, Path)) else config)
    data_root = Path(data_root)
    cases = max(int(cases), cfg.sampling.batch_size + 1)
    synthesize(data_root, cases=cases, seed=cfg.synth.seed, test_fraction=0.0, dicom_test_cases=0,
               shape=tuple(cfg.synth.shape), spacing=tuple(cfg.synth.spacing))
    cfg.data.root = str(data_root)
    cfg.data.val_fraction, cfg.data.val_cases = 0.0, []
    cfg.train.out_dir = str(out_dir or data_root.parent / f"{data_root.name}_run")
    cfg.train.steps_per_epoch = max(cfg.train.steps_per_epoch, warmup + steps)  # all in one epoch's batches
    trainer = Trainer(cfg)
    start = time.perf_counter()
    trainer.setup(resume=False)
    setup_seconds = time.perf_counter() - start
    trainer.on_epoch_start(0)
    trainer.model.train()
    waits, totals, shape = [], [], None
    try:
        for step in range(warmup + steps):
            start = time.perf_counter()
            batch, waited = trainer.next_batch()
            trainer.train_step(batch)
            total = time.perf_counter() - start
            shape = list(batch["image"].shape)
            if step >= warmup:
                waits.append(waited)
                totals.append(total)
    finally:
        trainer.close()
    return {
        "step_seconds": statistics.median(totals), "wait_seconds": statistics.median(waits),
        "data_wait_fraction": sum(waits) / sum(totals), "steps": steps, "warmup": warmup,
        "setup_seconds": setup_seconds, "batch_shape": shape, "num_workers": cfg.train.num_workers,
        "prefetch_depth": getattr(trainer._batches, "depth", 0), "device": str(trainer.device),
        "cases": cases, "runs": [{"wait": w, "total": t} for w, t in zip(waits, totals)],
    }


# --- segment vs baseline ---------------------------------------------------------------------------


def compare_segment(checkpoint: Path, image: Path, out_root: Path, repeats: int = 3,
                    segment_fn: Optional[SegmentFn] = None, warmup: int = 1, progress=None) -> dict:
    """Ours (``segment_fn``) and :func:`monai_baseline` alternately on ``image``; medians and Dice."""
    segment_fn = segment_fn or default_segment
    runs: dict[str, list] = {"ours": [], "baseline": []}
    last: dict[str, dict] = {}
    for round_ in range(warmup + repeats):
        for name in ("ours", "baseline"):
            out = out_root / f"{name}_{round_}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            if name == "ours":
                result = dict(segment_fn(checkpoint, image, out))
            else:
                result = monai_baseline(checkpoint, None, image, out)
            result["wall"] = time.perf_counter() - start
            result.pop("mask", None)
            last[name] = result
            if round_ >= warmup:
                runs[name].append(result)
            label = "warm-up" if round_ < warmup else f"run {round_ + 1 - warmup}/{repeats}"
            _say(progress, f"  {name:<8} {label}: {result['wall']:.2f} s")
            if round_ < warmup + repeats - 1:  # keep only the last round's masks (for the Dice)
                shutil.rmtree(out, ignore_errors=True)
    medians = {name: _medians(entries) for name, entries in runs.items()}
    masks = {name: last[name].get("mask_path") for name in last}
    return {
        "image": str(image), "repeats": repeats, "ours": medians["ours"], "baseline": medians["baseline"],
        "speedup": medians["baseline"]["wall"] / medians["ours"]["wall"],
        "dice": mask_dice(masks["ours"], masks["baseline"]) if all(masks.values()) else None,
        "runs": {name: [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in entries]
                 for name, entries in runs.items()},
        "last": last,
    }


def _medians(entries: list[dict]) -> dict:
    keys = list(STAGES) + ["total", "wall", "network_seconds", "forwards", "windows", "batch"]
    out = {}
    for key in keys:
        values = [e[key] for e in entries if isinstance(e.get(key), (int, float))]
        out[key] = statistics.median(values) if values else None
    return out


def mask_dice(a_path, b_path) -> dict:
    """Dice of the foreground (label > 0) of two masks on the same grid, and the share of equal labels."""
    import nibabel as nib

    a_img, b_img = nib.load(str(a_path)), nib.load(str(b_path))
    if not np.allclose(a_img.affine, b_img.affine, atol=1e-3):
        a_img, b_img = nib.as_closest_canonical(a_img), nib.as_closest_canonical(b_img)
    a, b = np.asarray(a_img.dataobj), np.asarray(b_img.dataobj)
    a, b = a.reshape(a.shape[:3]), b.reshape(b.shape[:3])
    if a.shape != b.shape:
        return {"dice": float("nan"), "agreement": float("nan"), "shapes": [list(a.shape), list(b.shape)]}
    fa, fb = a > 0, b > 0
    denominator = int(fa.sum()) + int(fb.sum())
    dice = 1.0 if denominator == 0 else 2.0 * int((fa & fb).sum()) / denominator
    return {"dice": dice, "agreement": float((a == b).mean()), "foreground_fraction": float(fa.mean())}


# --- peak memory of a segment in a child process ---------------------------------------------------


def child_segment(checkpoint: Path, image: Path, out_dir: Path, timeout: Optional[float] = None) -> dict:
    """Run :func:`default_segment` in a child process; its result plus ``peak_rss_bytes`` and ``wall``."""
    return child_result(["pipeline.benchmarks.bench", "--child-segment", str(checkpoint), str(image), str(out_dir)],
                        timeout, "the benchmark's child segment")


def child_result(module_args: Sequence[str], timeout: Optional[float], what: str) -> dict:
    """``python -m *module_args`` in a child process (this checkout first on its path): the JSON it prints
    after :data:`CHILD_MARKER`, plus its own ``peak_rss_bytes``/``peak_rss_gb`` and ``wall`` seconds."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    peak, returncode, output = peak_rss_child([sys.executable, "-m", *module_args], env=env, timeout=timeout,
                                              tail_chars=20000)
    wall = time.perf_counter() - start
    lines = [line for line in output.splitlines() if line.startswith(CHILD_MARKER)]
    if returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {returncode}): {output[-3000:]}")
    result = json.loads(lines[-1][len(CHILD_MARKER):])
    result.update(peak_rss_bytes=peak, peak_rss_gb=peak / GIB, wall=wall)
    return result


def _child_main(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    checkpoint, image, out_dir = argv
    from pipeline.benchmarks import bench  # the default implementation, looked up when called

    result = bench.default_segment(Path(checkpoint), Path(image), Path(out_dir))
    result = {k: v for k, v in result.items() if isinstance(v, (int, float, str, list, type(None)))}
    sys.stdout.flush()
    print(CHILD_MARKER + json.dumps(result), flush=True)
    return 0


# --- the whole benchmark ---------------------------------------------------------------------------


def run_bench(config_path, work_dir: Union[str, Path], repeats: int = 3, quick: bool = False,
              segment_fn: Optional[SegmentFn] = None, *, overrides: Sequence[str] = (),
              large_shape: Sequence[int] = LARGE_SHAPE, small_shape: Sequence[int] = SMALL_SHAPE,
              spacing: Sequence[float] = SPACING, compare_on: str = "small", train_steps: Optional[int] = None,
              train_cases: int = 8, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Every measurement of the module docstring; returns the results (:data:`REQUIRED_KEYS` + details).

    ``config_path``: the config (its model, preprocessing and inference settings; ``overrides`` are dotted
    ``key=value`` changes). ``work_dir`` keeps the synthetic cases, models and outputs (reused by a later
    run). ``segment_fn(checkpoint, image, out_dir) -> dict`` is the segment under test (default:
    :func:`default_segment`; see its contract). ``progress``: called with a line per step (default: stderr).
    """
    import torch

    from pipeline.config import load_config

    began = time.perf_counter()
    say = progress if progress is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(str(config_path) if config_path is not None else None, list(overrides))
    small_shape, large_shape = tuple(int(n) for n in small_shape), tuple(int(n) for n in large_shape)
    if quick:
        large_shape = small_shape
    steps = train_steps if train_steps is not None else (2 if quick else 5)

    say(f"synthetic CT: {_fmt_shape(small_shape)}" + ("" if quick else f" and {_fmt_shape(large_shape)}")
        + f" at {'x'.join(f'{s:g}' for s in spacing)} mm")
    cases_dir = work_dir / "cases"
    small = make_ct(cases_dir, small_shape, spacing, dicom=quick)
    large = small if quick else make_ct(cases_dir, large_shape, spacing, dicom=True)
    compare_image = large if compare_on == "large" else small
    compare_shape = large_shape if compare_on == "large" else small_shape

    say("models: random weights from the config, calibrated to ~1 % foreground (2 and 8 classes)")
    models = build_bench_models(work_dir / "models", config, calibrate_on=small)

    say("matmul ceiling")
    matmul = matmul_ceiling(sizes=(512, 1024, 2048) if quick else (1024, 2048, 3072))
    say("conv3d ceiling (64 channels) and the CPU's FMA peak")
    conv = conv3d_ceiling(spatial=(16, 32, 32) if quick else (32, 48, 48))
    peak = fma_peak()
    ceiling = max(matmul, conv)

    say(f"loading {_fmt_shape(large_shape)}: ours vs SimpleITK vs MONAI LoadImage")
    load = load_comparison(large, dicom_series_dir(large), repeats=repeats)

    say(f"segment vs plain MONAI on {_fmt_shape(compare_shape)} ({repeats} alternating runs after a warm-up)")
    compare = compare_segment(models[2], compare_image, work_dir / "out", repeats=repeats,
                              segment_fn=segment_fn, progress=say)
    network = _network_figures(models[2], compare, ceiling, peak["gflops"])

    rss = {}
    for k in (2, 8):
        say(f"peak RSS: segment of {_fmt_shape(large_shape)} with {k} classes in a child process")
        out = work_dir / "out" / f"rss_{k}class"
        shutil.rmtree(out, ignore_errors=True)
        rss[k] = child_segment(models[k], large, out)
        say(f"  {rss[k]['peak_rss_gb']:.2f} GiB, {rss[k]['total']:.1f} s")

    say(f"training: {steps} steps after 2 warm-up steps")
    train = train_step_benchmark(config, work_dir / "train_data", steps=steps, cases=train_cases,
                                 out_dir=work_dir / "train_run")

    results = {
        "speedup_vs_monai_baseline": compare["speedup"],
        "network_fraction_of_ceiling": network["fraction_of_ceiling"],
        "network_fraction_of_fma_peak": network["fraction_of_fma_peak"],
        "load_ratio_vs_simpleitk_nifti": load["nifti"]["ratio"],
        "load_ratio_vs_simpleitk_dicom": load["dicom"]["ratio"],
        "peak_rss_gb_512x512x400": rss[2]["peak_rss_gb"],
        "peak_rss_ratio_8_vs_2_classes": rss[8]["peak_rss_bytes"] / rss[2]["peak_rss_bytes"],
        "segment_seconds_512x512x400": rss[2]["total"],
        "train_data_wait_fraction": train["data_wait_fraction"],
        "quick": quick,
        "repeats": repeats,
        "config": str(config_path),
        "overrides": list(overrides),
        "machine": cpu_info(),
        "cases": {"large": {"shape": list(large_shape), "spacing": list(spacing), "path": str(large)},
                  "small": {"shape": list(small_shape), "spacing": list(spacing), "path": str(small)},
                  "compare_on": compare_on},
        "matmul_gflops": matmul,
        "conv3d_gflops": conv,
        "measured_ceiling_gflops": ceiling,
        "fma_peak_gflops": peak["gflops"],
        "fma_peak": peak,
        "network": network,
        "segment": {"ours": compare["ours"], "baseline": compare["baseline"], "dice": compare["dice"],
                    "runs": compare["runs"], "shape": list(compare_shape)},
        "load": load,
        "peak_rss": {f"{k}_classes": {key: value for key, value in r.items()} for k, r in rss.items()},
        "train": train,
        "bench_seconds": time.perf_counter() - began,
        "torch_threads": torch.get_num_threads(),
    }
    if quick:
        results["note"] = (f"quick run: the *_512x512x400 figures are those of the {_fmt_shape(small_shape)} case")
    return results


def _network_figures(checkpoint: Path, compare: dict, ceiling: float, peak: float = float("nan")) -> dict:
    """GFLOP/s of ours and the baseline; fractions of ``ceiling`` (the measured one) and of ``peak`` (FMA)."""
    from pipeline.model import build_model
    from pipeline.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    network = build_model(ckpt.config.model, in_channels=1, out_channels=ckpt.config.num_classes).eval()
    out = {"measured_ceiling_gflops": ceiling, "fma_peak_gflops": peak}
    for name in ("ours", "baseline"):
        last = compare["last"][name]
        medians = compare[name]
        shape = tuple(last.get("input_shape") or (1, *ckpt.config.inference.roi_size))
        flops = network_flops(network, shape, batch=1)  # per window; convolutions are linear in the batch
        batch = int(last.get("batch") or 1)
        forwards = medians.get("forwards") or 0
        seconds = medians.get("network_seconds") or float("nan")
        # useful work: the windows of the volume (a padded or duplicated window in a batch is not counted)
        windows = medians.get("windows") or batch * forwards
        gflops = flops * windows / seconds / 1e9 if seconds and forwards else float("nan")
        out[name] = {"gflop_per_window": flops / 1e9, "windows_per_forward": batch, "forwards": forwards,
                     "windows": windows,
                     "network_seconds": seconds, "gflops": gflops, "input_shape": list(shape)}
    out["fraction_of_ceiling"] = out["ours"]["gflops"] / ceiling
    out["baseline_fraction_of_ceiling"] = out["baseline"]["gflops"] / ceiling
    out["fraction_of_fma_peak"] = out["ours"]["gflops"] / peak if peak and math.isfinite(peak) else float("nan")
    return out


def _fmt_shape(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _say(progress, line: str) -> None:
    if progress is not None:
        progress(line)


def _num(value, fmt: str = ".2f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{fmt}}{unit}"


def print_table(results: dict, file=None) -> None:
    """The results as a readable table."""
    out = file or sys.stdout
    m = results.get("machine", {})
    seg, net, load, rss, train = (results.get(k, {}) for k in ("segment", "network", "load", "peak_rss", "train"))
    lines = [
        f"medseg bench: {m.get('cpu', '?')} ({m.get('cpu_capability', '?')}; "
        f"{' '.join(m.get('vector_extensions') or []) or 'no vector flags read'}), {m.get('cores', '?')} cores, "
        f"{m.get('torch_threads', '?')} torch threads, torch {m.get('torch', '?')}, monai {m.get('monai', '?')}; "
        f"load average at the start {m.get('load_average')}",
        f"config {results.get('config')}{' (quick)' if results.get('quick') else ''}; medians of "
        f"{results.get('repeats')} runs",
        "",
        f"segment vs plain MONAI on {_fmt_shape(seg.get('shape', []))}:",
        f"  {'stage':<12}{'ours (s)':>10}{'MONAI (s)':>11}",
    ]
    ours, base = seg.get("ours", {}), seg.get("baseline", {})
    for stage in (*STAGES, "total", "wall"):
        lines.append(f"  {stage:<12}{_num(ours.get(stage)):>10}{_num(base.get(stage)):>11}")
    dice = (seg.get("dice") or {}).get("dice")
    lines += [
        f"  speedup {_num(results.get('speedup_vs_monai_baseline'))}x (wall); Dice ours vs MONAI {_num(dice, '.4f')}",
        "",
        "network:",
        f"  ours   {_num(net.get('ours', {}).get('gflops'), '.1f')} GFLOP/s "
        f"({_num(net.get('ours', {}).get('forwards'), '.0f')} forwards x "
        f"{net.get('ours', {}).get('windows_per_forward', '-')} windows of "
        f"{_num(net.get('ours', {}).get('gflop_per_window'), '.1f')} GFLOP in "
        f"{_num(net.get('ours', {}).get('network_seconds'))} s)",
        f"  MONAI  {_num(net.get('baseline', {}).get('gflops'), '.1f')} GFLOP/s (batch 1)",
        f"  measured ceiling {_num(results.get('measured_ceiling_gflops'), '.1f')} GFLOP/s (best of matmul "
        f"{_num(results.get('matmul_gflops'), '.1f')} and 64-channel conv3d {_num(results.get('conv3d_gflops'), '.1f')}); "
        f"ours reaches {_num(results.get('network_fraction_of_ceiling'), '.1%')} of it",
        f"  FMA peak {_num(results.get('fma_peak_gflops'), '.1f')} GFLOP/s ({_peak_formula(results.get('fma_peak'))}); "
        f"ours reaches {_num(results.get('network_fraction_of_fma_peak'), '.1%')} of it",
        "",
        f"loading {_fmt_shape(results.get('cases', {}).get('large', {}).get('shape', []))}:",
        f"  {'format':<8}{'ours (s)':>10}{'SimpleITK':>11}{'MONAI':>9}{'ours/SITK':>11}",
    ]
    for fmt in ("nifti", "dicom"):
        entry = load.get(fmt)
        if entry:
            s = entry["seconds"]
            lines.append(f"  {fmt:<8}{_num(s.get('ours')):>10}{_num(s.get('simpleitk')):>11}"
                         f"{_num(s.get('monai')):>9}{_num(entry.get('ratio')):>11}  (target <= 1.2)")
    r2, r8 = rss.get("2_classes", {}), rss.get("8_classes", {})
    lines += [
        "",
        f"segment of {_fmt_shape(results.get('cases', {}).get('large', {}).get('shape', []))} in a child process:",
        f"  peak RSS {_num(r2.get('peak_rss_gb'))} GiB with 2 classes, {_num(r8.get('peak_rss_gb'))} GiB with 8 "
        f"(x{_num(results.get('peak_rss_ratio_8_vs_2_classes'))})",
        f"  {_num(results.get('segment_seconds_512x512x400'))} s: "
        + ", ".join(f"{stage} {_num(r2.get(stage))}" for stage in STAGES),
        "",
        f"training step: {_num(train.get('step_seconds'))} s median, waiting for data "
        f"{_num(results.get('train_data_wait_fraction'), '.1%')} of it (target <= 10 %); batch "
        f"{train.get('batch_shape')}, {train.get('num_workers')} loader workers, "
        f"{train.get('prefetch_depth')} batches prefetched by a thread",
        "",
        f"benchmark took {_num(results.get('bench_seconds'), '.0f')} s",
    ]
    if results.get("note"):
        lines.append(results["note"])
    print("\n".join(lines), file=out)


def _peak_formula(peak: Optional[dict]) -> str:
    if not peak:
        return "-"
    return (f"{peak.get('cores')} cores x {peak.get('vector_bits', 0) // 32} lanes x {peak.get('fma_units')} FMA "
            f"units ({peak.get('fma_units_source')}) x 2 x {_num(peak.get('clock_mhz'), '.0f')} MHz "
            f"({peak.get('clock_source')})")


def save_results(results: dict, path: Union[str, Path]) -> Path:
    """Write the results as JSON (numbers as numbers, NaN as null)."""
    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.integer,)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else None
        if isinstance(value, (str, int, bool)) or value is None:
            return value
        return str(value)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(results), indent=2) + "\n")
    return path


def main(argv=None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child-segment"]:
        return _child_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs" / "lesion3d.yaml"))
    parser.add_argument("--work-dir", default="runs/bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compare-on", choices=("small", "large"), default="small")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    results = run_bench(args.config, args.work_dir, repeats=args.repeats, quick=args.quick,
                        overrides=args.overrides, compare_on=args.compare_on)
    print_table(results)
    if args.json:
        save_results(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
