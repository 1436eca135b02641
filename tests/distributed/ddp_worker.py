"""A training process for the distributed tests, run as ``python ddp_worker.py MODE ...`` (one process) or
under ``torchrun --nproc_per_node 2`` (one per rank): the trainer of ``medseg train`` with a tiny network.

Modes:
  ``same_samples DATA OUT STEPS [OVERRIDES]``: every step trains on a fixed, seeded global batch of
  ``GLOBAL_BATCH`` patches; rank r of W takes samples ``[r*n:(r+1)*n]`` of it, n = GLOBAL_BATCH / W
  (``FixedBatches``). Rank 0 saves the initial and final weights to OUT/initial.pt and OUT/weights.pt.
  ``die DATA OUT``: rank 1 exits (os._exit(17)) at its 2nd step, rank 0 goes on training.
  ``hang DATA OUT``: rank 1 sleeps for 10 minutes at its 2nd step (alive, silent), rank 0 goes on.
  ``stop_after_epoch CONFIG [OVERRIDES]``: ``medseg train``, every rank exiting (code 3) once epoch 1's
  checkpoint is written: an interrupted run for ``--resume``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.training.trainer import Trainer
from tests.helpers import tiny_config_overrides

GLOBAL_BATCH = 4  # patches per optimiser step over every rank, in same_samples


def global_batch(step: int) -> dict:
    """The step's ``GLOBAL_BATCH`` patches (16x16x8), seeded by the step: bright lesion blobs on noise."""
    g = torch.Generator().manual_seed(1000 + step)
    image = torch.rand(GLOBAL_BATCH, 1, 16, 16, 8, generator=g)
    label = (image > 0.7).float()
    image = image + 0.5 * label
    return {"image": image, "label": label}


class FixedBatches(Trainer):
    """The sampler hook of the equivalence test: rank r of W trains on samples [r*n:(r+1)*n] of the
    step's global batch, n = GLOBAL_BATCH / W; a world of one on all of it."""

    def setup(self, resume: bool) -> None:
        super().setup(resume)
        if self.world.is_main:  # the initial weights (DDP broadcasts rank 0's), to show training moved them
            torch.save({k: v.clone() for k, v in self.model.state_dict().items()}, self.out_dir / "initial.pt")

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.close()  # the loader's own batches are not used
        self._step = epoch * self.cfg.train.steps_per_epoch

    def next_batch(self):
        n = GLOBAL_BATCH // self.world.size
        batch = global_batch(self._step)
        self._step += 1
        share = slice(self.world.rank * n, (self.world.rank + 1) * n)
        return {key: value[share] for key, value in batch.items()}, 0.0


def failing_step(mode: str):
    """``Trainer.train_step`` where rank 1 fails at its 2nd step: it exits (``die``) or stops answering (``hang``)."""
    original = Trainer.train_step

    def train_step(self, batch):
        self._steps = getattr(self, "_steps", 0) + 1
        if self.world.rank == 1 and self._steps == 2:
            print(f"rank 1: {mode} at step 2", file=sys.stderr, flush=True)
            if mode == "die":
                os._exit(17)
            time.sleep(600)
        return original(self, batch)

    return train_step


def config(data: str, out: str, *extra: str):
    return load_config(None, tiny_config_overrides(
        f"data.root={data}", f"train.out_dir={out}", "train.device=cpu", "train.amp=false", "train.val_every=100",
        "sampling.cache=false", "sampling.samples_per_volume=1", "sampling.batch_size=1", *extra))


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    if argv[0] == "stop_after_epoch":
        from pipeline import distributed
        from pipeline.cli import main as medseg

        original = Trainer.on_epoch_end

        def on_epoch_end(self, epoch, *args):
            original(self, epoch, *args)
            distributed.barrier()  # rank 0 has written last.pt
            os._exit(3)

        Trainer.on_epoch_end = on_epoch_end
        return medseg(["train", "-q", *argv[1:]])
    mode, data, out = argv[:3]
    if mode == "same_samples":
        steps = int(argv[3])
        # Focal loss only: a voxel mean, so the mean of the ranks' losses is the global batch's loss. The
        # default Dice term is computed over the whole batch (batch=True) and would not split this way.
        cfg = config(data, out, "data.val_fraction=0", "loss.dice_weight=0", "train.epochs=1",
                     f"train.steps_per_epoch={steps}", "train.warmup_epochs=0", "train.lr=0.01", *argv[4:])
        trainer = FixedBatches(cfg)
        trainer.run()
        if trainer.world.is_main:
            torch.save(trainer.model.state_dict(), Path(out) / "weights.pt")
        return 0
    if mode in ("die", "hang"):  # through `medseg train`, as a user runs it
        from pipeline.cli import main as medseg
        from pipeline.config import save_config

        cfg = config(data, out, "data.val_fraction=0", "train.epochs=1", "train.steps_per_epoch=50")
        path = Path(f"{out}.rank{os.environ.get('RANK', '0')}.yaml")
        save_config(cfg, path)
        Trainer.train_step = failing_step(mode)
        return medseg(["train", "-q", str(path)])
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
