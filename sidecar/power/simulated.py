"""A simulated multi-GPU server whose ground truth is known exactly.

Power is each GPU's idle draw plus the sum of every in-flight request's own
contribution, which the model server (the demo's, a benchmark's workload)
sets piecewise-constant as the request moves from prefill to decode and as
its batch grows and shrinks. Each request's true dynamic energy is therefore
the exact integral of its own contribution: the yardstick for attribution
accuracy. Readings carry small seeded noise, as real sensors do; the energy
counter integrates the noiseless power, as a real counter would.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.power.base import GpuInfo, PowerSample, ReadError

Clock = Callable[[], float]


@dataclass(slots=True)
class _Contribution:
    """One request's draw: ramps up linearly to a new level, drops at once.

    Dropping at once keeps every joule of a request inside its lifetime, so no
    true dynamic energy can fall into standby (DESIGN.md's rule for the sim).
    """

    from_w: float = 0.0
    to_w: float = 0.0
    since_s: float = 0.0
    counted_s: float = 0.0
    truth_j: float = 0.0

    def level(self, t: float, ramp_s: float) -> float:
        if self.to_w <= self.from_w or ramp_s <= 0 or t - self.since_s >= ramp_s:
            return self.to_w
        return self.from_w + (self.to_w - self.from_w) * max(0.0, t - self.since_s) / ramp_s

    def integral(self, a: float, b: float, ramp_s: float) -> float:
        """Exact energy drawn in [a, b] (a >= since_s): the ramp is linear, then flat."""
        if b <= a:
            return 0.0
        ramp_end = self.since_s + ramp_s if self.to_w > self.from_w else self.since_s
        total = 0.0
        if a < ramp_end:
            mid = min(b, ramp_end)
            total += (self.level(a, ramp_s) + self.level(mid, ramp_s)) / 2.0 * (mid - a)
            a = mid
        return total + self.to_w * max(0.0, b - a)


@dataclass(slots=True)
class SimulatedGpus:
    """The power model: thread-safe, because the sampler reads it from a worker thread.

    ``set_load(rid, t, watts)`` changes a request's total contribution (spread
    evenly over the GPUs, as tensor parallelism does) from time ``t`` on,
    ramping up over ``ramp_s`` as real kernels and clocks do.
    """

    gpus: int = 1
    idle_w: float = 70.0
    noise_w: float = 1.5
    seed: int = 0
    ramp_s: float = 0.03
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loads: dict[str, _Contribution] = field(default_factory=dict)
    _ramping: dict[str, _Contribution] = field(default_factory=dict)
    """The contributions still ramping up at ``_energy_at_s``; every other one draws its
    ``to_w`` from then on, and their sum is ``_flat_w``. The ramping ones are summed too,
    as one line (``_ramp_sums``: their from-levels, slopes and slope x start), and leave
    by their ramp's end (``_ends``, a heap): a load change costs O(log n), not a pass over
    every request in flight or still ramping (a burst of 100 made each change 0.1 ms)."""
    _flat_w: float = 0.0
    _ramp_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    _ramp_t0: float = 0.0
    _ends: list[tuple[float, int, str, _Contribution]] = field(default_factory=list)
    _seq: int = 0
    _energy_j: float = 0.0  # per GPU, noiseless
    _energy_at_s: float | None = None

    def _ramp(self, c: _Contribution, sign: float) -> None:
        """Add ``c`` to the summed line (``sign`` 1) or take it out (-1), with times from
        ``_ramp_t0`` (a clock months up is 1e7 s: slope x time would cancel away watts)."""
        sums = self._ramp_sums
        if not self._ramping or (sign > 0 and len(self._ramping) == 1):
            sums[0] = sums[1] = sums[2] = 0.0  # none left, or c alone: no rounding kept
            self._ramp_t0 = c.since_s
            if sign < 0:
                return
        slope = (c.to_w - c.from_w) / self.ramp_s
        sums[0] += sign * c.from_w
        sums[1] += sign * slope
        sums[2] += sign * slope * (c.since_s - self._ramp_t0)

    def _ramped_w(self, t: float) -> float:
        """What the ramping contributions draw at ``t``, all still ramping then."""
        a, b, c = self._ramp_sums
        return a + b * (t - self._ramp_t0) - c

    def _ramped_j(self, x: float, y: float) -> float:
        """What the ramping contributions draw in [x, y], all still ramping there."""
        return (y - x) * (self._ramped_w(x) + self._ramped_w(y)) / 2.0

    def _advance(self, t: float) -> None:
        a = self._energy_at_s
        if a is not None and t > a:
            x, dynamic, ends = a, 0.0, self._ends
            while ends and ends[0][0] <= t:
                end, _, rid, c = heapq.heappop(ends)
                if self._ramping.get(rid) is not c or c.since_s + self.ramp_s != end:
                    continue  # its load changed since: a later entry stands for it
                if end > x:
                    dynamic += self._flat_w * (end - x) + self._ramped_j(x, end)
                    x = end
                del self._ramping[rid]
                self._ramp(c, -1.0)
                self._flat_w += c.to_w
            dynamic += self._flat_w * (t - x) + self._ramped_j(x, t)
            self._energy_j += self.idle_w * (t - a) + dynamic / self.gpus
        if a is None or t > a:
            self._energy_at_s = t

    def _unplace(self, request_id: str, c: _Contribution) -> None:
        """Take ``c`` out of the ramping ones or the flat sum, before its level changes."""
        if self._ramping.pop(request_id, None) is None:
            self._flat_w -= c.to_w
        else:
            self._ramp(c, -1.0)

    def set_load(self, request_id: str, time_s: float, watts: float) -> None:
        """From ``time_s`` on, ``request_id`` draws ``watts`` (0 ends its contribution)."""
        with self._lock:
            self._advance(time_s)
            if self._energy_at_s is not None:  # a reader already counted past it: from then
                time_s = max(time_s, self._energy_at_s)
            c = self._loads.get(request_id)
            if c is None:
                c = self._loads[request_id] = _Contribution(since_s=time_s, counted_s=time_s)
            else:
                self._unplace(request_id, c)
            c.truth_j += c.integral(max(c.counted_s, c.since_s), time_s, self.ramp_s)
            c.from_w = c.level(time_s, self.ramp_s)
            c.to_w = max(0.0, watts)
            c.since_s = c.counted_s = time_s
            if c.to_w > c.from_w and self.ramp_s > 0:
                self._ramping[request_id] = c
                self._ramp(c, 1.0)
                self._seq += 1
                heapq.heappush(self._ends, (time_s + self.ramp_s, self._seq, request_id, c))
            else:
                self._flat_w += c.to_w

    def truth_j(self, request_id: str) -> float:
        """The request's exact dynamic energy up to its last load change, over all GPUs."""
        with self._lock:
            c = self._loads.get(request_id)
            return 0.0 if c is None else c.truth_j

    def forget(self, request_id: str) -> float:
        """Drop a finished request (its load must be 0 by now); returns its truth."""
        with self._lock:
            c = self._loads.pop(request_id, None)
            if c is None:
                return 0.0
            self._unplace(request_id, c)
            if not self._loads:  # no rounding left over once nothing draws
                self._flat_w = 0.0
                self._ramping.clear()
                self._ends.clear()
            return c.truth_j

    def power_w(self, time_s: float) -> float:
        """Noiseless power of one GPU at ``time_s``."""
        with self._lock:
            self._advance(time_s)
            if self._energy_at_s is not None and time_s < self._energy_at_s:  # a look back
                drawn = sum(c.level(time_s, self.ramp_s) for c in self._loads.values())
            else:
                ramped = self._ramped_w(time_s) if self._ramping else 0.0  # all still ramping
                drawn = self._flat_w + ramped
            return self.idle_w + drawn / self.gpus

    def energy_j(self, time_s: float) -> float:
        """Noiseless cumulative energy of one GPU, like NVML's counter."""
        with self._lock:
            self._advance(time_s)
            return self._energy_j


class SimulatedSource:
    """A PowerSource reading :class:`SimulatedGpus` on the sidecar's clock."""

    def __init__(
        self,
        model: SimulatedGpus | None = None,
        *,
        clock: Clock = time.monotonic,
        with_counter: bool = True,
    ) -> None:
        self.model = model if model is not None else SimulatedGpus()
        self._clock = clock
        self._with_counter = with_counter
        self._rng = random.Random(self.model.seed)

    def open(self) -> list[GpuInfo]:
        return [
            GpuInfo(gpu=str(i), uuid=f"GPU-sim-{self.model.seed:04d}-{i:04d}", name="Simulated GPU")
            for i in range(self.model.gpus)
        ]

    def read(self) -> list[PowerSample | ReadError]:
        t = self._clock()
        p = self.model.power_w(t)
        e = self.model.energy_j(t) if self._with_counter else None
        return [
            PowerSample(t, str(i), max(0.0, p + self._rng.gauss(0.0, self.model.noise_w)), e)
            for i in range(self.model.gpus)
        ]

    def close(self) -> None:
        return None
