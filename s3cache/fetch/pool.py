"""A thread pool that starts the waiting task of the lowest rank first: the early parts of the first
files a job opens, so that the job's first file's parts start before its second file's.

``concurrent.futures.ThreadPoolExecutor`` starts tasks in the order they were submitted. The first
files' parts are submitted as each file's first answer arrives, in whatever order the network gives,
and there are more of them than threads: a later file whose first answer came first took every thread,
and the first file's parts waited in the executor's queue, where the link's order among early
streams (``link.py``) cannot see them (measured: the first file's last part ended after the third
file's).

Invariants: at most ``workers`` threads, started as tasks need them; a task leaves the queue only to
run (or to be cancelled by ``shutdown(cancel_futures=True)``); among waiting tasks the lowest
``(rank, submission order)`` runs next; after ``shutdown`` no task is accepted, and ``shutdown(wait=True)``
returns once every thread has ended (the queue drained or cancelled).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future


class OrderedPool:
    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least one thread, got {workers}")
        self._max = workers
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Future, Callable, tuple]] = []
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable, *args, rank: int = 0) -> Future:
        """Run ``fn(*args)`` on a pool thread once no task of a lower rank (or of the same rank,
        submitted earlier) waits; its Future."""
        f: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            heapq.heappush(self._heap, (rank, next(self._seq), f, fn, args))
            if self._idle < len(self._heap) and len(self._threads) < self._max:
                t = threading.Thread(target=self._run, name=f"{self._name}_{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            else:
                self._cond.notify()
        return f

    def _run(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._heap and not self._closed:
                    self._cond.wait()
                self._idle -= 1
                if not self._heap:
                    return  # closed and drained
                _, _, f, fn, args = heapq.heappop(self._heap)
            if not f.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # as ThreadPoolExecutor does: the caller's f.result() raises it
                f.set_exception(e)
            else:
                f.set_result(result)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._cond:
            self._closed = True
            if cancel_futures:
                for item in self._heap:
                    item[2].cancel()
                self._heap.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            for t in threads:
                t.join()
