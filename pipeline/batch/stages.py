"""Running three stages over a list of cases: load (thread) → infer (caller) → finalize (thread).

While the network works on one case, the next one is read and preprocessed and the previous one is
written. Queues of one item between the stages bound the memory to a few cases.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable

from pipeline.queues import put_while

_END = object()


def pipelined(todo, load: Callable, infer: Callable, finalize: Callable,
               thread_init: Callable[[], None] = lambda: None) -> None:
    """``finalize(infer(load(x)))`` for each x, with load and finalize in their own threads.

    Queues of one item between the stages bound the memory. ``infer`` runs in the calling thread (so
    Ctrl-C reaches it); on any exit the loader is stopped and what was inferred is still finalized.
    """
    loaded: queue.Queue = queue.Queue(maxsize=1)
    inferred: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    writer_error: list[BaseException] = []

    def loader() -> None:
        thread_init()
        try:
            for case, fingerprint in todo:
                if stop.is_set() or not put_while(loaded, load(case, fingerprint), lambda: not stop.is_set()):
                    return
        finally:
            put_while(loaded, _END, lambda: not stop.is_set())

    def writer() -> None:
        thread_init()
        while True:
            item = inferred.get()
            if item is _END:
                return
            try:
                finalize(item)
            except BaseException as exc:  # the reports cannot be written (disk full?): stop the run
                writer_error.append(exc)
                stop.set()
                return

    threads = [threading.Thread(target=loader, name="medseg-loader", daemon=True),
               threading.Thread(target=writer, name="medseg-writer", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        while not writer_error:
            item = loaded.get()
            if item is _END:
                break
            infer(item)
            if not put_while(inferred, item, threads[1].is_alive):
                break
    finally:
        stop.set()
        while threads[0].is_alive():
            with contextlib.suppress(queue.Empty):
                loaded.get(timeout=0.1)  # unblock the loader
        put_while(inferred, _END, threads[1].is_alive)
        threads[1].join()
    if writer_error:
        raise writer_error[0]
