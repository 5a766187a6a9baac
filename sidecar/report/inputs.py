"""What a report is made of, whichever source it came from (a recording or Prometheus).

Both sources fill one :class:`ReportInputs`; :mod:`sidecar.report.figures` turns it
into the contract's ``report.json`` and :mod:`sidecar.report.render` into the
prose and the PNGs. Keeping the sources down to data means the two kinds of
report compute every derived figure the same way.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, TypeVar

from sidecar.ledger import PHASES, Phase


class ReportError(ValueError):
    """Bad input for ``report``: one line naming what is wrong; nothing is written."""


@dataclass(frozen=True, slots=True)
class Gpu:
    index: str
    uuid: str | None
    name: str | None


@dataclass(slots=True)
class ModelTotals:
    """One model's attributed figures over the period."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dynamic_j: float = 0.0
    idle_serving_j: float = 0.0
    prefill_j: float | None = None
    decode_j: float | None = None
    # Tokens of the requests whose stage split is known (the per-token figures' denominators).
    staged_prompt_tokens: int = 0
    staged_completion_tokens: int = 0
    staged_prefill_j: float = 0.0
    staged_decode_j: float = 0.0


@dataclass(frozen=True, slots=True)
class IntensityChange:
    """An intensity in force from ``time_s`` (Unix seconds) until the next change."""

    time_s: float
    grams_per_kwh: float
    source: str
    region: str | None = None


@dataclass(frozen=True, slots=True)
class Embodied:
    """SCI's M inputs: grams per second of reservation, and what they assume."""

    grams_per_second: float
    gpus: int
    gpu_embodied_kg: float
    gpu_embodied_source: str
    host_embodied_kg: float
    host_share: float
    lifetime_years: float
    stated_by: str
    """Where these came from: ``run.json``, or the defaults (no recorded inputs)."""


@dataclass(frozen=True, slots=True)
class RequestEnergy:
    """The distribution of attributed energy per request: values, or histogram buckets."""

    values_j: tuple[float, ...] = ()
    buckets: tuple[tuple[float, float], ...] = ()
    """(upper bound in J, count) pairs, not cumulative, from the Prometheus histogram."""


@dataclass(slots=True)
class ReportInputs:
    source: str
    """What the report read: ``trace DIR`` or ``prometheus URL SELECTOR``."""
    from_s: float
    to_s: float
    gpus: list[Gpu]
    phase_j: dict[Phase, float]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    by_model: dict[str, ModelTotals]
    idle_baseline_w: float | None
    """The baseline the phases were split against (total over GPUs); ``None`` if it moved."""
    bin_edges_s: list[float]
    """Time bins of the series below: ``len(bin_edges_s) - 1`` bins."""
    bin_phase_j: dict[Phase, list[float]]
    power_times_s: list[float]
    power_w: list[float]
    baseline_times_s: list[float]
    baseline_w: list[float]
    request_energy: RequestEnergy
    intensity: list[IntensityChange]
    pue: float
    pue_stated_by: str
    embodied: Embodied | None
    operational_g: float | None = None
    """Set by a source that read booked grams (Prometheus) rather than computing them."""
    embodied_g: float | None = None
    energy_before_period_j: float = 0.0
    """Joules in the totals booked before the period's first sample (Prometheus: a sidecar
    that started inside the window, before its first scrape)."""
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return max(0.0, self.to_s - self.from_s)

    @property
    def total_j(self) -> float:
        return sum(self.phase_j[p] for p in PHASES)


K = TypeVar("K")

_RELATIVE: Final = re.compile(r"^-(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$")
_UNIT_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_time(flag: str, text: str, *, now_s: float | None = None) -> float:
    """``--from``/``--to``: RFC 3339 (with a zone), ``now``, or relative such as ``-7d``."""
    raw = text.strip()
    now = time.time() if now_s is None else now_s
    if raw == "now":
        return now
    m = _RELATIVE.match(raw)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise ReportError(
            f"{flag}: {text!r} is not an RFC 3339 time (2026-12-01T09:00:00Z) "
            "nor a relative one (-30m, -7d)"
        ) from None
    if when.tzinfo is None:
        raise ReportError(f"{flag}: {text!r} has no time zone (add Z or +01:00)")
    value = when.timestamp()
    if not math.isfinite(value):
        raise ReportError(f"{flag}: {text!r} is out of range")
    return value


def bin_edges(
    from_s: float, to_s: float, *, max_bins: int = 120, min_width_s: float = 1.0
) -> list[float]:
    """Evenly spaced edges over the period, at most ``max_bins`` bins of at least
    ``min_width_s`` (whole seconds once bins are wider than a second)."""
    span = max(to_s - from_s, 1e-9)
    width = max(min_width_s, span / max_bins)
    if width > 1.0:
        width = float(math.ceil(width))
    n = max(1, math.ceil(span / width))
    return [from_s + i * width for i in range(n)] + [min(to_s, from_s + n * width)]


def cumulative_at(times: list[float], values: list[float], t: float) -> float:
    """A cumulative series at ``t``, linear between readings, flat outside them."""
    i = bisect.bisect_right(times, t)
    if i == 0:
        return 0.0
    if i >= len(times):
        return values[-1]
    t0, t1 = times[i - 1], times[i]
    if t1 <= t0:
        return values[i]
    return values[i - 1] + (values[i] - values[i - 1]) * (t - t0) / (t1 - t0)


def binned(
    times: list[float], cumulative: Mapping[K, list[float]], edges: list[float]
) -> dict[K, list[float]]:
    """Each key's energy per bin, from its cumulative series read at the bin edges."""
    out: dict[K, list[float]] = {}
    for key, values in cumulative.items():
        at = [cumulative_at(times, values, e) for e in edges]
        at[-1] = values[-1] if values else 0.0  # the last bin closes on the final total
        out[key] = [max(0.0, b - a) for a, b in itertools.pairwise(at)]
    return out
