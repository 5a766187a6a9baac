"""The figures the outputs read, kept as plain numbers: bounded labels, histograms,
snapshots, and the ``/summary`` window between two snapshots.

Split from the meter, which feeds them, so a scrape's and a summary's arithmetic
reads on its own.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Final

from sidecar.ledger import PHASES, Phase

REQUEST_BUCKETS_J: Final = (
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5,
)  # fmt: skip
OTHER_MODEL: Final = "other"


class ModelLabels:
    """Bounded ``model`` label values: the first ``limit`` names seen, then ``other``.

    Calling registers a name; the meter calls it only for names a successful
    response confirmed, so a client's typos cannot use up the label budget.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()

    def known(self, model: str) -> bool:
        """Whether ``model`` is a registered label (without registering it)."""
        return model in self._known

    def __call__(self, model: str) -> str:
        if model in self._known:
            return model
        if len(self._known) < self._limit and len(model) <= 128:
            self._known.add(model)
            return model
        return OTHER_MODEL


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram kept as plain counts (Prometheus semantics)."""

    bounds: tuple[float, ...] = REQUEST_BUCKETS_J
    counts: list[int] = field(default_factory=lambda: [0] * (len(REQUEST_BUCKETS_J) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else f"{bound:g}", running))
        return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Cumulative figures at one moment; a window is the difference of two."""

    time_s: float
    phase_j: tuple[float, float, float]
    requests: int
    completion_tokens: int
    operational_g: float
    embodied_g: float
    prompt_tokens: int = 0
    prefill_j: float = 0.0
    decode_j: float = 0.0


def window(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """The contract's ``/summary`` figures for the window between two snapshots."""
    phases: dict[Phase, float] = {
        p: max(0.0, b.phase_j[i] - a.phase_j[i]) for i, p in enumerate(PHASES)
    }
    total = sum(phases.values())
    attributed = phases["dynamic"] + phases["idle_serving"]
    requests = b.requests - a.requests
    tokens = b.completion_tokens - a.completion_tokens
    prompt = b.prompt_tokens - a.prompt_tokens
    operational = b.operational_g - a.operational_g
    embodied = b.embodied_g - a.embodied_g

    def ratio(x: float, y: float) -> float | None:
        return x / y if y > 0 else None

    return {
        "seconds": round(b.time_s - a.time_s, 3),
        "energy_joules": {"total": total, **phases},
        "requests": requests,
        "completion_tokens": tokens,
        "prompt_tokens": prompt,
        "idle_share": ratio(phases["idle_serving"] + phases["idle_standby"], total),
        "standby_share": ratio(phases["idle_standby"], total),
        "joules_per_request_attributed": ratio(attributed, requests),
        "joules_per_request_all_in": ratio(total, requests),
        "joules_per_output_token": ratio(attributed, tokens),
        "joules_per_output_token_all_in": ratio(total, tokens),
        "prefill_joules_per_prompt_token": ratio(b.prefill_j - a.prefill_j, prompt),
        "decode_joules_per_output_token": ratio(b.decode_j - a.decode_j, tokens),
        "grams_per_request": ratio(operational, requests),
        "sci_grams_per_request": ratio(operational + embodied, requests),
        "sci_grams_per_1k_tokens": None
        if tokens <= 0
        else (operational + embodied) * 1000 / tokens,
        "emissions_grams": {"operational": operational, "embodied": embodied},
    }
