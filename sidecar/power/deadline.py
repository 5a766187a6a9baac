"""Per-GPU reads with a deadline, so one hung driver call cannot stall the others.

An NVML call can block for seconds or for good (a GPU falling off the bus, a
driver in recovery). Each GPU therefore reads in its own worker thread, and a
poll waits for all of them only up to a deadline. A GPU whose call outlives it
is *hung*: its thread is left to finish (a Python thread cannot be killed), no
new call is queued behind it, and every poll reports it as timed out until the
call returns. What a late call returns is stale by then and is dropped.

The workers are daemon threads, not a ``ThreadPoolExecutor``: the executor's
threads are joined at interpreter exit, so one call hung in the driver would
keep the sidecar from ever exiting on SIGTERM.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Generic, TypeVar

__all__ = ["DeadlineReader", "TimedOut", "Worker"]

T = TypeVar("T")


class TimedOut:
    """The marker for a key whose call is still running past the deadline."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TIMED_OUT"


TIMED_OUT = TimedOut()


class DeadlineReader(Generic[T]):
    """Runs one blocking call per key in that key's own thread, bounded by ``timeout_s``."""

    def __init__(self, timeout_s: float, *, thread_name_prefix: str = "power-read") -> None:
        if timeout_s <= 0:
            raise ValueError(f"read timeout must be positive, got {timeout_s} s")
        self._timeout_s = timeout_s
        self._prefix = thread_name_prefix
        self._workers: dict[str, Worker[T]] = {}
        self._hung: dict[str, Future[T]] = {}

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def hung(self, key: str) -> bool:
        """Whether ``key``'s last call is still running past its deadline."""
        future = self._hung.get(key)
        if future is None:
            return False
        if future.done():
            del self._hung[key]  # returned at last: its result is stale, drop it
            return False
        return True

    def idle(self) -> bool:
        """No call is outstanding on any key (safe to shut the library down)."""
        return not any(self.hung(key) for key in list(self._hung))

    def run(self, calls: Mapping[str, Callable[[], T]]) -> dict[str, T | TimedOut]:
        """Start every call whose key is not hung, and wait for them up to the deadline.

        A call that raises re-raises here, for its key's caller to translate; a
        call still running at the deadline (or a key still hung from an earlier
        poll) maps to :data:`TIMED_OUT`.
        """
        started: dict[str, Future[T]] = {}
        out: dict[str, T | TimedOut] = {}
        for key, call in calls.items():
            if self.hung(key):
                out[key] = TIMED_OUT
                continue
            started[key] = self._worker(key).submit(call)
        if started:
            concurrent.futures.wait(started.values(), timeout=self._timeout_s)
        for key, future in started.items():
            if future.done():
                out[key] = future.result()
            else:
                self._hung[key] = future
                out[key] = TIMED_OUT
        return {key: out[key] for key in calls}

    def close(self) -> None:
        """Stop the threads; a hung one is abandoned, not waited for."""
        for worker in self._workers.values():
            worker.stop()
        self._workers.clear()
        self._hung.clear()

    def _worker(self, key: str) -> Worker[T]:
        worker = self._workers.get(key)
        if worker is None:
            worker = self._workers[key] = Worker(f"{self._prefix}-{key}")
        return worker


class Worker(Generic[T]):
    """One daemon thread running calls in order, each answered by a Future; ``stop`` ends it.

    A daemon thread, unlike an executor's, is not joined at interpreter exit,
    so a call hung in a driver never keeps the process alive.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], T], Future[T]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((call, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as e:  # handed to the poller, which translates it
                future.set_exception(e)
