"""What the ledger knows of one request, and what it hands out once the energy is final.

A request's work is a piecewise-constant rate: its prompt spread over its time
to first token, then each streamed chunk's tokens spread over the gap since
the previous chunk. The sharing rule integrates that rate over each piece of
an interval, so the data lives here, beside its integral.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal

Phase = Literal["dynamic", "idle_serving", "idle_standby"]
PHASES: Final[tuple[Phase, ...]] = ("dynamic", "idle_serving", "idle_standby")
Status = Literal["ok", "error", "cancelled"]
STATUSES: Final[tuple[Status, ...]] = ("ok", "error", "cancelled")
INF: Final = math.inf


def computed_prompt(prompt_tokens: int | None, cached_tokens: int | None) -> int | None:
    """Of a prompt, the tokens the server computed: all but those it read from its prefix
    cache, which do (almost) no prefill work; ``None`` where the prompt is not known."""
    if prompt_tokens is None:
        return None
    return max(0, prompt_tokens - (cached_tokens or 0))


def cached_part(prompt_tokens: int | None, cached_tokens: int | None) -> int | None:
    """A server's count of cached prompt tokens, kept within its prompt (0 to all of it);
    ``None`` unless both are known."""
    if prompt_tokens is None or cached_tokens is None:
        return None
    return min(max(cached_tokens, 0), prompt_tokens)


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """A request whose energy is final: every GPU has been assigned past its end."""

    id: str
    model: str
    endpoint: str
    status: Status
    start_s: float
    end_s: float
    first_token_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    dynamic_j: float
    idle_j: float
    prefill_j: float = 0.0
    """The part of ``energy_j`` spent before the first token (CONTRACT.md, Stages)."""
    activity: bool = False
    """A model's stretch of activity (observer mode), not a request: no per-request figure."""
    missed_s: float = 0.0
    """Traces mode: seconds of its window already out of the hold when it reported
    (that energy went to the unattributed bucket, not to it)."""
    cached_tokens: int | None = None
    """Of ``prompt_tokens``, those the server read from its prefix cache (as it reported)."""

    @property
    def energy_j(self) -> float:
        """Attributed energy: its dynamic share plus its share of the resident cost."""
        return self.dynamic_j + self.idle_j

    @property
    def decode_j(self) -> float:
        """The rest of ``energy_j``: defined by difference, so the two stages sum exactly."""
        return self.energy_j - self.prefill_j


@dataclass(slots=True)
class Request:
    """Mutable state of one request while the ledger still needs it."""

    id: str
    model: str
    endpoint: str
    start_s: float
    prompt_work: float | None
    end_s: float = INF
    first_token_s: float | None = None
    status: Status = "ok"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    """Of ``prompt_tokens``, those the server read from its prefix cache: in the KV cache
    as any prompt token, but (almost) no prefill work."""
    # (t0, t1, prefill, decode): token work spread evenly over [t0, t1], in time order
    segments: deque[tuple[float, float, float, float]] = field(default_factory=deque)
    known_s: float = -INF  # the work rate is final up to this time
    last_chunk_s: float | None = None
    streamed: int = 0
    dynamic_j: float = 0.0
    idle_j: float = 0.0
    prefill_j: float = 0.0
    booked: bool = True
    """Whether its model label is final: shares go to the per-model totals as they come.
    A provisional label (a name no successful response has confirmed yet) keeps them
    on the request until :meth:`Ledger.relabel` or the end settles it."""
    attributable: bool = True
    """False for activity the ledger knows of but cannot hand to any request."""
    activity: bool = False
    """A model's stretch of activity, not a request (observer mode)."""
    emitted: bool = False
    """Handed out already; a lagging GPU's late share can no longer reach it."""
    queued: bool = False
    """Its prompt is in the books' prefill queue (:mod:`sidecar.ledger.prefill_queue`)."""
    counted: bool = False
    """Its exact prompt count came with its first token (a server reporting usage in
    every chunk), before any of its prompt's energy was booked."""
    rate_seen: bool = False
    """Its prompt fed the server's prefill rate (once: a piece at its first token comes
    again from a GPU that lags, or in the next slice from a GPU read later)."""

    def exact_prompt(self, tokens: float) -> float:
        """A streamed prompt's ``tokens`` (its segment holds the body's estimate) in the
        exact count of tokens computed, once the usage brought it (the prompt less what
        the server read from its prefix cache)."""
        if self.prompt_tokens is not None and self.prompt_work:
            return tokens * (self.computed_prompt / self.prompt_work)
        return tokens

    @property
    def computed_prompt(self) -> int:
        """Prompt tokens the server computed: the exact count less the cached ones."""
        return computed_prompt(self.prompt_tokens, self.cached_tokens) or 0

    @property
    def informed(self) -> bool:
        """Whether anything tells how much work this request does (prompt or tokens)."""
        return self.prompt_work is not None or self.streamed > 0 or bool(self.segments)

    def informed_at(self, a: float) -> bool:
        """:attr:`informed` in a piece from ``a``: a stream with no prompt estimate tells
        nothing of its work before its first token, though its tokens came since, so it
        weighs as the others' mean there whenever the piece is assigned (before the token
        arrived it weighed so; after, it weighed nothing)."""
        first = self.first_token_s
        if self.prompt_work is None and first is not None and a < first:
            return False
        return self.informed

    def work(self, a: float, b: float, now: float) -> tuple[float, float]:
        """Prefill and decode tokens worked in [a, b]: integrals of piecewise-constant rates."""
        prefill = decode = 0.0
        for t0, t1, p, d in self.segments:
            if t1 <= a:
                continue
            if t0 >= b:
                break
            share = spread(1.0, t0, t1, a, b)
            prefill += p * share
            decode += d * share
        if self.first_token_s is None and self.end_s == INF and self.prompt_work:
            # Still before its first token and we could wait no longer: spread the
            # prompt over the time it has waited so far.
            prefill += spread(self.prompt_work, self.start_s, max(now, b), a, b)
        return prefill, decode


def spread(work: float, t0: float, t1: float, a: float, b: float) -> float:
    """Share of ``work`` (uniform over [t0, t1]) that falls in [a, b]."""
    if t1 <= t0:  # all at one instant: it belongs to the piece that ends there or later
        return work if a < t0 <= b else 0.0
    overlap = min(t1, b) - max(t0, a)
    return work * overlap / (t1 - t0) if overlap > 0 else 0.0


def prefill_j(r: Request, prefill_ratio: float) -> float:
    """Its energy before the first token; unknown first token (not streamed): split by
    token work, prompt tokens weighed as the sharing rule weighs them (``prefill_ratio``)."""
    energy = r.dynamic_j + r.idle_j
    if r.first_token_s is not None:
        return min(max(r.prefill_j, 0.0), energy)
    prefill = (r.prompt_work or 0.0) * prefill_ratio
    decode = float(r.completion_tokens or 0)
    if decode <= 0.0:
        return energy  # no output tokens known (an embedding): all of it was prompt work
    return energy * prefill / (prefill + decode)
