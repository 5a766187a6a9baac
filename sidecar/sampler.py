"""The async sampler: polls a power source at a steady rate without blocking the loop.

Reads run in one daemon thread on its own drift-free clock (a
:class:`~sidecar.power.deadline.Poller`: each tick aims at ``start + k / hz``,
and a late tick is not made up with a burst), which calls the source inline and
hands the reads to the event loop together, a quarter second of them at a time
(``HANDOVER_S``; each at once while an energy receipt waits): one timer wake per
poll and one wake of the loop per hand-over, because on a small VM each wake-up
costs more than the read. NVML calls block, sometimes for milliseconds, so the
proxy never waits on the driver.

A watchdog on the loop looks at the read in flight, lazily (once per deadline,
not per read). A read that outlives the sampler's deadline (a whole source
hung: a stuck scrape) is counted as a ``timeout`` for every GPU once per
deadline and waited for, never stacked behind; its late result is used. A
source that allows reads beside a stuck call (``read_deadline_s``: NvmlSource,
whose every GPU reads in turn) gets more: a read stuck past that deadline is
abandoned, a fresh poller goes on at the same rate, and the source reports the
GPU whose call hangs as ``timeout`` until it returns, so the other GPUs keep
their rate. Samples go through the reconciler (per GPU) and then to a sink; the
real interval between reads is measured and kept, because the asked-for rate
is not the achieved one.

On the loop, reconciled samples reach the sink one reading (a sample per GPU)
per loop turn, not a window at a time: the reconciler lets a second of readings
go at once, and the ledger's work for ten readings with 100 streams in flight
(37-59 ms) held every chunk behind it; a reading at a time, the proxy's writes
run between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from sidecar.ledger.core import GAP_PERIODS
from sidecar.power.base import ErrorReason, GpuInfo, PowerSample, PowerSource, ReadError
from sidecar.power.deadline import Poller
from sidecar.power.deadline import read_deadline_s as read_deadline_s_of
from sidecar.reconcile import Reconciler

log = structlog.get_logger("sidecar.sampler")

MAX_HZ = 100.0
MIN_READ_DEADLINE_S = 2.0
"""A read is late after this long, or after five sample periods if that is longer."""
HANDOVER_S = 0.25
"""Reads reach the loop together, at most this long after the first of them (every read at
once while an energy receipt waits for samples, :meth:`Sampler.cut_windows`): a wake of
the loop per read cost more than the read at 8 GPUs and 10 Hz, and at 100 Hz it ran the
sampler's hand-over between the proxy's writes a hundred times a second. The reconciler
holds a second of readings anyway, so nothing downstream waits on it."""
URGENT_S = 1.0
"""How long after :meth:`Sampler.cut_windows` every read goes to the loop at once."""
MAX_ABANDONED_READS = 16
"""Reads left stuck in a source at once, at most; past it the sampler waits, as for any source
(each stuck NVML read holds one GPU, so a hang on every GPU stays within this)."""


@dataclass(slots=True)
class SamplerStats:
    """What the sampler has seen; read by collectors, never recomputed on scrape."""

    samples: dict[str, int] = field(default_factory=dict)
    errors: dict[tuple[str, ErrorReason], int] = field(default_factory=dict)
    last_sample_s: dict[str, float] = field(default_factory=dict)
    last_power_w: dict[str, float] = field(default_factory=dict)
    reads: int = 0
    interval_s: float | None = None
    """The real interval between the last two reads."""
    mean_interval_s: float | None = None
    """Exponentially weighted mean of the real interval (about the last 20 reads)."""


class Sampler:
    """Polls ``source`` at ``hz`` and hands reconciled samples to ``sink``."""

    def __init__(
        self,
        source: PowerSource,
        gpus: list[GpuInfo],
        *,
        hz: float,
        sink: Callable[[list[PowerSample]], None],
        raw_sink: Callable[[PowerSample], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        read_deadline_s: float | None = None,
    ) -> None:
        if not 0 < hz <= MAX_HZ:
            raise ValueError(f"sample rate must be in (0, {MAX_HZ:g}] Hz, got {hz}")
        self._source = source
        self._period_s = 1.0 / hz
        self._sink = sink
        self._raw_sink = raw_sink
        self._clock = clock
        gap_after_s = GAP_PERIODS * self._period_s  # a longer silence is a gap, not a window
        self._reconcilers = {g.gpu: Reconciler(gap_after_s=gap_after_s) for g in gpus}
        self.stats = SamplerStats(samples=dict.fromkeys(self._reconcilers, 0))
        self._read_deadline_s = (
            read_deadline_s
            if read_deadline_s is not None
            else max(MIN_READ_DEADLINE_S, 5 * self._period_s)
        )
        own_s = read_deadline_s_of(source)
        self._can_abandon = own_s is not None  # reads may run beside a stuck one
        self._takeover_after_s = (
            self._read_deadline_s if own_s is None else min(own_s, self._read_deadline_s)
        )
        self._poller: Poller[list[PowerSample | ReadError]] | None = None
        self._handover: _Handover | None = None
        self._urgent_until_s = -1.0  # written on the loop, read by the poller's thread
        self._abandoned: list[Poller[list[PowerSample | ReadError]]] = []
        self._late_booked_s: float | None = None  # when the read in flight was last counted late
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_read_s: float | None = None
        self._logged_errors: set[tuple[str, ErrorReason]] = set()
        self._queued: deque[PowerSample] = deque()  # reconciled, not yet handed to the sink
        self._feeding: asyncio.Handle | None = None

    async def run(self) -> None:
        """Sample until cancelled."""
        loop = asyncio.get_running_loop()
        self._start_poller(loop)
        self._arm(loop, self._takeover_after_s)
        try:
            await loop.create_future()  # the poller and the watchdog's timer do the work
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            self._stop_pollers()

    def _arm(self, loop: asyncio.AbstractEventLoop, delay_s: float) -> None:
        """The watchdog's next look in ``delay_s``: a timer that reads pushes on ahead
        (:meth:`_on_read`), so while they come in it never fires and costs no wake-up."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = loop.call_later(delay_s, self._on_watch, loop)

    def _on_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        self._arm(loop, self._watch(loop))

    def _start_poller(self, loop: asyncio.AbstractEventLoop) -> None:
        handover = _Handover(self._clock, HANDOVER_S - self._period_s / 2.0)

        def deliver(outcome: list[PowerSample | ReadError] | BaseException) -> None:
            batch = handover.put(outcome, urgent=self._urgent_until_s)
            if batch:
                loop.call_soon_threadsafe(self._on_reads, poller, batch)

        poller = Poller(
            "power-source", self._source.read, deliver, period_s=self._period_s, clock=self._clock
        )
        self._poller, self._handover = poller, handover
        self._late_booked_s = None
        poller.start()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> float:
        """Look at the read in flight; returns how long to sleep before the next look."""
        self._abandoned = [p for p in self._abandoned if p.busy_since_s is not None]
        poller = self._poller
        busy_since_s = None if poller is None else poller.busy_since_s
        if poller is None or busy_since_s is None:
            return self._takeover_after_s
        now = self._clock()
        may_abandon = self._can_abandon and len(self._abandoned) < MAX_ABANDONED_READS
        if may_abandon and now - busy_since_s >= self._takeover_after_s:
            log.warning("sampler.read_abandoned", waited_s=round(now - busy_since_s, 3))
            self._take_handover(poller)  # the reads before the stuck one still count
            poller.abandon()
            self._abandoned.append(poller)
            self._start_poller(loop)
            return self._takeover_after_s
        late_since_s = busy_since_s if self._late_booked_s is None else self._late_booked_s
        if now - late_since_s >= self._read_deadline_s:
            # Still inside the source: count it, keep waiting for that read.
            log.warning("sampler.read_late", waited_s=self._read_deadline_s)
            self._late_booked_s = late_since_s = now
            self._ingest_safely([ReadError(g, "timeout") for g in self._reconcilers])
        due_s = late_since_s + self._read_deadline_s
        if may_abandon:
            due_s = min(due_s, busy_since_s + self._takeover_after_s)
        return max(due_s - now, 0.001)

    def _on_reads(
        self,
        poller: Poller[list[PowerSample | ReadError]],
        batch: list[tuple[float, list[PowerSample | ReadError] | BaseException]],
    ) -> None:
        """A hand-over of reads, on the loop thread, each with the time it returned."""
        for read_s, outcome in batch:
            self._on_read(poller, outcome, read_s)

    def _take_handover(self, poller: Poller[list[PowerSample | ReadError]]) -> None:
        """Ingest the reads ``poller`` returned that wait for their hand-over (it stops)."""
        handover = self._handover
        if poller is self._poller and handover is not None:
            self._on_reads(poller, handover.take())

    def _on_read(
        self,
        poller: Poller[list[PowerSample | ReadError]],
        outcome: list[PowerSample | ReadError] | BaseException,
        read_s: float | None = None,
    ) -> None:
        """One read's outcome, on the loop thread (``read_s``: when it returned)."""
        if poller is not self._poller or poller.abandoned:
            return  # an abandoned read that returned at last: stale, dropped
        self._late_booked_s = None
        watchdog = self._watchdog
        if watchdog is not None:
            loop = asyncio.get_running_loop()
            if watchdog.when() - loop.time() < self._takeover_after_s / 2:
                self._arm(loop, self._takeover_after_s)  # every half deadline, not every read
        if isinstance(outcome, BaseException):  # a source bug must not kill metering
            log.error("sampler.read_failed", exc_info=outcome)
            outcome = [ReadError(g, "unknown") for g in self._reconcilers]
        self._ingest_safely(outcome, sliced=True, read_s=read_s)

    def _ingest_safely(
        self,
        batch: list[PowerSample | ReadError],
        *,
        sliced: bool = False,
        read_s: float | None = None,
    ) -> None:
        try:
            self.ingest(batch, sliced=sliced, read_s=read_s)
        except Exception:  # a failing sink (a full disk under --record) must not stop metering
            log.exception("sampler.sink_failed")

    def _feed(self) -> None:
        """One reading's samples to the sink; the rest on the next loop turn."""
        self._feeding = None
        queued = self._queued
        n = min(len(self._reconcilers), len(queued))
        now = [queued.popleft() for _ in range(n)]
        if queued:
            self._feeding = asyncio.get_running_loop().call_soon(self._feed)
        try:
            self._sink(now)
        except Exception:
            log.exception("sampler.sink_failed")

    def _stop_pollers(self) -> None:
        if self._poller is not None:
            self._poller.stop()
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass  # no loop running (closed from outside it): nothing to hand to
            else:
                self._take_handover(self._poller)
            self._poller = self._handover = None
        for poller in self._abandoned:
            poller.stop()
        self._abandoned = []

    def ingest(
        self,
        batch: list[PowerSample | ReadError],
        *,
        sliced: bool = False,
        read_s: float | None = None,
    ) -> None:
        """Account one read (that returned at ``read_s``, else now) and forward its
        reconciled samples: at once (tests), or ``sliced``, one reading per loop turn (see
        the module)."""
        now = self._clock() if read_s is None else read_s
        if self._last_read_s is not None:
            interval = now - self._last_read_s
            self.stats.interval_s = interval
            mean = self.stats.mean_interval_s
            self.stats.mean_interval_s = (
                interval if mean is None else mean + 0.05 * (interval - mean)
            )
        self._last_read_s = now
        self.stats.reads += 1
        ready: list[PowerSample] = []
        for item in batch:
            if isinstance(item, ReadError):
                self._count_error(item)
                continue
            rec = self._reconcilers.get(item.gpu)
            if rec is None:
                continue
            self.stats.samples[item.gpu] = self.stats.samples.get(item.gpu, 0) + 1
            self.stats.last_sample_s[item.gpu] = item.time_s
            self.stats.last_power_w[item.gpu] = item.power_w
            if self._raw_sink is not None:
                self._raw_sink(item)
            ready.extend(rec.push(item))
        if not ready:
            return
        if not sliced:
            self._drain()  # anything queued goes first
            self._sink(ready)
            return
        ready.sort(key=lambda s: s.time_s)  # stable: a reading's GPUs together, in time order
        self._queued.extend(ready)
        if self._feeding is None:
            self._feeding = asyncio.get_running_loop().call_soon(self._feed)

    def _stop_feeding(self) -> None:
        if self._feeding is not None:
            self._feeding.cancel()
            self._feeding = None

    def _drain(self) -> None:
        """Everything still queued to the sink now, in order."""
        self._stop_feeding()
        if self._queued:
            queued, self._queued = list(self._queued), deque()
            self._sink(queued)

    def cut_windows(self, after_s: float) -> None:
        """An energy receipt waits for samples past ``after_s``: every GPU's window
        closes at its first moved counter from then on (:meth:`Reconciler.cut`)."""
        for rec in self._reconcilers.values():
            rec.cut(after_s)
        self._urgent_until_s = self._clock() + URGENT_S  # reads go to the loop at once

    def flush(self) -> None:
        """Hand over what is queued and what the reconcilers still hold (shutdown)."""
        self._drain()
        held = [s for rec in self._reconcilers.values() for s in rec.flush()]
        if held:
            self._sink(sorted(held, key=lambda s: s.time_s))

    def _count_error(self, err: ReadError) -> None:
        key = (err.gpu, err.reason)
        self.stats.errors[key] = self.stats.errors.get(key, 0) + 1
        if key not in self._logged_errors:  # once per GPU and reason: a flood helps no one
            self._logged_errors.add(key)
            log.warning("sampler.read_error", gpu=err.gpu, reason=err.reason)

    def close(self) -> None:
        self._stop_feeding()
        with contextlib.suppress(Exception):
            self._stop_pollers()


class _Handover:
    """The reads a poller's thread returned, handed to the loop together: a batch once the
    first waiting is ``wait_s`` old, at once for an exception or while a receipt waits."""

    __slots__ = ("_clock", "_lock", "_pending", "_wait_s")

    def __init__(self, clock: Callable[[], float], wait_s: float) -> None:
        self._clock = clock
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._pending: list[tuple[float, list[PowerSample | ReadError] | BaseException]] = []

    def put(
        self, outcome: list[PowerSample | ReadError] | BaseException, *, urgent: float
    ) -> list[tuple[float, list[PowerSample | ReadError] | BaseException]]:
        """Keep ``outcome`` (poller thread); the batch to hand over now, or nothing."""
        now = self._clock()
        with self._lock:
            pending = self._pending
            pending.append((now, outcome))
            if (
                now - pending[0][0] < self._wait_s
                and now >= urgent
                and not isinstance(outcome, BaseException)
            ):
                return []
            self._pending = []
            return pending

    def take(self) -> list[tuple[float, list[PowerSample | ReadError] | BaseException]]:
        """Every read still waiting (loop thread, as the poller stops)."""
        with self._lock:
            pending, self._pending = self._pending, []
            return pending
