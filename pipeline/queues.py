"""Bounded queues between threads: a put that gives up once its consumer has gone, and :class:`Prefetch`.

Used by the training loop (batches prepared ahead) and by batch inference (load → infer → finalize
stages, :mod:`pipeline.batch.stages`). Torch-free.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional


def put_while(q: queue.Queue, item, alive: Callable[[], bool], poll: float = 0.1) -> bool:
    """Put ``item`` into the bounded queue ``q``, waiting while ``alive()``; ``False`` if it gave up.

    A plain ``q.put`` on a full queue blocks for ever once the consumer has stopped; this one checks
    ``alive`` every ``poll`` seconds.
    """
    while alive():
        try:
            q.put(item, timeout=poll)
            return True
        except queue.Full:
            continue
    return False


class Prefetch:
    """Items of ``iterator`` produced up to ``depth`` ahead in a background thread, in order.

    An exception raised by the iterator is raised again by ``next`` (and by every later ``next``).
    ``close`` stops the thread after the item it is working on.
    """

    def __init__(self, iterator, depth: int = 2):
        self.depth = max(1, int(depth))
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._failure: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._produce, args=(iterator,), name="medseg-batches", daemon=True)
        self._thread.start()

    def _produce(self, iterator) -> None:
        try:
            for item in iterator:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put((False, exc))
            return
        self._put((False, StopIteration()))

    def _put(self, entry) -> bool:
        return put_while(self._queue, entry, lambda: not self._stop.is_set())

    def __iter__(self):
        return self

    def __next__(self):
        if self._failure is not None:
            raise self._failure
        ok, item = self._queue.get()
        if not ok:
            self._failure = item
            raise item
        return item

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        while True:  # free the prepared batches; unblocks a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
