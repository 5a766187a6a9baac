"""A polling thread on its own clock, that a watchdog can abandon while it hangs.

A blocking read (an NVML call, a dcgm scrape) can hang for seconds or for good.
The sampler therefore reads in a :class:`Poller`: one daemon thread that waits
for its next tick, calls the read inline and hands the result on. Nothing is
handed to another thread per read and nothing waits on a future, because on a
small VM each wake-up of an idle thread costs more CPU than the read itself:
one timer wake in the poller and one hand-over to the event loop is the least a
poll can cost.

Whoever owns the poller watches :attr:`Poller.busy_since_s`. A read that has been
inside the source too long is *hung*: the owner may :meth:`~Poller.abandon` that
poller (its thread is left to finish, a Python thread cannot be killed, and
whatever it returns then is dropped) and start a fresh one, so the next reads go
on beside the stuck call. A source that allows this says how long one of its
calls may take (``read_deadline_s``, see :func:`read_deadline_s`) and skips
whatever is still stuck (NvmlSource: the GPU whose call hangs reads ``timeout``).

Daemon threads, not a ``ThreadPoolExecutor``: the executor's threads are joined at
interpreter exit, so one call hung in a driver would keep the sidecar from ever
exiting on SIGTERM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Poller", "read_deadline_s"]

T = TypeVar("T")


def read_deadline_s(source: object) -> float | None:
    """How long one call of ``source`` may hang before a read may run beside it, if it says.

    Wrappers that keep the wrapped source as ``inner`` (``--gpu-share``) pass it through.
    """
    seen = 0
    while source is not None and seen < 8:  # a wrapper chain, never a cycle in practice
        value = getattr(source, "read_deadline_s", None)
        if isinstance(value, int | float) and value > 0:
            return float(value)
        source = getattr(source, "inner", None)
        seen += 1
    return None


class Poller(Generic[T]):
    """Calls ``read`` at ``start + k * period_s`` in a daemon thread and hands each outcome to
    ``deliver`` (the value, or the exception it raised).

    Drift-free: a late tick is not made up with a burst, the schedule moves on
    from now. ``deliver`` runs in the poller's thread; an exception out of it
    ends the poller (the loop it hands to is gone). ``clock`` is the monotonic
    clock in seconds the schedule is kept on.
    """

    def __init__(
        self,
        name: str,
        read: Callable[[], T],
        deliver: Callable[[T | BaseException], None],
        *,
        period_s: float,
        clock: Callable[[], float],
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"poll period must be positive, got {period_s} s")
        self._read = read
        self._deliver = deliver
        self._period_s = period_s
        self._clock = clock
        self._stop = threading.Event()
        self._abandoned = False
        self.busy_since_s: float | None = None
        """When the read now inside the source began (``clock`` seconds); None between reads."""
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def abandon(self) -> None:
        """Give up on the read in flight: its outcome is dropped and the thread ends after it."""
        self._abandoned = True
        self._stop.set()

    def stop(self) -> None:
        """End after the current read, if any; a hung one is not waited for."""
        self._stop.set()

    def _loop(self) -> None:
        next_s = self._clock()
        while not self._stop.is_set():
            self.busy_since_s = self._clock()
            outcome: T | BaseException
            try:
                outcome = self._read()
            except Exception as e:  # handed on: the owner counts it, the poller goes on
                outcome = e
            self.busy_since_s = None
            if self._abandoned or self._stop.is_set():
                return  # a late outcome is stale; the owner moved on without it
            try:
                self._deliver(outcome)
            except Exception:  # the receiver is gone (a closed event loop): nothing to poll for
                return
            next_s += self._period_s
            now = self._clock()
            if next_s < now:  # fell behind (slow driver): skip, don't burst
                next_s = now
            self._stop.wait(next_s - now)
