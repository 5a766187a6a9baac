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


def test_counter_matches_power_and_truth_under_many_overlapping_loads() -> None:
    """With dozens of overlapping ramping, falling and ending loads, the counter is the
    integral of the power line and idle plus every request's truth (the running sums that
    keep a load change O(1) lose nothing)."""
    import random

    rnd = random.Random(7)
    gpu = SimulatedGpus(gpus=2, idle_w=60.0, ramp_s=0.03)
    gpu.energy_j(0.0)
    live: list[str] = []
    ended_truth = 0.0
    t, dt, integral = 0.0, 0.0005, 0.0
    for step in range(8000):
        if step % 20 == 0:  # a load change every 10 ms
            r = rnd.random()
            if r < 0.4 or not live:
                live.append(f"r{step}")
                gpu.set_load(live[-1], t, rnd.uniform(20.0, 300.0))
            elif r < 0.7:
                gpu.set_load(rnd.choice(live), t, rnd.uniform(0.0, 300.0))
            else:
                rid = live.pop(rnd.randrange(len(live)))
                gpu.set_load(rid, t, 0.0)
                ended_truth += gpu.forget(rid)
        integral += (gpu.power_w(t) + gpu.power_w(t + dt)) / 2.0 * dt  # trapezoid per 0.5 ms
        t += dt
    for rid in live:
        gpu.set_load(rid, t, 0.0)
        ended_truth += gpu.forget(rid)
    assert gpu.energy_j(t) == pytest.approx(60.0 * t + ended_truth / 2, rel=1e-9)
    assert gpu.energy_j(t) == pytest.approx(integral, rel=2e-3)  # ramps cut by the grid
    assert gpu.power_w(t) == pytest.approx(60.0)


def test_a_burst_of_starts_within_one_ramp_keeps_power_counter_and_truth() -> None:
    """200 requests start 0.1 ms apart (all ramping at once) and half change load mid-ramp:
    the power line is every contribution's level summed, the counter idle plus every
    truth, with the ramping ones kept as one summed line (each change O(log n))."""
    gpu = SimulatedGpus(gpus=1, idle_w=70.0, ramp_s=0.03)
    gpu.energy_j(100.0)
    t = 100.0
    for i in range(200):
        t += 0.0001
        gpu.set_load(f"b{i}", t, 150.0)
        if i % 2 and i > 50:
            gpu.set_load(f"b{i - 50}", t, 60.0)  # a first token, mid-ramp or after
        if i % 10 == 0:
            each = sum(c.level(t, gpu.ramp_s) for c in gpu._loads.values())
            assert gpu.power_w(t) == pytest.approx(70.0 + each, rel=1e-12)
    t_end = t + 0.1
    truth = 0.0
    for i in range(200):
        gpu.set_load(f"b{i}", t_end, 0.0)
        truth += gpu.forget(f"b{i}")
    assert gpu.energy_j(t_end) == pytest.approx(70.0 * (t_end - 100.0) + truth, rel=1e-9)
    assert gpu.power_w(t_end) == pytest.approx(70.0)
    assert truth > 0.0
