"""The memory budget a plan fits its training step into (``--memory-gb`` overrides it).

* ``cpu``: :data:`CPU_FRACTION` of the machine's RAM (``MemTotal`` in ``/proc/meminfo``, else psutil, else
  :data:`FALLBACK_GB`): the rest holds the cached training volumes, the loader and the system.
* ``cuda``: the GPU's memory (``torch.cuda``), else :data:`FALLBACK_GB` with a note (planning on a machine
  without the GPU that will train).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

CPU_FRACTION = 0.25
FALLBACK_GB = 8.0
GIB = 2**30


def memory_budget(device: str, memory_gb: Optional[float] = None) -> tuple[float, str]:
    """``(bytes, reason)`` of the memory a training step may use on ``device`` (``cpu`` or ``cuda``)."""
    if memory_gb is not None:
        return float(memory_gb) * GIB, f"--memory-gb {memory_gb:g}"
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                return float(props.total_memory), f"GPU 0 ({props.name}): {props.total_memory / GIB:.1f} GiB"
        except Exception:  # noqa: BLE001 - any CUDA problem: plan for the fallback and say so
            pass
        return FALLBACK_GB * GIB, f"no CUDA GPU here: planned for {FALLBACK_GB:g} GiB (set --memory-gb)"
    total = ram_bytes()
    if total is None:
        return FALLBACK_GB * GIB, f"RAM unknown: planned for {FALLBACK_GB:g} GiB (set --memory-gb)"
    return CPU_FRACTION * total, f"{CPU_FRACTION:.0%} of {total / GIB:.1f} GiB RAM"


def ram_bytes() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().total)
    except ImportError:
        return None
