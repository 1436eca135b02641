"""Bounded queues between threads: the put that gives up, and Prefetch (order, errors, close)."""

from __future__ import annotations

import itertools
import queue

import pytest

from pipeline.queues import Prefetch, put_while


def test_put_while_gives_up_once_the_consumer_is_gone():
    q: queue.Queue = queue.Queue(maxsize=1)
    assert put_while(q, 1, lambda: True)
    calls = iter([True, True, False])
    assert not put_while(q, 2, lambda: next(calls), poll=0.01)
    assert q.get_nowait() == 1


def test_trainer_still_exports_prefetch():
    from pipeline.training.trainer import Prefetch as FromTrainer

    assert FromTrainer is Prefetch


def test_prefetch_keeps_order_and_raises_the_producers_error():
    def items():
        yield from range(5)
        raise ValueError("broken batch")

    prefetch = Prefetch(items(), depth=2)
    assert [next(prefetch) for _ in range(5)] == list(range(5))
    for _ in range(2):
        with pytest.raises(ValueError, match="broken batch"):
            next(prefetch)
    prefetch.close()


def test_prefetch_close_stops_an_endless_producer():
    prefetch = Prefetch(itertools.count(), depth=2)
    assert next(prefetch) == 0
    prefetch.close(timeout=5)
    assert not prefetch._thread.is_alive()
