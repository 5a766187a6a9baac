"""A live fake NVML: the tests' scripted fake pynvml, made to move with the clock.

``tests/fake_pynvml.py`` follows the real library's calls, units and
exceptions; here its GPUs draw a slowly varying power and their energy
counters advance with the monotonic clock, so the sampler and the reconciler
take their ordinary paths (not the stuck-counter one) at the cost of the real
calls' Python overhead, with no driver behind them.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from bench.common import ROOT

sys.path.insert(0, str(ROOT / "tests"))

from fake_pynvml import FakeGpu, FakeHandle, FakeNvml

__all__ = ["FakeGpu", "LiveFakeNvml", "fake_gpus"]


def fake_gpus(n: int, *, buffer: bool = False) -> list[FakeGpu]:
    """``n`` fake H100s with distinct UUIDs (with or without the driver's sample buffer)."""
    return [
        FakeGpu(uuid=f"GPU-bench{i:04d}-0000-1111-2222-333344445555", buffer=[] if buffer else None)
        for i in range(n)
    ]


class LiveFakeNvml(FakeNvml):
    """Power ``idle_w + swing_w * (1 + sin)/2`` per GPU; the counter integrates it exactly."""

    def __init__(
        self, gpus: Sequence[FakeGpu], *, idle_w: float = 70.0, swing_w: float = 200.0
    ) -> None:
        super().__init__(gpus)
        self._idle_w = idle_w
        self._swing_w = swing_w
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    def power_w(self, index: int, t: float) -> float:
        phase = 0.7 * index
        return self._idle_w + self._swing_w * (1.0 + math.sin(0.5 * t + phase)) / 2.0

    def energy_j(self, index: int, t: float) -> float:
        """The exact integral of :meth:`power_w` from 0 to ``t``."""
        phase = 0.7 * index
        s = self._swing_w / 2.0
        return (self._idle_w + s) * t - s * 2.0 * (math.cos(0.5 * t + phase) - math.cos(phase))

    def _refresh(self, handle: FakeHandle) -> None:
        t = time.monotonic() - self._t0
        gpu = self.gpus[handle.index]
        gpu.instant_mw = round(self.power_w(handle.index, t) * 1000.0)
        gpu.energy_mj = 1_000_000_000 + round(self.energy_j(handle.index, t) * 1000.0)
        if gpu.buffer is not None:
            wall_us = round(time.time() * 1e6)
            gpu.buffer.append((wall_us, gpu.instant_mw))
            del gpu.buffer[:-32]

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, fieldIds: Sequence[int]) -> Any:
        with self._lock:
            self._refresh(handle)
        return super().nvmlDeviceGetFieldValues(handle, fieldIds)

    def nvmlDeviceGetSamples(
        self, device: FakeHandle, sampling_type: int, timeStamp: int
    ) -> tuple[int, list[Any]]:
        with self._lock:
            self._refresh(device)
        return super().nvmlDeviceGetSamples(device, sampling_type, timeStamp)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        with self._lock:
            self._refresh(handle)
        return super().nvmlDeviceGetTotalEnergyConsumption(handle)
