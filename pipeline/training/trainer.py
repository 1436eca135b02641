"""``train(config)``: the training procedure as a skeleton of named steps.

setup → for each epoch: on_epoch_start → train_epoch → (every ``val_every``) validate → save last/best →
log row. Checkpoints are self-describing (:mod:`pipeline.model.checkpoint`); ``resume=True`` continues
from ``last.pt`` with the weights and the optimiser, schedule and gradient-scaler state.

Resuming is bit for bit (tested on a CPU with ``train.num_workers = 0``): every random state an epoch
draws from is re-derived at its start from ``(train.seed, epoch)`` alone
(:func:`~pipeline.runtime.epoch_seeds`), in an uninterrupted run as in a resumed one, so nothing random
has to be saved. ``on_epoch_start`` seeds
torch's, numpy's and Python's global generators (dropout), the loader's ``generator`` (shuffle order) and
every MONAI randomizable transform of the dataset (patch centres, augmentation; ``set_rnd``, as MONAI's
``DataLoader`` does once at construction), and starts a fresh pass of the loader: an epoch draws exactly
``steps_per_epoch`` batches, from a new shuffle, never the rest of the previous epoch's pass. With
``train.num_workers > 0`` the shuffle order is re-seeded the same way, but the persistent workers keep the
transform random states they were seeded with at start-up, so a resumed run draws other augmentations.

Data loading overlaps the optimiser steps where that is free: with ``train.num_workers = 0`` and the
network on a GPU, or on a CPU with cores to spare (more than torch's threads), a background thread draws
the next batches from the loader (:class:`~pipeline.queues.Prefetch`, ``PREFETCH_BATCHES`` ahead) while the network trains
on the current one. It draws them in the same order with the same random state as the loop would, so
training is the same with or without it. Where torch's threads already use every core (a CPU with the
default settings) the thread would only take their time: measured on 2 cores, the steps grew by more
than the wait it hid, so there the loop loads batches itself (the cached preprocessing and crop indices
of :mod:`pipeline.training.data` keep that to a few % of a step). ``data_seconds`` in the log is the
time the loop waited for batches.

Under ``torchrun`` (:mod:`pipeline.distributed`) every rank runs this same skeleton on its own device:
``DistributedDataParallel`` wraps the network and averages the gradients, each rank draws its own
patches from ``(train.seed + rank, epoch)`` (rank 0 of a world of one draws exactly what a
single-process run draws), ``sampling.batch_size`` is per rank, and the validation cases are split
between the ranks and their per-case Dice gathered, so the validation Dice is the single-process one.
Only rank 0 writes ``config.yaml``, the checkpoints (of the bare network: no ``module.`` prefix),
``log.csv`` and the curves; every rank reads ``last.pt`` on ``resume``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from monai.data.utils import set_rnd

from pipeline import distributed
from pipeline.config import Config, save_config
from pipeline.errors import InputError
from pipeline.infer import Segmenter
from pipeline.metrics import case_dice
from pipeline.model import build_model
from pipeline.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.queues import Prefetch
from pipeline.runtime import epoch_seeds, resolve_device, seed_everything
from pipeline.training.data import split_cases, train_loader, validation_dataset
from pipeline.training.dataset_config import load_training_data
from pipeline.training.loss import build_loss
from pipeline.training.schedule import build_scheduler

log = logging.getLogger(__name__)

LOG_COLUMNS = ["epoch", "train_loss", "val_dice", "best_val_dice", "lr", "seconds", "data_seconds", "world_size",
               "global_batch"]
PREFETCH_BATCHES = 2  # batches prepared ahead of the training step


@dataclass
class TrainResult:
    best: Path
    last: Path
    log_csv: Path
    best_metric: float
    epochs: int


def train(config: Config, resume: bool = False, progress: bool = False, fold: Optional[int] = None) -> TrainResult:
    """Train one model; with ``fold`` (0-based), cross-validation fold ``fold`` of ``data.folds``: its
    validation cases are that fold's ``val`` list of ``train.out_dir/splits.json`` and it trains into
    ``train.out_dir/fold_<fold>/`` (:mod:`pipeline.training.folds`)."""
    return Trainer(config, progress=progress, fold=fold).run(resume=resume)


def train_folds(config: Config, resume: bool = False, progress: bool = False) -> list[TrainResult]:
    """Every cross-validation fold in turn (``medseg train --fold all``). A fold whose ``last.pt`` has
    reached ``train.epochs`` is skipped; with ``resume`` an unfinished fold continues from its ``last.pt``."""
    from pipeline.training.data import training_cases
    from pipeline.training.folds import fold_dir, fold_splits

    splits = fold_splits(config.train.out_dir, training_cases(config.data.root, config.data.max_cases,
                                                           config.train.seed), config)
    results = []
    for fold in range(len(splits)):
        last = fold_dir(config.train.out_dir, fold) / "last.pt"
        done = _completed(last, config.train.epochs)
        if done is not None:
            log.info("fold %d already trained (%s): skipped", fold, last)
            results.append(done)
            continue
        results.append(train(config, resume=resume and last.is_file(), progress=progress, fold=fold))
    return results


def _completed(last: Path, epochs: int) -> Optional[TrainResult]:
    """The result of a fold whose ``last.pt`` reached ``epochs``, else None."""
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last)
    if ckpt.epoch < min(epochs, (ckpt.extra or {}).get("shortened_to") or epochs):  # shortened by max_minutes
        return None
    best = last.with_name("best.pt")
    return TrainResult(best, last, last.with_name("log.csv"), ckpt.best_metric, ckpt.epoch)


class Trainer:
    def __init__(self, config: Config, progress: bool = False, fold: Optional[int] = None):
        self.fold = fold
        self.base_dir = Path(config.train.out_dir)
        if fold is not None:
            from pipeline.training.folds import check_fold, fold_config

            check_fold(config, fold)
            config = fold_config(config, fold)
        self.cfg = config
        self.out_dir = Path(config.train.out_dir)
        self.device = resolve_device(distributed.local_device(config.train.device, distributed.World.from_env()))
        self.world = distributed.init(self.device.type, config.train.dist_timeout)
        self.progress = progress and self.world.is_main
        self.amp_dtype = _amp_dtype(self.device) if config.train.amp else None

    # --- the skeleton ----------------------------------------------------------------------------

    def run(self, resume: bool = False) -> TrainResult:
        self.began = time.perf_counter()
        self.setup(resume)
        epoch_seconds: list[float] = []
        try:
            epoch = self.start_epoch
            while epoch < self.epochs:
                start = time.perf_counter()
                self.on_epoch_start(epoch)
                loss, data_seconds = self.train_epoch(epoch)
                # decided before validating, so that a shortened run's new last epoch validates
                self.fit_time_budget(epoch + 1, epoch_seconds + [time.perf_counter() - start])
                val = float("nan")
                if self._is_validation_epoch(epoch):
                    began = time.perf_counter()
                    val = self.validate()
                    self.validation_seconds = time.perf_counter() - began
                epoch_seconds.append(time.perf_counter() - start)
                self.on_epoch_end(epoch, loss, val, epoch_seconds[-1], data_seconds)
                epoch += 1
        finally:
            self.close()
        return TrainResult(self.best_path, self.last_path, self.log_path, self.best_metric, self.epochs)

    def fit_time_budget(self, done: int, epoch_seconds: list[float]) -> None:
        """``train.max_minutes``: after training ``done`` epochs, shorten the run to the epochs that fit the
        budget at the mean pace so far (earlier validations included), keeping time for a last validation (as
        long as the latest took), and end the learning-rate decay there. Under torchrun every rank takes the
        slowest rank's figures, so all ranks stop together."""
        limit = self.cfg.train.max_minutes * 60.0
        if not limit or done >= self.epochs:
            return
        elapsed, pace = time.perf_counter() - self.began, float(np.mean(epoch_seconds))
        reserve = self.validation_seconds if self.val_data is not None else 0.0
        if self.world.distributed:
            elapsed, pace, reserve = distributed.all_reduce([elapsed, pace, reserve], "max",
                                                            "agreeing on the time budget")
        fits = done + max(0, int((limit - elapsed - reserve) // pace))
        if fits >= self.epochs:
            return
        log.info("train.max_minutes %g: at %.1f s an epoch, %d of %d epochs fit (%.0f s spent): the run ends "
                 "at epoch %d", self.cfg.train.max_minutes, pace, fits, self.epochs, elapsed, fits)
        self.epochs = fits
        self.scheduler.horizon["total"] = max(1, self.epochs * self.cfg.train.steps_per_epoch)

    def setup(self, resume: bool) -> None:
        # The dataset decides the channels, labels and CT statistics (checked first, every problem listed).
        self.cfg, items = load_training_data(self.cfg)
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.best_path, self.last_path = self.out_dir / "best.pt", self.out_dir / "last.pt"
        self.log_path = self.out_dir / "log.csv"
        if self.world.is_main:
            save_config(cfg, self.out_dir / "config.yaml")

        self.model = build_model(cfg.model, in_channels=cfg.in_channels, out_channels=cfg.num_classes).to(self.device)
        # Fail now, not after caching the data, if the patch or window does not fit the network.
        self.model.output_size(tuple(cfg.sampling.patch_size))
        self.model.output_size(tuple(cfg.inference.roi_size))
        with distributed.main_first("rank 0 writing the fold splits"):
            self.train_items, self.val_items = self._split(items)
        if not self.train_items:
            raise InputError(f"no training cases left after the validation split of {len(items)} cases")
        log.info("training on %d cases, validating on %d", len(self.train_items), len(self.val_items))
        if self.world.distributed:
            log.info("rank %d of %d: batch %d per rank, global batch %d", self.world.rank, self.world.size,
                     cfg.sampling.batch_size, self.global_batch)
        self.loader = train_loader(self.train_items, cfg)
        # Each rank validates every world.size-th case (validate gathers the scores).
        share = self.val_items[self.world.rank::self.world.size]
        self.val_data = (validation_dataset(share, cfg) if share else []) if self.val_items else None
        self.net = self._wrap(self.model)

        self.loss_fn = build_loss(cfg.loss, cfg.model.deep_supervision)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.epochs = cfg.train.epochs  # fewer when train.max_minutes shortens the run (fit_time_budget)
        self.validation_seconds = 0.0  # the latest validation's (fit_time_budget keeps time for a last one)
        steps = cfg.train.epochs * cfg.train.steps_per_epoch
        self.scheduler = build_scheduler(
            self.optimizer, cfg.train.schedule, steps, cfg.train.warmup_epochs * cfg.train.steps_per_epoch
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.start_epoch, self.best_metric = 0, -math.inf
        if resume:
            self._restore()
        elif self.log_path.exists() and self.world.is_main:
            self.log_path.unlink()
        self._batches = None  # each epoch's batches: on_epoch_start

    def on_epoch_start(self, epoch: int) -> None:
        """Re-seed everything epoch ``epoch`` draws from, from ``(train.seed, epoch)``, and start its batches:
        a fresh pass of the loader, ``steps_per_epoch`` batches (see the module docstring)."""
        self.close()
        global_seed, loader_seed, transform_seed = epoch_seeds(self.cfg.train.seed + self.world.rank, epoch)
        seed_everything(global_seed)
        self.loader.generator.manual_seed(loader_seed)
        set_rnd(self.loader.dataset, transform_seed)
        batches = itertools.islice(_endless(self.loader), self.cfg.train.steps_per_epoch)
        depth = prefetch_depth(self.device, self.cfg.train.num_workers)
        self._batches = Prefetch(batches, depth) if depth > 0 else batches

    def close(self) -> None:
        """Stop the background batch preparation (``run`` does it at the end; safe to call twice)."""
        batches = getattr(self, "_batches", None)
        if isinstance(batches, Prefetch):
            batches.close()

    def next_batch(self) -> tuple[dict, float]:
        """The next batch of the epoch :meth:`on_epoch_start` began, and the seconds spent waiting for it."""
        if self._batches is None:
            raise RuntimeError("Trainer.next_batch: call on_epoch_start(epoch) first (it seeds and starts the epoch)")
        start = time.perf_counter()
        batch = next(self._batches)
        return batch, time.perf_counter() - start

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        losses, data_seconds = [], 0.0
        steps = range(self.cfg.train.steps_per_epoch)
        bar = _progress(steps, self.progress, f"epoch {epoch + 1}/{self.epochs}")
        for step in bar:
            with distributed.stage(f"step {step + 1} of epoch {epoch + 1}"):
                batch, waited = self.next_batch()
                data_seconds += waited
                with self._guard(f"step {step + 1} of epoch {epoch + 1} (averaging the gradients)"):
                    losses.append(self.train_step(batch))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        # The epoch's loss over every rank's batches (each rank's mean, averaged; equal batch sizes).
        (total,) = distributed.all_reduce([float(np.mean(losses))], what=f"averaging the loss of epoch {epoch + 1}")
        return total / self.world.size, data_seconds

    def train_step(self, batch: dict) -> float:
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True).round().long()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.net(image)  # DistributedDataParallel averages the gradients in backward
            loss = self.loss_fn(output, label)  # each head against the label at its voxels (valid padding)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()}: lower train.lr or check the input intensities")
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def validate(self) -> float:
        """Mean over validation volumes of each case's foreground Dice, :func:`~pipeline.metrics.case_dice`
        (a class absent from the truth scores 1 when it is not predicted either and 0 on a false positive,
        as in evaluation), each volume segmented whole by the public :class:`~pipeline.infer.Segmenter`.

        A fresh ``Segmenter`` per validation: it prepares its (fused) network once, from the weights of the
        moment. The torch backend always (an ONNX export per validation would cost more than it saves).
        """
        if self.val_data is None:
            return float("nan")
        segmenter = Segmenter(self.model, self.cfg, device=self.device, backend="torch")
        mine = []  # (index in val_items, Dice): this rank validates cases rank, rank + size, ...
        with torch.no_grad(), self._autocast():
            for n, item in enumerate(self.val_data):
                pred = segmenter.probabilities(item["image"]).argmax(0).cpu().numpy()
                truth = np.asarray(item["label"][0]).round().astype(np.int64)
                index = self.world.rank + n * self.world.size
                mine.append((index, case_dice(pred, truth, range(1, self.cfg.num_classes))))
        self.model.train()
        parts = distributed.all_gather_objects(mine, what="gathering the validation Dice")
        scores = [score for _, score in sorted(pair for part in parts for pair in part)]  # single-process order
        return float(np.mean(scores)) if scores else float("nan")

    def on_epoch_end(self, epoch: int, loss: float, val: float, seconds: float, data_seconds: float) -> None:
        improved = not math.isnan(val) and val > self.best_metric
        if improved:
            self.best_metric = val
        if not self.world.is_main:  # every rank keeps best_metric; rank 0 alone writes
            return
        last = self._checkpoint(epoch + 1)
        save_checkpoint(self.last_path, last)
        # best.pt: the best validated weights; until a first validation (or without any), the latest.
        if improved or self.val_data is None or math.isinf(self.best_metric):
            save_checkpoint(self.best_path, Checkpoint(self.cfg, last.state_dict, epoch + 1, self.best_metric))
        row = {
            "epoch": epoch + 1,
            "train_loss": f"{loss:.5f}",
            "val_dice": "" if math.isnan(val) else f"{val:.4f}",
            "best_val_dice": "" if math.isinf(self.best_metric) else f"{self.best_metric:.4f}",
            "lr": f"{self.scheduler.get_last_lr()[0]:.3g}",
            "seconds": f"{seconds:.1f}",
            "data_seconds": f"{data_seconds:.1f}",
            "world_size": self.world.size,
            "global_batch": self.global_batch,
        }
        self._append_log(row)
        self._plot_curves()
        log.info("epoch %d: loss %.4f val dice %s (%.1f s)", epoch + 1, loss, row["val_dice"] or "-", seconds)

    # --- helpers ---------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        """Volumes per optimiser step over every rank: ``world_size x sampling.batch_size``."""
        return self.world.size * self.cfg.sampling.batch_size

    def _guard(self, what: str):
        """Under torchrun, a failed or timed-out gradient all_reduce as a DistributedError; else nothing."""
        return distributed.collective(what) if self.world.distributed else contextlib.nullcontext()

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in ``DistributedDataParallel`` under torchrun (it broadcasts rank 0's initial weights),
        else ``model`` itself. The checkpoints save ``model`` (the bare network) either way."""
        if not self.world.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        with distributed.collective("wrapping the network in DistributedDataParallel"):
            return DistributedDataParallel(model, device_ids=device_ids)

    def _split(self, items: list[dict]) -> tuple[list[dict], list[dict]]:
        """The fold's cases from ``splits.json`` (written once beside the folds, with the resolved
        config), else the ``data.val_fraction`` / ``data.val_cases`` split."""
        if self.fold is None:
            return split_cases(items, self.cfg)
        from pipeline.training.folds import fold_items, fold_splits

        splits = fold_splits(self.base_dir, items, self.cfg)
        if not (self.base_dir / "config.yaml").is_file():
            save_config(dataclasses.replace(self.cfg, train=dataclasses.replace(
                self.cfg.train, out_dir=str(self.base_dir))), self.base_dir / "config.yaml")
        log.info("fold %d of %d", self.fold, len(splits))
        return fold_items(items, splits, self.fold)

    def _is_validation_epoch(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.train.val_every == 0 or epoch + 1 == self.epochs

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _checkpoint(self, epoch: int) -> Checkpoint:
        extra = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),  # empty when disabled (CPU, bf16)
        }
        if self.epochs < self.cfg.train.epochs:
            extra["shortened_to"] = self.epochs  # by train.max_minutes: kept by a resume, and by --fold all
        return Checkpoint(self.cfg, self.model.state_dict(), epoch, self.best_metric, extra=extra)

    def _restore(self) -> None:
        if not self.last_path.is_file():
            raise InputError(f"--resume: no checkpoint to resume from at '{self.last_path}'; run without --resume")
        ckpt = load_checkpoint(self.last_path, map_location=str(self.device))
        self.model.load_state_dict(ckpt.state_dict)
        if ckpt.extra:
            self.optimizer.load_state_dict(ckpt.extra["optimizer"])
            self.scheduler.load_state_dict(ckpt.extra["scheduler"])
            if ckpt.extra.get("grad_scaler"):
                self.scaler.load_state_dict(ckpt.extra["grad_scaler"])
            shortened = ckpt.extra.get("shortened_to")
            if shortened and self.cfg.train.max_minutes and shortened < self.epochs:  # by train.max_minutes
                self.epochs = int(shortened)
                self.scheduler.horizon["total"] = max(1, self.epochs * self.cfg.train.steps_per_epoch)
        self.start_epoch = ckpt.epoch
        self.best_metric = ckpt.best_metric if not math.isnan(ckpt.best_metric) else -math.inf
        # The random states need no restoring: on_epoch_start derives them from (seed, epoch).
        log.info("resuming from %s at epoch %d", self.last_path, self.start_epoch)

    def _append_log(self, row: dict) -> None:
        new = not self.log_path.exists()
        if not new:
            _upgrade_log_header(self.log_path)
        with open(self.log_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _plot_curves(self) -> None:
        """``log.png`` beside ``log.csv``: loss and validation Dice per epoch. A plot never fails training."""
        target = self.log_path.with_suffix(".png")
        try:
            from pipeline.training.curves import plot_training_curves

            plot_training_curves(self.log_path, target)
        except Exception as exc:  # noqa: BLE001 - any plotting problem only costs the picture
            log.warning("could not plot the training curves to %s: %s", target, exc)


def _upgrade_log_header(path: Path) -> None:
    """A ``log.csv`` from before the ``LOG_COLUMNS`` of today (resumed): rewritten with them, old cells kept."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames == LOG_COLUMNS:
            return
        rows = list(reader)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _endless(loader):
    """Batches forever, re-iterating the loader so every pass draws new patches and augmentations.

    (``itertools.cycle`` would replay the first pass's batches.)
    """
    if len(loader) == 0:
        raise InputError("the training loader yields no batch: add training cases or lower sampling.batch_size")
    while True:
        yield from loader


def prefetch_depth(device: torch.device, num_workers: int) -> int:
    """Batches to prepare in a background thread: ``PREFETCH_BATCHES`` where that overlaps for free, else 0.

    Loader workers already prepare batches ahead in their processes; on a CPU whose cores torch's threads
    all use, a thread would slow the steps down (oversubscription) more than it hides.
    """
    if num_workers > 0 or PREFETCH_BATCHES <= 0:
        return 0
    if device.type != "cpu":
        return PREFETCH_BATCHES
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return PREFETCH_BATCHES if cores > torch.get_num_threads() else 0


def _amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """Mixed precision only on CUDA (bf16 where supported, else fp16); never on a CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _progress(iterable, enabled: bool, desc: str):
    from pipeline.progress import progress_bar  # a bar on a terminal only; elsewhere the epoch log line

    return progress_bar(iterable, enabled=enabled, desc=desc, leave=False, unit="step")
