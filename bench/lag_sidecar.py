"""``python -m bench.lag_sidecar OUT.json run ...``: the sidecar's CLI with an event-loop lag probe.

A measurement, not a deployment: a timer asks to run every millisecond and
records how late it ran (how long the loop was busy with something else:
a long callback, a slow batch, a garbage collection, or the process was not
scheduled at all) and how much CPU the loop's thread used in between (busy:
our own work, whatever the neighbours do), and :mod:`gc`'s
callbacks time every collection. Once a second the figures go to ``OUT.json``
(percentiles of lateness, the longest stalls, collections by generation and
their longest pause), so the orchestrator reads them while the load runs.
The probe itself costs a callback a millisecond; compare runs with the probe
on both sides, never against a sidecar without it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

from sidecar.cli import main

PERIOD_S = 0.001


class Dist:
    """Milliseconds binned at 10 us, those over 2 ms also kept whole: a write reads the
    bins, it does not sort every tick so far (sorting a minute of ticks took the probe
    itself 20-28 ms a write, the longest callbacks it then reported)."""

    BIN_MS: Final = 0.01
    BINS: Final = 5000  # up to 50 ms; above, only the kept values

    def __init__(self) -> None:
        self.bins: list[int] = []
        self.high: list[float] = []
        self.clear()

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        i = max(0, int(x / self.BIN_MS))
        if i < self.BINS:
            self.bins[i] += 1
        if x > 2.0:
            self.high.append(x)

    def clear(self) -> None:
        self.bins = [0] * self.BINS
        self.n = 0
        self.total = 0.0
        self.high = []

    def pct(self, q: float) -> float:
        if not self.n:
            return 0.0
        rank, seen = min(self.n - 1, int(q * self.n)), 0
        for i, count in enumerate(self.bins):
            seen += count
            if seen > rank:
                return (i + 0.5) * self.BIN_MS
        over = sorted(x for x in self.high if x >= self.BINS * self.BIN_MS)
        return over[rank - seen]

    def top(self, n: int = 10) -> list[float]:
        return sorted(self.high)[-n:]

    def max(self) -> float:
        return max(self.high) if self.high else self.pct(1.0)


class Probe:
    """Loop lateness and GC pauses, written to a file once a second."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.late_ms = Dist()
        self.busy_ms = Dist()  # the loop thread's own CPU between two ticks
        self._cpu = 0.0
        self.slow: list[tuple[float, str]] = []  # (CPU ms, callback) of callbacks over 2 ms
        self.gc_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_t0 = 0.0
        self._due = 0.0
        self._written = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.profile: CpuProfile | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._due = loop.time() + PERIOD_S
        loop.call_at(self._due, self._tick)
        gc.callbacks.append(self._gc)

    def reset(self) -> None:
        self.late_ms.clear()
        self.busy_ms.clear()
        self.slow.clear()
        for v in self.gc_ms.values():
            v.clear()

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_ms[int(info["generation"])].append((time.perf_counter() - self._gc_t0) * 1e3)

    def _tick(self) -> None:
        assert self.loop is not None
        now, cpu = self.loop.time(), time.thread_time()
        self.late_ms.add((now - self._due) * 1e3)
        self.busy_ms.add((cpu - self._cpu) * 1e3)
        self._cpu = cpu
        self._due = now + PERIOD_S
        self.loop.call_at(self._due, self._tick)
        if now - self._written >= 1.0:
            self._written = now
            self.write()
            if self.profile is not None:
                self.profile.write()

    def write(self) -> None:
        late, busy = self.late_ms, self.busy_ms
        doc = {
            "ticks": late.n,
            "late_p50_ms": late.pct(0.5),
            "late_p90_ms": late.pct(0.9),
            "late_p99_ms": late.pct(0.99),
            "late_max_ms": late.max(),
            "late_over_5ms": sum(1 for x in late.high if x > 5.0),
            "late_top_ms": late.top(),
            "busy_p99_ms": busy.pct(0.99),
            "busy_max_ms": busy.max(),
            "busy_over_5ms": sum(1 for x in busy.high if x > 5.0),
            "busy_top_ms": busy.top(),
            "busy_total_ms": busy.total,
            "slow_callbacks": sorted(self.slow, reverse=True)[:15],
            "gc": {
                str(g): {"n": len(v), "max_ms": max(v, default=0.0), "sum_ms": sum(v)}
                for g, v in self.gc_ms.items()
            },
        }
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.out)
        if self.out.with_suffix(".reset").exists():  # the orchestrator asks for a fresh window
            self.out.with_suffix(".reset").unlink()
            self.reset()


class _Policy(asyncio.DefaultEventLoopPolicy):
    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        self.probe.start(loop)
        return loop


def time_callbacks(probe: Probe) -> None:
    """Time every callback the loop runs (costly: only with ``LAG_CALLBACKS=1``); keep the slowest."""
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        t0 = time.thread_time()
        run(handle)
        took = (time.thread_time() - t0) * 1e3
        if took > 2.0:
            probe.slow.append((took, _name(handle)))

    asyncio.events.Handle._run = timed  # type: ignore[method-assign, assignment]


def _name(handle: asyncio.events.Handle) -> str:
    """The callback, or for a task's step the coroutine it runs (which task stalled)."""
    task = getattr(getattr(handle, "_callback", None), "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        return f"task {getattr(coro, '__qualname__', repr(coro))}"[:300]
    return repr(handle)[:300]


class CpuProfile:
    """Stacks sampled every millisecond of the process's CPU time (``ITIMER_PROF``).

    py-spy samples wall time, so a send() on a 2-core box where the woken
    reader preempts the sender looks expensive though it costs little CPU;
    this counts only CPU (all threads' time lands on the main thread's stack,
    so samples in ``select`` are the other threads' and the kernel's).
    Written in py-spy's ``raw`` (collapsed) format with the lag figures.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.stacks: dict[str, int] = {}

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, 0.001, 0.001)

    def _sample(self, signum: int, frame: Any) -> None:
        names = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{code.co_qualname} ({code.co_filename}:{frame.f_lineno})")
            frame = frame.f_back
        key = ";".join(reversed(names))
        self.stacks[key] = self.stacks.get(key, 0) + 1

    def write(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text("".join(f"{k} {n}\n" for k, n in self.stacks.items()))
        tmp.replace(self.out)
        if self.out.with_suffix(".reset").exists():
            self.out.with_suffix(".reset").unlink()
            self.stacks.clear()


if __name__ == "__main__":
    probe = Probe(Path(sys.argv.pop(1)))
    if os.environ.get("LAG_PROFILE"):
        probe.profile = CpuProfile(Path(os.environ["LAG_PROFILE"]))
        probe.profile.start()
    if os.environ.get("LAG_CALLBACKS") == "1":
        time_callbacks(probe)
    asyncio.set_event_loop_policy(_Policy(probe))
    sys.exit(main())
