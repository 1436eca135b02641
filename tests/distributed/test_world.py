"""``pipeline.distributed`` without launching anything: the world from torchrun's variables, the timeout,
each rank's device, the collectives on a world of one, and the trainer's log columns single-process."""

from __future__ import annotations

import csv

import pytest
import torch

from pipeline import distributed
from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.training.trainer import LOG_COLUMNS, Trainer, _upgrade_log_header
from tests.helpers import tiny_config_overrides, torch_threads, write_msd_dataset


@pytest.fixture(autouse=True)
def _no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", distributed.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)


def test_world_from_torchrun_variables(monkeypatch):
    assert distributed.World.from_env() == distributed.World(1, 0, 0)
    assert not distributed.World.from_env().distributed and distributed.World.from_env().is_main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = distributed.World.from_env()
    assert world == distributed.World(4, 3, 1) and world.distributed and not world.is_main


@pytest.mark.parametrize("size, rank, expected", [("two", "0", "expected integers"), ("2", "2", "0 <= RANK < WORLD_SIZE")])
def test_bad_torchrun_variables_say_what_was_expected(monkeypatch, size, rank, expected):
    monkeypatch.setenv("WORLD_SIZE", size)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(ConfigError, match=expected):
        distributed.World.from_env()


def test_timeout_from_the_environment_wins(monkeypatch):
    assert distributed.timeout_seconds(300) == 300.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7.5")
    assert distributed.timeout_seconds(300) == 7.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="MEDSEG_DIST_TIMEOUT='soon': expected a number of seconds > 0"):
        distributed.timeout_seconds(300)


def test_config_timeout_must_be_positive():
    assert load_config(None, []).train.dist_timeout == 300.0
    with pytest.raises(ConfigError, match="train.dist_timeout"):
        load_config(None, ["train.dist_timeout=0"])


def test_each_rank_keeps_an_explicit_device(monkeypatch):
    world = distributed.World(2, 1, 1)
    assert distributed.local_device("cpu", world) == "cpu"
    assert distributed.local_device("cuda:0", world) == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.local_device("auto", world) == "cuda:1"  # GPU LOCAL_RANK
    assert distributed.local_device("cuda", distributed.World(8, 6, 6)) == "cuda:2"  # modulo the GPUs
    assert distributed.local_device("auto", distributed.World()) == "auto"  # single process: unchanged


def test_collectives_on_a_world_of_one_are_the_values_themselves():
    assert distributed.init("cpu", 5) == distributed.World()  # nothing to join
    assert distributed.all_reduce([2.0, 3.0], op="max") == [2.0, 3.0]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    with distributed.main_first():
        pass
    distributed.teardown()


def test_only_process_group_failures_become_distributed_errors():
    with pytest.raises(distributed.DistributedError, match="rank 0 of 1: a step failed: .*Timed out waiting"):
        with distributed.collective("a step"):
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv")
    with pytest.raises(FloatingPointError):  # the step's own errors pass unchanged
        with distributed.collective("a step"):
            raise FloatingPointError("training loss is nan")
    with pytest.raises(InputError):
        with distributed.collective("a step"):
            raise InputError("bad input")


def test_a_launchers_sigterm_says_which_rank_stopped_and_during_what(monkeypatch):
    """torchrun SIGTERMs the surviving ranks as soon as one dies: each says so, naming its stage."""
    import os
    import signal

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    before = signal.getsignal(signal.SIGTERM)
    try:
        distributed._stop_on_sigterm()
        with pytest.raises(distributed.DistributedError) as caught:
            with distributed.stage("step 2 of epoch 1"):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs at the next bytecode
                    pass
        assert str(caught.value).startswith("rank 0 of 2: stopped by the launcher (SIGTERM) during step 2 of "
                                            "epoch 1. Another rank has probably died")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second SIGTERM ends the process
        # a rank already ending with its own error (its collective failed) keeps that error
        distributed._stop_on_sigterm()
        with pytest.raises(distributed.DistributedError, match="a step failed: .*Connection reset"):
            try:
                with distributed.collective("a step"):
                    raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
            finally:  # as the CLI's teardown runs
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
    finally:
        signal.signal(signal.SIGTERM, before)
    assert distributed._stages == []


def test_single_process_log_has_world_size_1_and_the_batch(tmp_path):
    root = write_msd_dataset(tmp_path / "data", n_cases=2)
    cfg = load_config(None, tiny_config_overrides(
        f"data.root={root}", f"train.out_dir={tmp_path / 'run'}", "train.device=cpu", "data.val_fraction=0",
        "train.epochs=1", "train.steps_per_epoch=1", "sampling.batch_size=2", "sampling.samples_per_volume=1"))
    with torch_threads(1):
        result = Trainer(cfg).run()
    with open(result.log_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == LOG_COLUMNS
    assert (rows[0]["world_size"], rows[0]["global_batch"]) == ("1", "2")


def test_a_resumed_log_of_the_old_columns_gains_the_new_ones(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,train_loss,val_dice,best_val_dice,lr,seconds,data_seconds\n1,0.5,,,0.001,1.0,0.1\n")
    _upgrade_log_header(path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == LOG_COLUMNS
    assert rows[0]["train_loss"] == "0.5" and rows[0]["world_size"] == ""
