"""The async sampler: polls a power source at a steady rate without blocking the loop.

Reads run in one dedicated worker thread (NVML calls block, sometimes for
milliseconds), so the proxy never waits on the driver. A read that outlives
its deadline (a whole source hung: NVML's re-init, a stuck scrape) is counted
as a ``timeout`` for every GPU once per deadline and waited for, never stacked
behind; the loop goes on ticking meanwhile. The worker is a daemon thread, so
a call hung in a driver cannot keep the process from exiting. The schedule is
drift-free: each tick aims at ``start + k / hz``, and a late tick is not
made up with a burst. Samples go through the reconciler (per GPU) and then
to a sink; the real interval between reads is measured and kept, because
the asked-for rate is not the achieved one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from sidecar.ledger.core import GAP_PERIODS
from sidecar.power.base import ErrorReason, GpuInfo, PowerSample, PowerSource, ReadError
from sidecar.power.deadline import Worker
from sidecar.reconcile import Reconciler

log = structlog.get_logger("sidecar.sampler")

MAX_HZ = 100.0
MIN_READ_DEADLINE_S = 2.0
"""A read is late after this long, or after five sample periods if that is longer."""


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
        self._worker: Worker[list[PowerSample | ReadError]] = Worker("power-source")
        self._read_deadline_s = (
            read_deadline_s
            if read_deadline_s is not None
            else max(MIN_READ_DEADLINE_S, 5 * self._period_s)
        )
        self._last_read_s: float | None = None
        self._logged_errors: set[tuple[str, ErrorReason]] = set()

    async def run(self) -> None:
        """Sample until cancelled."""
        next_s = self._clock()
        pending: asyncio.Future[list[PowerSample | ReadError]] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.wrap_future(self._worker.submit(self._source.read))
                done, _ = await asyncio.wait({pending}, timeout=self._read_deadline_s)
                if not done:  # still inside the source: count it, keep waiting for that read
                    log.warning("sampler.read_late", waited_s=self._read_deadline_s)
                    batch: list[PowerSample | ReadError] = [
                        ReadError(g, "timeout") for g in self._reconcilers
                    ]
                else:
                    finished, pending = pending, None
                    try:
                        batch = finished.result()
                    except Exception:  # a source bug must not kill metering; count and go on
                        log.exception("sampler.read_failed")
                        batch = [ReadError(g, "unknown") for g in self._reconcilers]
                try:
                    self.ingest(batch)
                except (
                    Exception
                ):  # a failing sink (a full disk under --record) must not stop metering
                    log.exception("sampler.sink_failed")
                next_s += self._period_s
                now = self._clock()
                if next_s < now:  # fell behind (slow driver): skip, don't burst
                    next_s = now
                if done:
                    await asyncio.sleep(next_s - now)
        finally:
            self._worker.stop()

    def ingest(self, batch: list[PowerSample | ReadError]) -> None:
        """Account one read and forward its reconciled samples (also used by tests)."""
        now = self._clock()
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
        if ready:
            self._sink(ready)

    def cut_windows(self, after_s: float) -> None:
        """An energy receipt waits for samples past ``after_s``: every GPU's window
        closes at its first moved counter from then on (:meth:`Reconciler.cut`)."""
        for rec in self._reconcilers.values():
            rec.cut(after_s)

    def flush(self) -> None:
        """Hand over what the reconcilers still hold (shutdown)."""
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
        with contextlib.suppress(Exception):
            self._worker.stop()
