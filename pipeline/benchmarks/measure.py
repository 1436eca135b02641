"""Small measurement helpers for the benchmarks: medians, a matmul ceiling, FLOP counts, a child's peak RSS.

* :func:`median_time` — warm-up calls, then the median of ``repeats`` timed calls (``perf_counter``).
* :func:`matmul_ceiling` — fp32 square matmuls of a few sizes; the best median GFLOP/s is what this
  machine's BLAS reaches in this process (the ceiling a convolution network can be compared with).
* :func:`conv3d_ceiling` — a large 64→64-channel 3×3×3 ``conv3d`` (channels-last and contiguous, the
  better one): on some CPUs (AVX2 EPYC) oneDNN's convolution beats the BLAS matmul, so the matmul alone
  is no ceiling; the bench's "measured ceiling" is the best of the two.
* :func:`cpu_flags` / :func:`fma_peak` — the CPU's vector extensions from ``/proc/cpuinfo`` and its
  theoretical fp32 FMA peak, cores × (vector bits / 32) × FMA units × 2 × clock (see :func:`fma_peak`
  for where each factor comes from and what is assumed).
* :func:`network_flops` — FLOPs of one forward pass, counted by ``torch.utils.flop_counter``
  (convolutions and matmuls, 2 per multiply-add; normalisation/activations are not counted).
* :func:`peak_rss_child` — peak resident memory of one command run in a child process.

Why :func:`peak_rss_child` goes through a launcher: Linux keeps a process's ``ru_maxrss`` across
``exec`` and, when the process was forked (or vforked, as ``subprocess`` does) from a big parent, seeds
it with the *parent's* peak RSS. A child of a benchmark holding a few GB would report a few GB however
little it used. So a small launcher (a fresh interpreter, itself tainted but only ~10 MB resident)
starts the command, reads the command's own rusage with ``os.wait4(pid, 0)`` (not ``RUSAGE_CHILDREN``,
which mixes every reaped child) and reports it; the command's figure then only carries the launcher's
~10 MB, not ours. ``ru_maxrss`` is in KiB on Linux.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

_LAUNCHER = r"""
import json, os, subprocess, sys
cmd, result = json.loads(sys.argv[1]), sys.argv[2]
proc = subprocess.Popen(cmd)
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
with open(result, "w") as handle:
    json.dump({"maxrss_kib": usage.ru_maxrss, "returncode": proc.returncode,
               "user_s": usage.ru_utime, "system_s": usage.ru_stime}, handle)
"""


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """``(median seconds, every timed run)`` of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


@contextmanager
def torch_threads(threads: Optional[int]):
    """Temporarily set torch's intra-op thread count (``None``: leave it)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matmul_ceiling(threads: Optional[int] = None, sizes: Sequence[int] = (1024, 2048, 3072),
                   repeats: int = 3) -> float:
    """Best median fp32 GFLOP/s of ``n×n @ n×n`` over ``sizes`` (2·n³ FLOPs each), on the CPU."""
    import torch

    best = 0.0
    with torch_threads(threads), torch.inference_mode():
        generator = torch.Generator().manual_seed(0)
        for n in sizes:
            a = torch.randn(n, n, generator=generator)
            b = torch.randn(n, n, generator=generator)
            out = torch.empty(n, n)
            seconds, _ = median_time(functools.partial(torch.mm, a, b, out=out), repeats=repeats, warmup=1)
            best = max(best, 2.0 * n**3 / seconds / 1e9)
    return best


def conv3d_ceiling(threads: Optional[int] = None, channels: int = 64, spatial: Sequence[int] = (32, 48, 48),
                   batch: int = 1, repeats: int = 3) -> float:
    """Best median fp32 GFLOP/s of a ``channels``→``channels`` 3×3×3 ``conv3d`` (padding 1) on
    ``(batch, channels, *spatial)``, over the contiguous and the channels-last memory formats.

    FLOPs: 2 × batch × channels² × 27 × voxels (the multiply-adds of the convolution; the bias is not counted).
    """
    import torch

    best = 0.0
    flops = 2.0 * batch * channels * channels * 27 * math.prod(int(s) for s in spatial)
    with torch_threads(threads), torch.inference_mode():
        generator = torch.Generator().manual_seed(0)
        conv = torch.nn.Conv3d(channels, channels, 3, padding=1).eval()
        x = torch.randn(batch, channels, *spatial, generator=generator)
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            module, data = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            seconds, _ = median_time(functools.partial(module, data), repeats=repeats, warmup=1)
            best = max(best, flops / seconds / 1e9)
    return best


from pipeline.runtime import VECTOR_FLAGS, cpu_flags  # noqa: E402,F401  (the CPU's flags: shared with pipeline.infer)


def fma_peak(cpuinfo: Optional[str] = None, cores: Optional[int] = None, fma_units: Optional[int] = None,
             max_freq_khz: Optional[str] = None) -> dict:
    """The CPU's theoretical fp32 peak: cores × (vector bits / 32) × FMA units × 2 × clock, in GFLOP/s.

    * vector bits: 512 with ``avx512f``, 256 with ``avx2``/``avx``, else 128 (SSE), from the CPU's flags;
    * FMA units per core cannot be read from the CPU. Assumed: 2 (Intel since Haswell, AMD since Zen 2,
      Xeon Gold/Platinum with AVX-512; AVX-512 client and Xeon Silver parts have 1, Zen 1 has 2 of
      128 bits, so less). Override with ``fma_units`` or the ``MEDSEG_FMA_UNITS`` environment variable.
      Without the ``fma`` flag a multiply and an add issue separately: the same formula, an upper bound;
    * clock: ``/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq`` (the maximum, turbo included)
      where the kernel exposes it, else the highest ``cpu MHz`` in ``/proc/cpuinfo`` (the current clock:
      on VMs often the nominal one, so turbo can beat the "peak");
    * cores: physical cores this process may run on (hyperthreads share their core's FMA units): the
      CPUs of the affinity mask, at most the distinct (physical id, core id) pairs of ``/proc/cpuinfo``.

    ``cpuinfo`` / ``max_freq_khz``: the two files' text, for tests. Returns the figure and its factors.
    """
    text = cpuinfo if cpuinfo is not None else _read_text("/proc/cpuinfo")
    flags = cpu_flags(text)
    bits = 512 if "avx512f" in flags else 256 if ("avx2" in flags or "avx" in flags) else 128
    units_source = "argument"
    if fma_units is None:
        env = os.environ.get("MEDSEG_FMA_UNITS", "")
        fma_units, units_source = (int(env), "MEDSEG_FMA_UNITS") if env.strip().isdigit() else (2, "assumed")
    freq_text = max_freq_khz if max_freq_khz is not None else _read_text(
        "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    mhz, clock_source = None, None
    if freq_text.strip().isdigit():
        mhz, clock_source = int(freq_text.strip()) / 1000.0, "cpuinfo_max_freq"
    else:
        values = [float(line.split(":", 1)[1]) for line in text.splitlines()
                  if line.startswith("cpu MHz") and ":" in line]
        if values:
            mhz, clock_source = max(values), "cpu MHz"
    if cores is None:
        cores = _physical_cores(text)
    peak = cores * (bits / 32) * fma_units * 2 * mhz / 1000.0 if mhz else float("nan")
    return {"gflops": peak, "cores": cores, "vector_bits": bits, "fma_units": fma_units,
            "fma_units_source": units_source, "clock_mhz": mhz, "clock_source": clock_source,
            "fma": "fma" in flags}


def _physical_cores(cpuinfo: str) -> int:
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    pairs, physical = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            pairs.add((physical, value.strip()))
    return min(allowed, len(pairs)) if pairs else allowed


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def network_flops(network, input_shape: Sequence[int], batch: int = 1) -> int:
    """FLOPs of one forward of ``network`` on a ``(batch, *input_shape)`` zero tensor.

    ``input_shape`` is one sample's shape, channels first: ``(C, *spatial)``. The network is used as it
    is (call ``.eval()`` first for inference figures); it runs once under ``inference_mode``.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(iter(network.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = torch.zeros((int(batch), *(int(s) for s in input_shape)), device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network(x)
    return int(counter.get_total_flops())


def peak_rss_child(cmd: list[str], env: Optional[dict] = None, timeout: Optional[float] = None,
                   tail_chars: int = 4000) -> tuple[int, int, str]:
    """Run ``cmd``; ``(its peak RSS in bytes, its return code, the tail of its stdout + stderr)``.

    The figure is the command's own ``ru_maxrss`` (``os.wait4`` on its pid), read by a small launcher
    process so that it does not carry this process's memory (see the module docstring). Output goes to
    temporary files, so a chatty child cannot block on a full pipe.
    """
    with tempfile.TemporaryDirectory(prefix="medseg-rss-") as tmp:
        result_path = Path(tmp) / "rusage.json"
        out_path = Path(tmp) / "output.txt"
        with open(out_path, "wb") as out:
            launcher = subprocess.run(
                [sys.executable, "-c", _LAUNCHER, json.dumps([str(c) for c in cmd]), str(result_path)],
                stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False,
            )
        output = out_path.read_bytes()[-tail_chars:].decode("utf-8", errors="replace")
        if not result_path.is_file():
            raise RuntimeError(f"peak_rss_child: the launcher failed (exit {launcher.returncode}): {output}")
        result = json.loads(result_path.read_text())
    return int(result["maxrss_kib"]) * 1024, int(result["returncode"]), output


def cpu_info() -> dict:
    """What the figures depend on: CPU model, cores, torch threads, its SIMD level, versions."""
    import platform

    import torch

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = ""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    import monai

    try:
        load = [round(x, 2) for x in os.getloadavg()]  # another busy process skews every figure
    except OSError:
        load = None
    return {
        "cpu": model, "cpu_capability": capability, "vector_extensions": cpu_flags(), "cores": cores, "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__), "monai": str(monai.__version__), "python": platform.python_version(),
        "cuda": bool(torch.cuda.is_available()), "load_average": load,
    }
