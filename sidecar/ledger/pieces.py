"""The assignment of pieces: where each piece of an interval's energy goes.

The ledger cuts the power line into pieces with a constant set of requests in
flight, wholly above or below the baseline; this module splits each piece into
phases and shares it among those requests (CONTRACT.md, Sharing), keeping the
totals by phase, by model and the unattributed bucket.
"""

from __future__ import annotations

import itertools

from sidecar.ledger.prefill_fit import PrefillFit
from sidecar.ledger.requests import PHASES, Phase, Request


class Books:
    """The running totals the pieces are booked into."""

    def __init__(self) -> None:
        self.phase_j: dict[Phase, float] = dict.fromkeys(PHASES, 0.0)
        self.prefill_fit = PrefillFit()
        self.model_j: dict[tuple[str, Phase], float] = {}
        self.unattributed_j = 0.0

    def assign_interval(
        self,
        t0: float,
        p0: float,
        t1: float,
        p1: float,
        idle_w: float,
        reqs: list[Request],
        now_s: float,
    ) -> float:
        """Split one interval of the power line among ``reqs`` (those overlapping it);
        returns its energy."""
        total = 0.0
        slope = (p1 - p0) / (t1 - t0)
        cuts = {t0, t1}
        for r in reqs:
            for c in (r.start_s, r.first_token_s, r.end_s):
                if c is not None and t0 < c < t1:
                    cuts.add(c)
        if (p0 - idle_w) * (p1 - idle_w) < 0:
            cuts.add(t0 + (idle_w - p0) / slope)
        points = sorted(cuts)
        for a, b in itertools.pairwise(points):
            if b <= a:
                continue
            pa = p0 + slope * (a - t0)
            pb = p0 + slope * (b - t0)
            energy = (pa + pb) / 2.0 * (b - a)
            total += energy
            inside = [r for r in reqs if r.start_s <= a and r.end_s >= b]
            if not inside:
                self.phase_j["idle_standby"] += energy
                continue
            above = pa + pb > 2.0 * idle_w
            idle_part = idle_w * (b - a) if above else energy
            dyn_part = energy - idle_part if above else 0.0
            self._share(inside, a, b, idle_part, dyn_part, now_s)
        return total

    def _share(
        self, inside: list[Request], a: float, b: float, idle: float, dyn: float, now: float
    ) -> None:
        self.phase_j["idle_serving"] += idle
        self.phase_j["dynamic"] += dyn
        n = len(inside)
        each_idle = idle / n
        weights: list[float] | None = None
        if dyn > 0.0:
            informed = [r.informed for r in inside]
            works = [
                r.work(a, b, now) if k else (0.0, 0.0)
                for r, k in zip(inside, informed, strict=True)
            ]
            self.prefill_fit.observe(sum(p for p, _ in works), sum(d for _, d in works), dyn, b - a)
            ratio = self.prefill_fit.ratio
            raw = [p * ratio + d for p, d in works]
            n_inf = sum(informed)
            mean = (sum(raw) / n_inf) if n_inf else 1.0
            weights = [w if k else mean for w, k in zip(raw, informed, strict=True)]
            if sum(weights) <= 0.0:
                weights = [1.0] * n
        total_w = sum(weights) if weights else 1.0
        for i, r in enumerate(inside):
            d = dyn * weights[i] / total_w if weights else 0.0
            if r.emitted or not r.attributable:
                self.unattributed_j += each_idle + d
                continue
            r.idle_j += each_idle
            r.dynamic_j += d
            if r.first_token_s is None or b <= r.first_token_s:
                r.prefill_j += each_idle + d
            if r.booked:
                self._add_model(r.model, each_idle, d)

    def _add_model(self, model: str, idle: float, dyn: float) -> None:
        key_i: tuple[str, Phase] = (model, "idle_serving")
        key_d: tuple[str, Phase] = (model, "dynamic")
        self.model_j[key_i] = self.model_j.get(key_i, 0.0) + idle
        self.model_j[key_d] = self.model_j.get(key_d, 0.0) + dyn

    def book(self, r: Request) -> None:
        """A provisional label became final: its shares so far go to its model."""
        r.booked = True
        self._add_model(r.model, r.idle_j, r.dynamic_j)
