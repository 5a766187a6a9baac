"""The idle (memory-resident) baseline of one GPU, estimated from its own samples.

Everything above the baseline while requests run is ``dynamic``; everything
below it is the resident cost. A baseline that drifts up into loaded power
hands the work's energy to the resident cost, so the estimator is built to
fall back on what it last knew rather than on what it sees under load.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final

SETTLE_S: Final = 2.0
"""Power tails off for a moment after a burst; keep it out of the idle estimate."""
MIN_STANDBY_SAMPLES: Final = 10
BASELINE_WINDOW_S: Final = 600.0
INF: Final = math.inf


class BaselineEstimator:
    """Idle (memory-resident) power of one GPU, from its standby samples.

    The median of standby samples taken at least ``settle_s`` after a request
    ended; with fewer than ten, the 5th percentile of all samples; in a sliding
    window (``run``) before any standby, the lowest power seen so far. "Before any
    standby" is read as before the first ten standby samples, the least a median
    needs: a sidecar that starts a moment before a busy server would otherwise
    take the 5th percentile of loaded power for the resident cost.
    With ``window_s=None`` it keeps everything (``attribute``: one baseline per
    trace). Samples are thinned to ``min_spacing_s`` and the statistic is
    recomputed at most every ``recompute_s`` so a 100 Hz sampler stays cheap.
    """

    def __init__(
        self,
        *,
        window_s: float | None = BASELINE_WINDOW_S,
        min_spacing_s: float = 0.1,
        recompute_s: float = 1.0,
    ) -> None:
        self._window_s = window_s
        self._spacing_s = min_spacing_s if window_s is not None else 0.0
        self._recompute_s = recompute_s if window_s is not None else 0.0
        self._all: deque[tuple[float, float]] = deque()
        self._standby: deque[tuple[float, float]] = deque()
        self._lowest_w = INF
        self._standby_seen = 0
        self._last_kept_s = -INF
        self._computed_at_s = -INF
        self._value_w: float | None = None

    def observe(self, time_s: float, power_w: float, *, standby: bool) -> None:
        """Record one sample; ``standby`` means no request in flight and settled."""
        self._lowest_w = min(self._lowest_w, power_w)
        if time_s - self._last_kept_s < self._spacing_s:
            return
        self._last_kept_s = time_s
        self._all.append((time_s, power_w))
        if standby:
            self._standby.append((time_s, power_w))
            self._standby_seen += 1
        if self._window_s is not None:
            horizon = time_s - self._window_s
            for q in (self._all, self._standby):
                while q and q[0][0] < horizon:
                    q.popleft()
        if self._window_s is not None and (
            self._value_w is None or time_s - self._computed_at_s >= self._recompute_s
        ):
            self._computed_at_s = time_s
            self._value_w = self._compute()

    def _compute(self) -> float | None:
        if len(self._standby) >= MIN_STANDBY_SAMPLES:
            return median(sorted(p for _, p in self._standby))
        if self._window_s is not None and self._standby_seen < MIN_STANDBY_SAMPLES:
            return self._lowest_w if self._lowest_w < INF else None
        if self._all:
            return percentile(sorted(p for _, p in self._all), 0.05)
        return None

    @property
    def value_w(self) -> float | None:
        """The current estimate, or ``None`` before any sample."""
        if self._window_s is None:
            return self._compute()
        return self._value_w


def median(xs: Sequence[float]) -> float:
    n = len(xs)
    mid = n // 2
    return xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2.0


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of sorted data (numpy's default method)."""
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def estimate_idle_watts(
    samples: Iterable[tuple[str, float, float]],
    spans: Iterable[tuple[float, float]],
    *,
    settle_s: float = SETTLE_S,
) -> dict[str, float]:
    """One baseline per GPU over a whole trace: ``attribute``'s first pass.

    ``samples`` are ``(gpu, time_s, power_w)`` in any order and ``spans`` the
    ``(start_s, end_s)`` of inference requests. The estimator is the same one
    the live ledger slides over ten minutes, here over the whole trace.
    """

    ordered = sorted(samples, key=lambda s: s[1])
    starts = sorted(spans)
    estimators: dict[str, BaselineEstimator] = {}
    ends: list[float] = []
    i = 0
    last_end = -INF
    for gpu, t, p in ordered:
        while i < len(starts) and starts[i][0] <= t:
            heapq.heappush(ends, starts[i][1])
            i += 1
        while ends and ends[0] <= t:
            last_end = max(last_end, heapq.heappop(ends))
        standby = not ends and t - last_end >= settle_s
        est = estimators.setdefault(gpu, BaselineEstimator(window_s=None))
        est.observe(t, max(0.0, p), standby=standby)
    return {g: (e.value_w or 0.0) for g, e in estimators.items()}
