"""Offline attribution of a recorded trace: the same ledger as ``run``, fed from files.

Samples are reconciled with their energy counter where the trace has one,
exactly as the live sampler does, then one idle baseline per GPU is
estimated over the whole trace (unless given), then samples and requests
are fed to the ledger in time order.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.carbon.emissions import operational_grams
from sidecar.ledger import Ledger, estimate_idle_watts
from sidecar.ledger.core import GAP_PERIODS
from sidecar.power.base import PowerSample
from sidecar.reconcile import reconcile_all
from sidecar.trace import PowerRow, RequestRow


class AttributionInputError(ValueError):
    """Inputs that disagree with each other (``--idle-watts`` count versus GPUs)."""


def split_idle_watts(values: Sequence[float], gpus: Sequence[str]) -> dict[str, float]:
    """``--idle-watts``: one total split evenly, or one value per GPU in order."""
    if len(values) == 1:
        return dict.fromkeys(gpus, values[0] / len(gpus))
    if len(values) != len(gpus):
        raise AttributionInputError(
            f"--idle-watts: {len(values)} values for {len(gpus)} GPUs "
            "(give one total or one value per GPU)"
        )
    return dict(zip(gpus, values, strict=True))


@dataclass(frozen=True, slots=True)
class Booked:
    """A trace booked through the ledger, flushed."""

    ledger: Ledger
    gpus: list[str]
    idle_watts: dict[str, float]
    period_s: float | None
    """The trace's sample period (:func:`sample_period_s`); None: too few samples to tell."""


def book_trace(
    power: Sequence[PowerRow],
    requests: Sequence[RequestRow],
    *,
    idle_watts: Sequence[float] | None = None,
    after_sample: Callable[[float, Ledger], None] | None = None,
) -> Booked:
    """Feeds a trace to the ledger in time order; ``after_sample(time_s, ledger)`` reads
    it as it goes (the report's time series), so a series and ``attribute``'s totals
    come from one ledger fed one way."""
    ordered = sorted(power, key=lambda r: r.time_s)
    period_s = sample_period_s(ordered)
    gap_after_s = None if period_s is None else GAP_PERIODS * period_s
    samples = reconcile_all(
        (PowerSample(r.time_s, r.gpu, r.power_w, r.energy_j) for r in ordered),
        gap_after_s=gap_after_s,
    )
    samples.sort(key=lambda s: s.time_s)
    gpus = list(dict.fromkeys(s.gpu for s in samples))
    if idle_watts:
        idle = split_idle_watts(idle_watts, gpus)
    else:
        spans = [(r.start_s, r.end_s) for r in requests]
        idle = estimate_idle_watts(((s.gpu, s.time_s, s.power_w) for s in samples), spans)
    ledger = Ledger(gpus, idle_watts=idle, baseline_window_s=None, sample_period_s=period_s)
    pending = sorted(requests, key=lambda r: r.start_s)
    i = 0
    for s in samples:
        while i < len(pending) and pending[i].start_s <= s.time_s:
            _add(ledger, pending[i])
            i += 1
        ledger.sample(s.gpu, s.time_s, s.power_w, s.energy_j)
        if after_sample is not None:
            after_sample(s.time_s, ledger)
    for r in pending[i:]:
        _add(ledger, r)
    ledger.flush()
    return Booked(ledger, gpus, idle, period_s)


def attribute(
    power: Sequence[PowerRow],
    requests: Sequence[RequestRow],
    *,
    idle_watts: Sequence[float] | None = None,
    carbon_intensity_g_per_kwh: float | None = None,
) -> dict[str, Any]:
    """The contract's ``attribute`` JSON for one trace."""
    booked = book_trace(power, requests, idle_watts=idle_watts)
    ledger, gpus, idle, period_s = booked.ledger, booked.gpus, booked.idle_watts, booked.period_s
    done = {f.id: f for f in ledger.pop_finished()}
    total = ledger.total_j
    out: dict[str, Any] = {
        "energy_joules": {
            "total": total,
            "dynamic": ledger.phase_j["dynamic"],
            "idle_serving": ledger.phase_j["idle_serving"],
            "idle_standby": ledger.phase_j["idle_standby"],
        },
        "idle_baseline_watts": sum(idle.values()),
        "prefill_token_weight": ledger.prefill_fit.ratio,
    }
    if carbon_intensity_g_per_kwh is not None:
        out["emissions_grams"] = operational_grams(total, carbon_intensity_g_per_kwh)
    out["requests"] = [
        {
            "id": r.id,
            "model": r.model,
            "dynamic_joules": done[r.id].dynamic_j,
            "idle_joules": done[r.id].idle_j,
            "energy_joules": done[r.id].energy_j,
            "prefill_joules": done[r.id].prefill_j,
            "decode_joules": done[r.id].decode_j,
        }
        for r in requests
    ]
    if period_s is not None:
        out["sampler_gap_seconds"] = sum(ledger.gap_s(g) for g in gpus)
    return out


def sample_period_s(power: Sequence[PowerRow]) -> float | None:
    """The trace's sample period: the median interval between one GPU's readings.

    A recording does not say what rate it was taken at; the median of the
    intervals is that rate whatever the gaps. Fewer than ten intervals: too
    few to tell a gap from the rate, so no gaps (every interval is drawn).
    """
    last: dict[str, float] = {}
    intervals: list[float] = []
    for r in power:  # time-ordered
        prev = last.get(r.gpu)
        if prev is not None and r.time_s > prev:
            intervals.append(r.time_s - prev)
        last[r.gpu] = r.time_s
    if len(intervals) < 10:
        return None
    return statistics.median(intervals)


def _add(ledger: Ledger, r: RequestRow) -> None:
    ledger.add_request(
        r.id,
        model=r.model,
        start_s=r.start_s,
        end_s=r.end_s,
        first_token_s=r.first_token_s,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        cached_tokens=r.cached_tokens,
        status=r.status,
    )
