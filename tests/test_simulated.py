"""The simulated GPU: exact ground truth, ramps inside lifetimes, a counter that integrates."""

from __future__ import annotations

import pytest

from sidecar.power.simulated import SimulatedGpus, SimulatedSource


def test_truth_integrates_ramp_and_plateau() -> None:
    """A 100 W load with a 0.1 s ramp from t=1 to t=3 is worth 195 J (ramp 5 J + 1.9 s x 100 W)."""
    gpu = SimulatedGpus(gpus=2, idle_w=50.0, ramp_s=0.1)
    gpu.set_load("a", 1.0, 100.0)
    assert gpu.power_w(1.05) == pytest.approx(50.0 + 25.0)
    gpu.set_load("a", 3.0, 0.0)
    assert gpu.truth_j("a") == pytest.approx(195.0)
    assert gpu.power_w(3.0) == pytest.approx(50.0)


def test_counter_is_idle_plus_every_contribution() -> None:
    """The per-GPU energy counter equals idle plus the loads' truth shared over the GPUs."""
    gpu = SimulatedGpus(gpus=2, idle_w=50.0, ramp_s=0.05)
    gpu.energy_j(0.0)
    gpu.set_load("a", 1.0, 80.0)
    gpu.set_load("b", 1.5, 40.0)
    gpu.set_load("a", 2.0, 10.0)
    gpu.set_load("a", 4.0, 0.0)
    gpu.set_load("b", 4.0, 0.0)
    truth = gpu.truth_j("a") + gpu.truth_j("b")
    assert gpu.energy_j(5.0) == pytest.approx(50.0 * 5.0 + truth / 2)


def test_source_is_deterministic_for_a_seed() -> None:
    """Same seed, same readings: tests and benchmarks can repeat a run exactly."""
    ta = iter([0.1 * i for i in range(10)])
    tb = iter([0.1 * i for i in range(10)])
    a = SimulatedSource(SimulatedGpus(gpus=2, seed=7), clock=lambda: next(ta))
    b = SimulatedSource(SimulatedGpus(gpus=2, seed=7), clock=lambda: next(tb))
    ra = [a.read() for _ in range(10)]
    rb = [b.read() for _ in range(10)]
    assert ra == rb
    assert [g.gpu for g in a.open()] == ["0", "1"]
