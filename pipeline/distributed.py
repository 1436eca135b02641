"""Several processes under ``torchrun``: who am I (rank), the process group, and the few collectives we use.

``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``) starts one process per GPU (or per CPU slot); without it ``WORLD_SIZE`` is unset and every
function here is a no-op on a world of one, so the same code runs single-process.

The process group uses NCCL when the processes compute on CUDA and gloo otherwise, with a timeout on
every collective (``timeout_s``; the environment variable ``MEDSEG_DIST_TIMEOUT`` overrides it), so a rank
that stops answering ends the job with :class:`DistributedError` instead of a hang. A rank that *dies*
is usually noticed sooner: gloo's connections close, and torchrun tears the whole group down. When
torchrun's SIGTERM reaches a rank before its own collective has failed, that rank still says what it
was doing (:func:`stage`) and why it stopped, as a :class:`DistributedError`, instead of dying silently.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

from pipeline.errors import ConfigError, MedsegError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MEDSEG_DIST_TIMEOUT"
PEER_HINT = ("Another rank has probably died or hangs: see its log (torchrun names the failed rank); a slow step "
             f"longer than the collective timeout can be allowed with {TIMEOUT_ENV}=SECONDS")

_stages: list[str] = []  # what this rank is doing, innermost last (main thread only)


class DistributedError(MedsegError):
    """A collective failed or timed out: another rank died, hung or could not be reached."""

    exit_code = 1


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (``local_rank`` on its node)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """From torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; a world of one when they are unset."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ConfigError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r}, LOCAL_RANK="
                f"{os.environ.get('LOCAL_RANK')!r}: expected integers (as torchrun sets them); unset them to "
                "run single-process") from None
        if size < 1 or not 0 <= rank < size:
            raise ConfigError(f"RANK={rank} of WORLD_SIZE={size}: expected 0 <= RANK < WORLD_SIZE (torchrun sets "
                              "both); unset them to run single-process")
        return cls(size, rank, local)


def world() -> World:
    """The job as this process sees it: the initialised process group if any, else the environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_world_size(), dist.get_rank(), World.from_env().local_rank)
    return World.from_env()


def timeout_seconds(default: float) -> float:
    """``MEDSEG_DIST_TIMEOUT`` (seconds) when set, else ``default``."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None or text == "":
        return float(default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds > 0, e.g. 300")
    return value


def local_device(name: str, current: World) -> str:
    """The device of this rank: with CUDA asked for (``auto``/``cuda``) and several GPUs, GPU
    ``local_rank`` (modulo the count); an explicit ``cuda:N`` or ``cpu`` is kept."""
    import torch

    if current.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{current.local_rank % torch.cuda.device_count()}"
    return name


def init(device_type: str, timeout_s: float, backend: Optional[str] = None) -> World:
    """Join the job's process group (once; later calls return the world). NCCL for ``device_type`` cuda,
    gloo otherwise (or ``backend``). A world of one initialises nothing."""
    import torch
    import torch.distributed as dist

    current = World.from_env()
    if not current.distributed or dist.is_initialized():
        return world()
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(current.local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_seconds(timeout_s))
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as exc:
        raise DistributedError(
            f"rank {current.rank} of {current.size} could not join the process group ({backend}, "
            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
            f"{_first_line(exc)}. Start every rank with the same torchrun --rdzv_endpoint") from exc
    log.info("rank %d of %d joined the %s process group (collective timeout %.0f s)", current.rank, current.size,
             backend, timeout.total_seconds())
    _stop_on_sigterm()
    return world()


def _stop_on_sigterm() -> None:
    """torchrun SIGTERMs the surviving ranks as soon as one dies, often before their own collective has
    noticed: turn it into a :class:`DistributedError` naming this rank's :func:`stage`, so each rank's log
    says why it stopped. Only the main thread can install it; elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stopped(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        if isinstance(sys.exc_info()[1], MedsegError):
            return  # this rank is already ending with its own error (e.g. its collective failed): let it say so
        current = World.from_env()
        during = f" during {_stages[-1]}" if _stages else ""
        raise DistributedError(f"rank {current.rank} of {current.size}: stopped by the launcher (SIGTERM)"
                               f"{during}. {PEER_HINT}")

    signal.signal(signal.SIGTERM, stopped)


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Name what this rank is doing (``"step 2 of epoch 1"``) for the message of a launcher's SIGTERM."""
    _stages.append(what)
    try:
        yield
    finally:
        _stages.pop()


def teardown() -> None:
    """Leave the process group (safe to call when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a :class:`DistributedError` saying which rank saw it."""
    try:
        with stage(what):
            yield
    except Exception as exc:  # gloo/NCCL raise DistError (RuntimeError) on a dead peer or a timeout
        if not is_collective_failure(exc):
            raise
        current = world()
        raise DistributedError(
            f"rank {current.rank} of {current.size}: {what} failed: {_first_line(exc)}. {PEER_HINT}") from exc


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a process group's failure (a dead or silent peer, a timeout), not the step's own."""
    import torch.distributed as dist

    if isinstance(exc, MedsegError):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "nccl", "timed out", "connection closed", "connection reset", "peer"))


def barrier(what: str = "waiting for the other ranks") -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with collective(what):
            dist.barrier()


def all_reduce(values: list[float], op: str = "sum", what: str = "an all_reduce") -> list[float]:
    """``values`` reduced (``sum`` | ``max``) over the ranks, in float64 on the CPU (gloo) or the GPU (NCCL)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    with collective(what):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def all_gather_objects(value, what: str = "an all_gather") -> list:
    """Every rank's ``value`` (picklable), in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list = [None] * dist.get_world_size()
    with collective(what):
        dist.all_gather_object(out, value)
    return out


@contextlib.contextmanager
def main_first(what: str = "rank 0 preparing shared files") -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writing a file every rank then reads); the others after it."""
    current = world()
    if not current.is_main:
        barrier(what)
    yield
    if current.is_main:
        barrier(what)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
