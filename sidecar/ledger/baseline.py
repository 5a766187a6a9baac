"""The idle (memory-resident) baseline of one GPU, estimated from its own samples.

Everything above the baseline while requests run is ``dynamic``; everything
below it is the resident cost. A baseline that drifts up into loaded power
hands the work's energy to the resident cost, so the estimator is built to
fall back on what it last knew rather than on what it sees under load.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final, Literal

SETTLE_S: Final = 2.0
"""Power tails off for a moment after a burst; keep it out of the idle estimate."""
MIN_STANDBY_SAMPLES: Final = 10
BASELINE_WINDOW_S: Final = 600.0
INF: Final = math.inf


Basis = Literal["configured", "standby", "held", "startup"]
BASES: Final[tuple[Basis, ...]] = ("startup", "held", "standby", "configured")
"""Weakest first: where GPUs differ, the sidecar reports the weakest basis in force."""
STARTUP_SAMPLES: Final = 600
"""How many readings before the first request the start-up median keeps."""
MIN_STARTUP_SAMPLES: Final = 3
"""Fewer readings than this are no estimate: a lone 0 W sample must not pin the baseline."""
LOW_RANK: Final = 3
"""With no reading before the first request, the third-lowest reading since start: the
lowest power a busy server shows (between batches) without one odd reading deciding it."""


class BaselineEstimator:
    """Idle (memory-resident) power of one GPU, from its standby samples.

    The median of standby samples taken at least ``settle_s`` after a request
    ended. With ``window_s=None`` (``attribute``: one baseline per trace) it
    keeps everything, and with fewer than ten standby samples falls back to the
    5th percentile of all samples.

    In a sliding window (``run``) the fallbacks differ, because a server that is
    never idle would otherwise hand its loaded power to the baseline: with too
    few standby samples in the window it *holds* the last standby median (basis
    ``held``; the estimate moves only when new standby samples come, so
    ageing out under load leaves the median of the full window in force); before any standby median it uses the median of what it saw
    after the upstream answered and before the first request (``startup``), and
    with fewer than three such readings the third-lowest reading since then,
    never a single reading. Samples are thinned to ``min_spacing_s``
    and the statistic is recomputed at most every ``recompute_s`` so a 100 Hz
    sampler stays cheap.
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
        self._lowest: list[float] = []  # the LOW_RANK lowest readings (live: since it answered)
        self._before_request: list[float] = []  # ... and of those, before the first request
        self._held_w: float | None = None
        self._fresh = False  # standby samples came since the last median
        self._last_kept_s = -INF
        self._computed_at_s = -INF
        self._value_w: float | None = None
        self.basis: Basis = "startup"

    def observe(
        self, time_s: float, power_w: float, *, standby: bool, before_request: bool = False
    ) -> None:
        """Record one sample; ``standby`` means no request in flight and settled,
        ``before_request`` that no request has arrived yet since start."""
        if time_s - self._last_kept_s < 0.9 * self._spacing_s:
            return  # (0.9: a sampler at exactly 1/spacing, with jitter, keeps every reading)
        self._last_kept_s = time_s
        if before_request and len(self._before_request) < STARTUP_SAMPLES:
            self._before_request.append(power_w)
        lowest = self._lowest
        if len(lowest) < LOW_RANK or power_w < lowest[-1]:
            bisect.insort(lowest, power_w)
            del lowest[LOW_RANK:]
        if self._window_s is None:
            self._all.append((time_s, power_w))
        if standby:
            self._standby.append((time_s, power_w))
            self._fresh = True
        if self._window_s is not None:
            horizon = time_s - self._window_s
            while self._standby and self._standby[0][0] < horizon:
                self._standby.popleft()
        if self._window_s is not None and (
            self._value_w is None or time_s - self._computed_at_s >= self._recompute_s
        ):
            self._computed_at_s = time_s
            self._value_w = self._compute()

    def upstream_ready(self, time_s: float) -> None:
        """The model server answered at ``time_s``: what came before was a lower state
        (the model not loaded yet), not its resident cost, so forget it."""
        while self._standby and self._standby[0][0] < time_s:
            self._standby.popleft()
        self._lowest.clear()
        self._before_request.clear()
        self._held_w = None
        self._value_w = None
        self._computed_at_s = -INF

    def _compute(self) -> float | None:
        if len(self._standby) >= MIN_STANDBY_SAMPLES:
            self.basis = "standby"
            if self._fresh or self._held_w is None or self._window_s is None:
                # Only new standby moves the estimate: samples ageing out of the window
                # under load would leave the median of the last few, a noisier figure.
                self._held_w = median(sorted(p for _, p in self._standby))
                self._fresh = False
            return self._held_w
        if self._window_s is None:
            self.basis = "startup"
            return percentile(sorted(p for _, p in self._all), 0.05) if self._all else None
        if self._held_w is not None:
            self.basis = "held"
            return self._held_w
        self.basis = "startup"
        if len(self._before_request) >= MIN_STARTUP_SAMPLES:
            return median(sorted(self._before_request))
        if len(self._lowest) >= LOW_RANK:
            return self._lowest[-1]
        return None

    @property
    def value_w(self) -> float | None:
        """The current estimate, or ``None`` before there is one."""
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
