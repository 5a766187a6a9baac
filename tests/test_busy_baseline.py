"""A server that is never idle: the live baseline holds the resident cost, not loaded power."""

from __future__ import annotations

import pytest
from busy_server import run_busy


def test_two_busy_hours_after_a_minute_of_standby_keep_baseline_and_idle_share() -> None:
    """Two simulated hours of four streams always in flight: baseline within 5 %, idle share within 2 points."""
    run = run_busy(standby_s=60.0, light_s=0.0, busy_s=7200.0)
    assert run.seconds >= 7260.0
    assert run.baseline_w == pytest.approx(70.0, rel=0.05)
    assert run.basis == "held"
    assert abs(run.idle_share - run.truth_idle_share) < 0.02
    assert abs(run.last_window_idle_share - run.last_window_truth_idle_share) < 0.02


def test_issue_shape_light_traffic_then_eleven_busy_minutes() -> None:
    """40 s of light traffic, then 11 minutes never idle (the issue's run): no drift to loaded power."""
    run = run_busy(standby_s=0.0, light_s=40.0, busy_s=660.0)
    assert run.baseline_w == pytest.approx(70.0, rel=0.05)
    assert run.basis == "held"
    assert abs(run.last_window_idle_share - run.last_window_truth_idle_share) < 0.02


def test_busy_from_the_first_second_uses_the_start_up_readings() -> None:
    """Traffic from 0.6 s after start, never a standby median: the start-up readings stand.

    Without an energy counter: with one, the reconciler's first window (1 s) spans
    the first request's start and scales those few readings up with it.
    """
    run = run_busy(standby_s=0.6, light_s=0.0, busy_s=300.0, counter=False)
    assert run.basis == "startup"
    assert run.baseline_w == pytest.approx(70.0, rel=0.05)
