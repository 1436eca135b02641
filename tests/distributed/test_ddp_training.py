"""``torchrun --nproc_per_node 2 -m pipeline train``: on a CPU with gloo, 2 processes on localhost.

* 2 ranks x batch b train the same weights as 1 rank x batch 2b on the same samples;
* the checkpoint of a 2-rank run is an ordinary one (no ``module.`` prefix) that single-process
  ``segment`` loads, its validation Dice is the single-process validation of its weights, and an
  interrupted 2-rank run resumed under 2 ranks ends with the weights of an uninterrupted one;
* a rank that dies, or hangs, ends the job in bounded time with a message naming what happened.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import pytest
import torch

from pipeline.config import load_config, save_config
from pipeline.model.checkpoint import load_checkpoint
from tests.distributed.launch import python, tail, torchrun
from tests.helpers import tiny_config_overrides, torch_threads, write_msd_dataset

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
pytestmark = pytest.mark.slow  # each torchrun job starts 2 Python processes with torch and MONAI (~10-30 s)


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_msd_dataset(tmp_path_factory.mktemp("ddp") / "data", n_cases=4, shape=(24, 24, 12))


def train_config(dataset: Path, out: Path, *extra: str):
    return load_config(None, tiny_config_overrides(
        f"data.root={dataset}", f"train.out_dir={out}", "train.device=cpu", "train.amp=false",
        "data.val_fraction=0.5", "train.epochs=2", "train.steps_per_epoch=2", "train.val_every=1",
        "train.warmup_epochs=0", "sampling.batch_size=1", "sampling.samples_per_volume=1", *extra))


def write_config(dataset: Path, out: Path, *extra: str) -> Path:
    path = out.with_suffix(".yaml")
    save_config(train_config(dataset, out, *extra), path)
    return path


# --- 2 x b == 1 x 2b ----------------------------------------------------------------------------------


def test_two_ranks_of_batch_b_train_the_weights_of_one_rank_of_batch_2b(dataset, tmp_path):
    """The same 3 steps (fixed seeded batches of 4 patches, augmentation and loader unused): one process
    on all 4, two ranks on 2 each (rank r: samples [2r, 2r+2)).

    Tolerance 1e-6 (absolute, weights of order 1): DDP averages the ranks' gradients; each rank's loss is a
    mean over its samples (focal loss: a voxel mean; instance norm: per sample), so the average of the two
    half-batch gradients is the full batch's gradient up to the order of the float32 sums (~1e-7 relative),
    and AdamW, the schedule and the gradient clipping then do the same on both sides. (Measured: 3e-8.)
    The default Dice term (one Dice over the whole batch) holds too, as it gathers the ranks' batches: see
    the next test. Batch norm without SyncBatchNorm would not (its statistics span the batch)."""
    one, two = tmp_path / "one", tmp_path / "two"
    done = python(WORKER, "same_samples", str(dataset), str(one), "3")
    assert done.returncode == 0, tail(done)
    done, _ = torchrun(WORKER, "same_samples", str(dataset), str(two), "3")
    assert done.returncode == 0, tail(done)

    a, b = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    initial = torch.load(one / "initial.pt")
    assert torch.equal(torch.cat([v.flatten() for v in initial.values()]),
                       torch.cat([v.flatten() for v in torch.load(two / "initial.pt").values()]))
    assert a.keys() == b.keys()
    moved = max((a[k] - initial[k]).abs().max().item() for k in a)
    differs = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training changed the weights...
    assert differs <= 1e-6  # ...the same way on both sides
    rows_one, rows_two = read_log(one / "log.csv"), read_log(two / "log.csv")
    assert rows_one[0]["train_loss"] == rows_two[0]["train_loss"]  # the mean over the 2 ranks' losses
    assert (rows_one[0]["world_size"], rows_one[0]["global_batch"]) == ("1", "1")
    assert (rows_two[0]["world_size"], rows_two[0]["global_batch"]) == ("2", "2")


def test_with_the_batch_dice_term_two_ranks_are_still_one_batch(dataset, tmp_path):
    """The default loss: Dice over the whole batch + focal. Under DDP the Dice term gathers every rank's
    logits and labels (``WorldDiceFocalLoss``), so it is the global batch's Dice and the gradient is one
    process's (the gather's backward sums the N ranks' shares, DDP's average divides by N). Without the
    gather the weights differed by about as much as the steps moved them (1.8e-2 against 2.1e-2)."""
    one, two = tmp_path / "one", tmp_path / "two"
    done = python(WORKER, "same_samples", str(dataset), str(one), "3", "loss.dice_weight=1")
    assert done.returncode == 0, tail(done)
    done, _ = torchrun(WORKER, "same_samples", str(dataset), str(two), "3", "loss.dice_weight=1")
    assert done.returncode == 0, tail(done)
    a, b = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    initial = torch.load(one / "initial.pt")
    assert max((a[k] - initial[k]).abs().max().item() for k in a) > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# --- a 2-rank run: its checkpoint, its validation, resume ----------------------------------------------


@pytest.fixture(scope="module")
def two_rank_run(dataset, tmp_path_factory) -> Path:
    """``torchrun --nproc_per_node 2 -m pipeline train CONFIG``: 2 epochs of 2 steps, validated each epoch."""
    out = tmp_path_factory.mktemp("two_rank") / "run"
    done, _ = torchrun("-m", "pipeline", "train", "-q", str(write_config(dataset, out)))
    assert done.returncode == 0, tail(done)
    assert done.stdout.count("best checkpoint:") == 1, done.stdout  # rank 0 alone reports
    return out


def test_rank_zero_writes_an_ordinary_checkpoint_and_a_log_of_the_world(two_rank_run, dataset):
    from pipeline.model import build_model

    rows = read_log(two_rank_run / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]  # one writer: no duplicated rows
    assert {(r["world_size"], r["global_batch"]) for r in rows} == {("2", "2")}
    assert sorted(p.name for p in two_rank_run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "log.csv",
                                                               "log.png"]
    ckpt = load_checkpoint(two_rank_run / "last.pt")
    assert ckpt.epoch == 2 and not any(k.startswith("module.") for k in ckpt.state_dict)
    network = build_model(ckpt.config.model, in_channels=1, out_channels=ckpt.config.num_classes)
    assert list(ckpt.state_dict) == list(network.state_dict())
    assert set(ckpt.extra) == {"optimizer", "scheduler", "grad_scaler"}


def test_two_rank_validation_is_the_single_process_validation(two_rank_run, dataset, tmp_path):
    """Each rank validated one of the 2 cases; the gathered mean is what one process computes."""
    from pipeline.training.trainer import Trainer

    logged = read_log(two_rank_run / "log.csv")[-1]["val_dice"]
    with torch_threads(1):
        trainer = Trainer(train_config(dataset, tmp_path / "single"))
        trainer.setup(resume=False)
        assert len(trainer.val_items) == 2
        trainer.model.load_state_dict(load_checkpoint(two_rank_run / "last.pt").state_dict)
        assert f"{trainer.validate():.4f}" == logged


def test_two_rank_checkpoint_segments_single_process(two_rank_run, dataset, tmp_path, capsys):
    from pipeline.cli import main

    with torch_threads(1):
        code = main(["segment", "-q", str(dataset / "imagesTr"), str(tmp_path / "seg"), "--device", "cpu",
                     "--no-qc", "--model", str(two_rank_run / "best.pt")])
    assert code == 0, capsys.readouterr().err
    masks = sorted((tmp_path / "seg").glob("*_seg.nii.gz"))
    assert [m.name for m in masks] == [f"case_{n:03d}_seg.nii.gz" for n in range(4)]
    assert all(nib.load(m).shape == (24, 24, 12) for m in masks)


def test_interrupted_two_rank_run_resumed_under_two_ranks_ends_as_an_uninterrupted_one(two_rank_run, dataset,
                                                                                       tmp_path):
    out = tmp_path / "run"
    config = write_config(dataset, out)
    done, _ = torchrun(WORKER, "stop_after_epoch", str(config))  # both ranks exit after epoch 1's checkpoint
    assert done.returncode != 0 and load_checkpoint(out / "last.pt").epoch == 1, tail(done)

    done, _ = torchrun("-m", "pipeline", "train", "-q", str(config), "--resume")
    assert done.returncode == 0, tail(done)
    resumed, whole = load_checkpoint(out / "last.pt"), load_checkpoint(two_rank_run / "last.pt")
    assert resumed.epoch == 2 and [r["epoch"] for r in read_log(out / "log.csv")] == ["1", "2"]
    for key, value in whole.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, rtol=0, atol=1e-6)
    assert resumed.best_metric == pytest.approx(whole.best_metric, abs=1e-6)


# --- a rank that dies or hangs ------------------------------------------------------------------------


def test_a_rank_that_dies_ends_the_job_quickly_with_a_clear_message(dataset, tmp_path):
    done, seconds = torchrun(WORKER, "die", str(dataset), str(tmp_path / "die"))
    assert done.returncode != 0
    assert "rank 1: die at step 2" in done.stderr
    # rank 0's own line: its gradient all_reduce lost its peer, or torchrun's SIGTERM (sent as soon as
    # rank 1 exits) reached rank 0 first, while it was still in step 1 or 2 ...
    lost_peer = "error: rank 0 of 2: step 2 of epoch 1 (averaging the gradients) failed" in done.stderr
    stopped = re.search(r"error: rank 0 of 2: stopped by the launcher \(SIGTERM\) during step [12] of epoch 1",
                        done.stderr)
    assert lost_peer or stopped, tail(done)
    assert "Another rank has probably died" in done.stderr
    assert "exitcode: 17" in done.stderr  # ... and torchrun names the rank that died
    assert seconds < 200, seconds  # startup (~10-40 s on a busy 2-core machine) + seconds, not a hang


def test_a_rank_that_hangs_ends_the_job_at_the_collective_timeout(dataset, tmp_path):
    """Rank 1 sleeps 10 minutes in its step; rank 0's all_reduce gives up after MEDSEG_DIST_TIMEOUT=5 s."""
    done, seconds = torchrun(WORKER, "hang", str(dataset), str(tmp_path / "hang"), MEDSEG_DIST_TIMEOUT="5")
    assert done.returncode != 0
    assert "error: rank 0 of 2: step 2 of epoch 1 (averaging the gradients) failed" in done.stderr, tail(done)
    assert "Timed out waiting 5000ms" in done.stderr
    assert seconds < 200, seconds  # not the 600 s of the sleeping rank
