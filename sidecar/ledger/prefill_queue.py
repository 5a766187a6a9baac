"""Where a span's prompt ran inside its window: the server's first-come chunked prefill.

A server's span gives a prompt's window only: scheduled (its first chunk ran then)
to first token (its last chunk). vLLM's scheduler with chunked prefill (a token
budget a step) serves the prompts it has scheduled first come, first served: a
prompt scheduled while an earlier one is still in prefill gets only the budget
that one leaves, and all of it once that one is done. Spread evenly over its window,
a long prompt waiting behind another takes energy while the other does the work.

The reconstruction is the fluid form of that scheduler. The server prefills
``capacity`` tokens a second; prompts in order of scheduling (then of first token)
each take, from their scheduling on, the capacity the prompts ahead of them leave,
until their tokens are done; what does not fit before the first token (capacity too
low for this window) is spread over the window by capacity. Prompts with the same
window are one group, served together and split by their tokens, so identical
requests share equally. The capacity is the server's own: it starts at the ledger's
prefill rate (:class:`~sidecar.ledger.prefill_fit.PrefillRate`) and then follows the
spans, the same reconstruction checking itself: a prompt that does not fit in its
window says the capacity is higher, one that fits that it may be lower, and the
capacity settles where a fixed share (``MISS``) does not fit. Groups are worked out in the order of their windows
(all registered ones before a later one), so the order events came in changes nothing.

Serving bench, 300 s (``python -m bench.serving_accuracy 300``), median / p90
per-request error against the prompt spread evenly over its window: traces view chat
3.55 / 11.0 -> 3.15 / 10.0, code 8.6 / 28.3 -> 4.5 / 23.7; traces_live (held slots)
chat 3.75 / 10.8 -> 3.2 / 9.2, code 8.6 / 29.0 -> 4.5 / 23.6; code's prefill stage
8.8 -> 3.7 %. A fixed capacity 5 % above the engine's was worse than even spreading
on code (the placement is sharp), hence a capacity that follows the spans. The
simulator's own per-step chunks (an oracle) give chat 3.0 / 9.7, code 3.5 / 23.5.
At 50 Hz chat's traces view moves 1.66 / 8.6 -> 1.86 / 9.2 (readings that fine see
the chunks themselves).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from sidecar.ledger.requests import INF, Request

Segment = tuple[float, float, float]
"""(t0, t1, tokens): a group's prompt work spread evenly over [t0, t1]."""


@dataclass(slots=True)
class _Group:
    start_s: float
    first_s: float
    tokens: float = 0.0
    profile: list[Segment] | None = None
    counted: bool = True
    """Every member came live with its first token (:meth:`PrefillQueue.release`)."""


class PrefillQueue:
    """Prompts known by their window only (spans), and where each one's work ran."""

    STEP: Final = 0.01
    """How far one prompt moves the capacity (at most 1 %: it settles within a few hundred
    requests, from any start)."""
    MISS: Final = 0.2
    """The share of prompts the capacity leaves not fitting their window (spread there):
    it rises ``STEP * (1 - MISS)`` on each such prompt and falls ``STEP * MISS`` on each
    one that fits. Serving bench, traces view, 300 s, median / p90: 0.5 gave chat 3.4 /
    10.5, code 7.2 / 24.6; 0.3 3.2 / 10.2, 5.2 / 23.7; 0.2 3.2 / 10.0, 4.5 / 23.7; 0.1
    3.1 / 9.8, 4.4 / 25.5 (the capacity then ends 2 % above the prefill rate)."""
    KEEP_S: Final = 900.0
    """Groups whose first token is this much older than the newest scheduling are
    dropped (traces mode's hold): a later prompt's window cannot reach back that far."""
    PRUNE_EVERY: Final = 256

    def __init__(self) -> None:
        self._keys: list[tuple[float, float]] = []
        self._groups: dict[tuple[float, float], _Group] = {}
        self._pending: list[tuple[float, float]] = []
        self._longest_s = 0.0
        self._latest_s = -INF
        self._adds = 0
        self.counted = 0
        """Groups of counted members only, that :meth:`release` may drop."""
        self.capacity_tps: float | None = None
        """Prefill tokens a second the server gets through (``None`` until first used)."""

    def __len__(self) -> int:
        return len(self._groups)

    def note(self, reqs: Iterable[Request]) -> None:
        """Register the prompts known by their window only among ``reqs`` (a piece's)."""
        for r in reqs:
            if r.queued or r.streamed or r.first_token_s is None or not r.prompt_work:
                continue
            self.add(r, r.first_token_s, r.prompt_work)

    def add(self, r: Request, first_s: float, tokens: float) -> None:
        """Register ``r``'s prompt of ``tokens`` with its window up to ``first_s``."""
        r.queued = True
        key = (r.start_s, first_s)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(r.start_s, first_s, counted=r.counted)
            bisect.insort(self._keys, key)
            bisect.insort(self._pending, key)
            self._longest_s = max(self._longest_s, first_s - r.start_s)
            self._latest_s = max(self._latest_s, r.start_s)
            self.counted += r.counted
        else:
            if group.counted and not r.counted:  # a span joined: it keeps to KEEP_S
                group.counted = False
                self.counted -= 1
            if group.profile is not None:  # a member reported after the group was placed
                group.profile = None
                bisect.insort(self._pending, key)
        group.tokens += tokens
        self._adds += 1
        if self._adds % self.PRUNE_EVERY == 0:
            self._prune()

    def share(self, r: Request, a: float, b: float, rate_tps: float) -> float | None:
        """The part of ``r``'s prompt worked in [a, b]; ``None`` if ``r`` is not queued."""
        group = self._group_of(r)
        if group is None or group.tokens <= 0.0:
            return None
        if group.profile is None:
            if self.capacity_tps is None:
                self.capacity_tps = rate_tps
            self._work_out(group)
        assert group.profile is not None
        got = 0.0
        for t0, t1, tokens in group.profile:
            if t1 <= a and t1 > t0:
                continue
            if t0 >= b:
                break
            if t1 <= t0:  # all at one instant: the piece that ends there or later
                got += tokens if a < t0 <= b else 0.0
                continue
            overlap = min(t1, b) - max(t0, a)
            if overlap > 0.0:
                got += tokens * overlap / (t1 - t0)
        return got / group.tokens

    def placed(self, r: Request) -> tuple[list[Segment], float] | None:
        """``r``'s group's placement and where its work begins (:meth:`share` is 0 in
        [a, b] wherever b is at or before it); ``None`` if not placed. A member joining
        later places the group anew: :meth:`holds` says whether this one still stands."""
        group = self._group_of(r)
        if group is None or group.profile is None or group.tokens <= 0.0:
            return None
        return group.profile, min((t0 for t0, _, _ in group.profile), default=INF)

    def holds(self, r: Request, profile: list[Segment]) -> bool:
        group = self._group_of(r)
        return group is not None and group.profile is profile

    def _group_of(self, r: Request) -> _Group | None:
        """The group ``r`` was queued in (by its window), if it was."""
        return self._groups.get((r.start_s, r.first_token_s or INF)) if r.queued else None

    def _work_out(self, group: _Group) -> None:
        """Place every pending group up to this one, in window order (see the module)."""
        key = (group.start_s, group.first_s)
        upto = bisect.bisect_right(self._pending, key)
        todo, self._pending[:upto] = self._pending[:upto], []
        if key not in todo:
            todo.append(key)
        for k in todo:
            g = self._groups.get(k)
            if g is not None:
                g.profile = self._place(g)

    def _ahead(self, g: _Group) -> list[_Group]:
        """Groups scheduled before ``g`` (or with it, done first) still in prefill when it
        was scheduled, whose profile is known."""
        key = (g.start_s, g.first_s)
        lo = bisect.bisect_left(self._keys, (g.start_s - self._longest_s, -INF))
        hi = bisect.bisect_left(self._keys, key)
        out = []
        for k in self._keys[lo:hi]:
            h = self._groups[k]
            if h.first_s > g.start_s and h.profile is not None:
                out.append(h)
        return out

    def _place(self, g: _Group) -> list[Segment]:
        """``g``'s work, cell by cell, in the room the groups ahead left (O(cells + their
        segments in the window): a pass over every cell per segment ahead made 150
        overlapping prompts take a minute)."""
        s, f, tokens = g.start_s, g.first_s, g.tokens
        capacity = self.capacity_tps
        if f <= s or capacity is None or capacity <= 0.0:
            return [(s, f, tokens)]
        ahead = [
            seg for h in self._ahead(g) for seg in h.profile or () if seg[1] > s and seg[0] < f
        ]
        cuts = {s, f}
        for t0, t1, _ in ahead:
            cuts.update(t for t in (t0, t1) if s < t < f)
        # and where the prompts after it came and went: the engine's steps, as far as
        # spans show them (the capacity's check reads the last stretch before ``f``)
        lo = bisect.bisect_right(self._keys, (s, f))
        hi = bisect.bisect_left(self._keys, (f, -INF))
        for t0, t1 in self._keys[lo:hi]:
            cuts.update(t for t in (t0, t1) if s < t < f)
        times = sorted(cuts)
        index = {t: i for i, t in enumerate(times)}
        # every segment's ends are cuts, so the work ahead has one density in each cell
        step = [0.0] * len(times)
        for t0, t1, n in ahead:
            if t1 > t0:
                density = n / (t1 - t0)
                step[index[max(t0, s)]] += density
                step[index[min(t1, f)]] -= density
        out: list[Segment] = []
        left, density, last = tokens, 0.0, -INF
        for c, (a, b) in enumerate(itertools.pairwise(times)):
            density += step[c]
            room = (capacity - density) * (b - a)
            if room <= 0.0:
                continue
            if left < room:  # done inside this stretch, at the pace the room allows
                out.append((a, a + (b - a) * left / room, left))
                left = 0.0
                break
            if out and out[-1][1] == a and density == last:  # the same pace: one segment
                out[-1] = (out[-1][0], b, out[-1][2] + room)
            else:
                out.append((a, b, room))
            last = density
            left -= room
        if left > 1e-9 * tokens:  # it did not fit: the server is faster than thought
            self.capacity_tps = capacity * (1.0 + self.STEP * (1.0 - self.MISS))
            out.append((s, f, left))  # the rest spread over the window (segments may overlap)
            out.sort()
        else:  # it fit (with room to spare): perhaps slower
            self.capacity_tps = capacity * (1.0 - self.STEP * self.MISS)
        return out or [(s, f, tokens)]

    def release(self, horizon_s: float) -> None:
        """Drop the counted groups whose first token is before ``horizon_s``: up to where
        the ledger has assigned every piece and before the start of every request still
        in flight. Counted prompts come live, with their first token (the proxy), never
        late like spans: no piece will ask for such a group's share again and no prompt
        still to come can have it ahead (those start later), so it need not wait out
        ``KEEP_S`` (900 s of every proxied request held: 7.8 MB per 100k requests)."""
        if not self.counted:
            return
        hi = bisect.bisect_left(self._keys, (horizon_s, -INF))  # only these start before it
        drop = [k for k in self._keys[:hi] if k[1] < horizon_s and self._groups[k].counted]
        if drop:
            self._drop(drop)

    def _prune(self) -> None:
        horizon = self._latest_s - self.KEEP_S
        drop = [k for k, g in self._groups.items() if g.first_s < horizon]
        if drop:
            self._drop(drop)

    def _drop(self, drop: list[tuple[float, float]]) -> None:
        for k in drop:
            self.counted -= self._groups.pop(k).counted
        gone = set(drop)
        self._keys = [k for k in self._keys if k not in gone]
        self._pending = [k for k in self._pending if k not in gone]
