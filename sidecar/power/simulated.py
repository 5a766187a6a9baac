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

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.power.base import GpuInfo, PowerSample, ReadError

Clock = Callable[[], float]


@dataclass(slots=True)
class _Contribution:
    watts: float = 0.0
    since_s: float = 0.0
    truth_j: float = 0.0


@dataclass(slots=True)
class SimulatedGpus:
    """The power model: thread-safe, because the sampler reads it from a worker thread.

    ``set_load(rid, t, watts)`` changes a request's total contribution (spread
    evenly over the GPUs, as tensor parallelism does) from time ``t`` on.
    """

    gpus: int = 1
    idle_w: float = 70.0
    noise_w: float = 1.5
    seed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loads: dict[str, _Contribution] = field(default_factory=dict)
    _total_w: float = 0.0
    _energy_j: float = 0.0  # per GPU, noiseless
    _energy_at_s: float | None = None

    def _advance(self, t: float) -> None:
        if self._energy_at_s is not None and t > self._energy_at_s:
            per_gpu_w = self.idle_w + self._total_w / self.gpus
            self._energy_j += per_gpu_w * (t - self._energy_at_s)
        if self._energy_at_s is None or t > self._energy_at_s:
            self._energy_at_s = t

    def set_load(self, request_id: str, time_s: float, watts: float) -> None:
        """From ``time_s`` on, ``request_id`` draws ``watts`` (0 ends its contribution)."""
        with self._lock:
            self._advance(time_s)
            c = self._loads.setdefault(request_id, _Contribution(since_s=time_s))
            c.truth_j += c.watts * max(0.0, time_s - c.since_s)
            self._total_w += watts - c.watts
            c.watts = max(0.0, watts)
            c.since_s = time_s

    def truth_j(self, request_id: str) -> float:
        """The request's exact dynamic energy so far, over all GPUs."""
        with self._lock:
            c = self._loads.get(request_id)
            return 0.0 if c is None else c.truth_j

    def forget(self, request_id: str) -> float:
        """Drop a finished request (its load must be 0 by now); returns its truth."""
        with self._lock:
            c = self._loads.pop(request_id, None)
            return 0.0 if c is None else c.truth_j

    def power_w(self, time_s: float) -> float:
        """Noiseless power of one GPU at ``time_s`` (the most recent load applies)."""
        with self._lock:
            self._advance(time_s)
            return self.idle_w + self._total_w / self.gpus

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
