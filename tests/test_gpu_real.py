"""NvmlSource on a real GPU: integrated power against the hardware energy counter.

Skipped where NVML cannot start or sees no GPU. Run with ``-s`` to see the
figures; the bounds are loose on purpose (they catch unit and clock mistakes,
such as a factor of 1000 or samples on the wrong clock, not sensor quality).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.power.base import PowerSample
from sidecar.power.nvml import NvmlSource

pytestmark = pytest.mark.gpu

DURATION_S = 3.0


@pytest.fixture
def real_nvml() -> Any:
    """The real pynvml module, or a skip where NVML has no driver or no GPU."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"NVML cannot start here: {e}")
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        pytest.skip("NVML sees no GPU")
    return pynvml


class _NoBuffer:
    """The real module with the power-sample buffer hidden, to measure instant power alone."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nvml, name)

    def nvmlDeviceGetSamples(self, *args: object) -> Any:
        raise self._nvml.NVMLError(self._nvml.NVML_ERROR_NOT_SUPPORTED)


def _trapezoid_j(samples: list[PowerSample], start_s: float, end_s: float) -> float:
    inside = [s for s in samples if start_s <= s.time_s <= end_s]
    return sum(
        (b.time_s - a.time_s) * (a.power_w + b.power_w) / 2 for a, b in itertools.pairwise(inside)
    )


def _measure(nvml: Any, hz: float, load: Callable[[], None] | None = None) -> dict[str, float]:
    """Poll GPU 0 at ``hz`` for DURATION_S; integrate power between the first and last counter."""
    source = NvmlSource(["0"], nvml=nvml, env={})
    source.open()
    caps = source.capabilities["0"]
    samples: list[PowerSample] = []
    try:
        period_s = 1.0 / hz
        deadline = time.monotonic() + DURATION_S
        next_s = time.monotonic()
        while next_s < deadline:
            samples += [r for r in source.read() if isinstance(r, PowerSample)]
            next_s += period_s
            time.sleep(max(0.0, next_s - time.monotonic()))
    finally:
        source.close()
    counted = [s for s in samples if s.energy_j is not None]
    assert len(counted) >= 2, "the GPU has no energy counter"
    first, last = counted[0], counted[-1]
    counter_j = (last.energy_j or 0.0) - (first.energy_j or 0.0)
    integrated_j = _trapezoid_j(samples, first.time_s, last.time_s)
    span_s = last.time_s - first.time_s
    figures = {
        "hz": hz,
        "samples": float(len(samples)),
        "buffer": float(caps.sample_buffer),
        "instant": float(caps.instant_power),
        "span_s": span_s,
        "mean_power_w": integrated_j / span_s,
        "counter_w": counter_j / span_s,
        "integrated_j": integrated_j,
        "counter_j": counter_j,
        "ratio": integrated_j / counter_j if counter_j else float("nan"),
    }
    print(
        f"\nnvml {'load' if load else 'idle'}: "
        + ", ".join(f"{k}={v:.3f}" for k, v in figures.items())
    )
    return figures


def _plausible(figures: dict[str, float]) -> None:
    assert figures["span_s"] > DURATION_S / 2
    assert 5.0 < figures["counter_w"] < 2000.0, "counter is not in mJ, or the span is off"
    assert 5.0 < figures["mean_power_w"] < 2000.0, "power is not in mW, or the clock is off"
    assert 0.5 < figures["ratio"] < 2.0


@pytest.mark.parametrize("hz", [10.0, 50.0])
@pytest.mark.parametrize("buffer", [False, True], ids=["instant", "buffered"])
def test_idle_power_matches_energy_counter(real_nvml: Any, hz: float, buffer: bool) -> None:
    """Idle: integrated power (instant or buffered) agrees with the energy counter's increase."""
    nvml = real_nvml if buffer else _NoBuffer(real_nvml)
    _plausible(_measure(nvml, hz))


def test_loaded_power_matches_energy_counter(real_nvml: Any) -> None:
    """Under a matmul loop, integrated power follows the counter and rises above idle."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    stop = threading.Event()

    def work() -> None:
        a = torch.randn(8192, 8192, device="cuda:0", dtype=torch.float16)
        while not stop.is_set():
            for _ in range(20):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()

    idle = _measure(real_nvml, 50.0)
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        time.sleep(0.5)  # let clocks ramp
        loaded = _measure(real_nvml, 50.0, load=work)
    finally:
        stop.set()
        worker.join(timeout=10)
    _plausible(loaded)
    assert loaded["counter_w"] > idle["counter_w"] + 20.0
