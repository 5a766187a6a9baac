"""Reconciliation of instant power with the hardware energy counter."""

from __future__ import annotations

import itertools

import pytest

from sidecar.power.base import PowerSample
from sidecar.reconcile import Reconciler, reconcile_all


def integral(samples: list[PowerSample]) -> float:
    return sum(
        (a.power_w + b.power_w) / 2 * (b.time_s - a.time_s) for a, b in itertools.pairwise(samples)
    )


def test_window_integral_matches_counter_exactly() -> None:
    """The line through emitted points integrates to the counter's increase, window by window."""
    raw = [PowerSample(t * 0.1, "0", 100.0 + (t % 7), 5000.0 + 13.0 * t) for t in range(101)]
    out = reconcile_all(raw)
    assert len(out) == len(raw)
    assert integral(out) == pytest.approx(13.0 * 100, rel=1e-9)


def test_shape_is_kept_while_scale_changes() -> None:
    """Within a window every reading is scaled by the same factor."""
    rec = Reconciler(min_window_s=1.0)
    out = rec.push(PowerSample(0.0, "0", 100.0, 0.0))
    for t in range(1, 11):
        out += rec.push(
            PowerSample(t * 0.1, "0", 100.0 if t % 2 else 200.0, None if t < 10 else 300.0)
        )
    ratios = {
        round(o.power_w / r, 9)
        for o, r in zip(out[1:], [100.0 if t % 2 else 200.0 for t in range(1, 11)], strict=True)
    }
    assert len(ratios) == 1
    # the anchor keeps its own power for the first half-step: (300 - 100*0.1/2) / 140
    assert rec.last_scale == pytest.approx((300.0 - 5.0) / 140.0)


def test_counter_reset_starts_a_new_window() -> None:
    """A counter that goes backwards (driver reload) is not used to scale."""
    rec = Reconciler(min_window_s=0.5)
    rec.push(PowerSample(0.0, "0", 100.0, 1e6))
    out = rec.push(PowerSample(1.0, "0", 100.0, 10.0))
    assert [s.power_w for s in out] == [100.0]
    out = rec.push(PowerSample(2.0, "0", 100.0, 110.0))
    assert out[0].power_w == pytest.approx(100.0)


def test_counter_that_does_not_move_is_never_used() -> None:
    """A stuck counter holds samples only up to the hold bound, then passes them unscaled."""
    rec = Reconciler(min_window_s=1.0, max_hold_s=3.0)
    rec.push(PowerSample(0.0, "0", 50.0, 7.0))
    held = [rec.push(PowerSample(float(t), "0", 50.0, 7.0)) for t in range(1, 5)]
    assert held[0] == []
    assert held[1] == []
    released = [s for batch in held for s in batch]
    assert [s.power_w for s in released] == [50.0, 50.0, 50.0]


def test_samples_without_counter_pass_through() -> None:
    """A source without an energy counter is integrated as read."""
    raw = [PowerSample(float(t), "0", 10.0 * t) for t in range(5)]
    assert reconcile_all(raw) == raw


def test_short_bursts_at_a_low_rate_keep_the_counter_total() -> None:
    """At 1 Hz, a window that over-emits carries its surplus into the next: totals match."""
    raw = []
    energy = 0.0
    for t in range(121):
        # 100 W baseline; a 0.3 s burst of 1 kW every 7 s falls between readings
        burst = 900.0 * 0.3 if t % 7 == 3 else 0.0
        reading = 1000.0 if t % 7 == 3 else 100.0  # the sensor catches the burst's peak
        if t:
            energy += 100.0 + burst
        raw.append(PowerSample(float(t), "0", reading, energy))
    out = reconcile_all(raw)
    assert integral(out) == pytest.approx(energy, rel=1e-6)
    assert all(s.power_w >= 0 for s in out)
