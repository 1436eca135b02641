"""``torchrun --nproc_per_node N -m pipeline segment IN OUT --model M``: one shard per rank, one merged manifest.

Rank ``r`` of ``N`` runs the ordinary sharded batch (``--shard r+1/N``: its own lock, manifest part and
log in the shared output folder; on its own GPU, ``cuda:LOCAL_RANK``, where there are several). When every
rank is done (an ``all_reduce`` of the exit codes, on gloo: two integers, so no GPU is involved), rank 0
merges the parts into ``manifest.csv``/``.json``, ``lesions.csv`` and ``index.html`` exactly as
``medseg manifest`` does. The job's exit code is the worst rank's (a failed merge counts too), on every
rank. Resume works as for shards: a case already done with the same model and settings is kept.

The only collectives are at the end, where ranks that finished early wait for the slowest one, which can
be long on thousands of cases: their timeout is ``MEDSEG_DIST_TIMEOUT`` or :data:`WAIT_TIMEOUT_S`. A rank
that dies does not leave the others waiting that long: its gloo connections close and torchrun stops the
job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Union

from pipeline import distributed
from pipeline.errors import MedsegError, describe_error

log = logging.getLogger(__name__)

WAIT_TIMEOUT_S = 24 * 3600.0  # the ranks' final wait for the slowest shard

__all__ = ["segment_distributed", "WAIT_TIMEOUT_S"]


def segment_distributed(run_shard: Callable[[str, str], int], output_dir: Union[str, Path], device: str) -> int:
    """Run ``run_shard(shard, device) -> exit code`` as this rank's shard, then merge on rank 0.

    ``shard`` is ``"rank+1/world_size"``; ``device`` is this rank's (:func:`pipeline.distributed.local_device`).
    An error of the shard (bad input, folder locked...) is logged with the rank and becomes its exit code,
    so every rank still reaches the final exchange. Returns the job's exit code.
    """
    world = distributed.init("cpu", WAIT_TIMEOUT_S, backend="gloo")
    try:
        code = _guarded(lambda: run_shard(f"{world.rank + 1}/{world.size}", distributed.local_device(device, world)),
                        f"rank {world.rank} of {world.size}")
        (worst,) = distributed.all_reduce([code], op="max", what="waiting for every shard to finish")
        if world.is_main:
            merged = _guarded(lambda: _merge(output_dir), "merging the shard manifests")
            worst = max(worst, merged)
        (worst,) = distributed.all_reduce([worst], op="max", what="sharing the job's exit code")
        return int(worst)
    finally:
        distributed.teardown()


def _merge(output_dir: Union[str, Path]) -> int:
    from pipeline.batch.report.merge import rebuild_reports

    rows = rebuild_reports(output_dir)
    done = sum(r.get("status") == "done" for r in rows)
    failed = sum(r.get("status") == "failed" for r in rows)
    log.info("merged %d shard manifest(s): %d cases, %d done, %d failed -> %s",
             len(list(Path(output_dir).glob("manifest.shard-*.json"))), len(rows), done, failed,
             Path(output_dir) / "manifest.csv")
    return 0


def _guarded(step: Callable[[], int], who: str) -> int:
    try:
        return int(step())
    except MedsegError as exc:
        log.error("error: %s: %s", who, describe_error(exc))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the other ranks must still hear this rank's exit code
        log.error("error: %s: %s", who, describe_error(exc), exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
