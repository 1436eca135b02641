"""Run a command under ``torchrun --standalone --nproc_per_node N`` (a free port on localhost), as CI does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TORCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def child_env(**extra: str) -> dict:
    """This process's environment, one thread per process, the checkout importable, no torchrun variables."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: float = 400, rendezvous: bool = False,
             **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --standalone --nproc_per_node nproc ARGS``: the finished process and its wall seconds.
    ``rendezvous``: the multi-node form instead (``--nnodes 1 --rdzv_backend c10d --rdzv_endpoint
    127.0.0.1:PORT``), as each node of a cluster job runs it."""
    launch = (["--nnodes=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=medseg-test"]
              if rendezvous else ["--standalone"])
    command = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}", *args]
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def python(*args: str, timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in one process (no torchrun)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def tail(done: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (done.stdout + done.stderr)[-n:]
