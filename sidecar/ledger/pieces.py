"""The assignment of pieces: where each piece of an interval's energy goes.

The ledger cuts the power line into pieces with a constant set of requests in
flight, wholly above or below the baseline; this module splits each piece into
phases and shares it among those requests (CONTRACT.md, Sharing), keeping the
totals by phase, by model and the unattributed bucket.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from sidecar.ledger.prefill_fit import PrefillFit, PrefillRate, StepModel
from sidecar.ledger.prefill_queue import PrefillQueue
from sidecar.ledger.requests import INF, PHASES, Phase, Request, spread
from sidecar.ledger.rows import _grid, _parts, assign_row, observe

MIN_DECODE_PACE = 0.2
"""A step that carries a full prompt chunk is several decode steps long (a 2,048-token
budget at ~45 us a token against ~20 ms decode steps): the slowest output pace."""
Interval = tuple[float, float, float, float, float]
"""(t0, p0, t1, p1, idle_w): a GPU's power line between two readings and its baseline."""
_Part = tuple[int, int, float, float, float]
"""(gpu, interval, idle J, dynamic J, seconds) of one piece: the part of the piece an
interval of one GPU covers."""
LOCKSTEP_S = 0.001
"""Token arrivals closer than this (chained) came out of one engine step."""
PROBE_EVERY = 4
"""Every this many pieces, the streams in one are checked for lockstep (cheap, bounded)."""
PROBE_STREAMS = 32
PLACE_FACTOR = 2.0
"""A streamed prompt is placed in the last ``PLACE_FACTOR * tokens / rate`` seconds before
its first token: generous, so a prompt that did not queue keeps its whole wait."""


class Books:
    """The running totals the pieces are booked into."""

    def __init__(self) -> None:
        self.phase_j: dict[Phase, float] = dict.fromkeys(PHASES, 0.0)
        self.prefill_fit = PrefillFit()
        self.step_model = StepModel()
        self.prefill_rate = PrefillRate()
        self.prefill_queue = PrefillQueue()
        """Where a span's prompt ran in its window (``paced``: a server's own spans)."""
        self.paced = False
        """Output known only as a total slows where prompts are prefilled (continuous
        batching: one token a step, long steps when they carry a prompt chunk). For a
        server known to batch continuously (traces mode: vLLM's own spans); off for
        recordings of unknown servers, whose tokens may flow at a steady rate."""
        self.model_j: dict[tuple[str, Phase], float] = {}
        self.unattributed_j = 0.0
        self.lockstep = 0.0
        """How often (moving average of probes, 0..1) the streams in a piece got their
        tokens together, one per engine step: a continuous batcher (:meth:`_probe`)."""
        self._pieces = 0
        self._assigned_to: list[float] = []
        """Per GPU, the end of its last interval seen while counted prompts were queued."""

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
        return self.assign_grid([[(t0, p0, t1, p1, idle_w)]], reqs, now_s)[0][0]

    def assign_grid(
        self, per_gpu: list[list[Interval]], reqs: list[Request], now_s: float
    ) -> list[list[float]]:
        """Split every GPU's intervals (each GPU's in time order) among ``reqs`` (those
        overlapping any) on one time grid: a piece's weights depend on the requests and
        on [a, b], not on the GPU, so they are worked out once and serve every GPU, and
        each piece is booked once with all GPUs' parts (8 GPUs cost about what one does).
        Returns each interval's energy, in the shape of ``per_gpu``."""
        if not self.paced:
            out = assign_row(self, per_gpu, reqs, now_s)
        else:
            out = self._assign_pieces(per_gpu, reqs, now_s)
        if self.prefill_queue.counted:  # proxied prompts counted at their first token
            self.prefill_queue.release(self._released_s(per_gpu, reqs))
        return out

    def _released_s(self, per_gpu: list[list[Interval]], reqs: list[Request]) -> float:
        """Before when a counted prompt is done with, once this grid is assigned: where
        every GPU has assigned to (a GPU not in this grid may still bring pieces of that
        time; one never seen holds it all), and no later than the start of any request in
        flight (every live one overlaps the grid or starts after it)."""
        upto = self._assigned_to
        upto.extend([-INF] * (len(per_gpu) - len(upto)))
        for g, ivs in enumerate(per_gpu):
            if ivs and ivs[-1][2] > upto[g]:
                upto[g] = ivs[-1][2]
        horizon = min(upto)
        for r in reqs:
            if r.end_s == INF and r.start_s < horizon:
                horizon = r.start_s
        return horizon

    def _assign_pieces(
        self, per_gpu: list[list[Interval]], reqs: list[Request], now_s: float
    ) -> list[list[float]]:
        """:meth:`assign_grid` one piece at a time: the plain statement of the rule, kept
        for a server known to batch (its decode pace and lockstep read the whole piece)
        and as the reference :func:`assign_row` is tested against."""
        starts, ends = _grid(per_gpu, reqs)
        insides = [
            [r for r in reqs if r.start_s <= a and r.end_s >= b]
            for a, b in zip(starts, ends, strict=True)
        ]
        energies = [[0.0] * len(ivs) for ivs in per_gpu]
        cut, gpu_dyns, covers, _ = _parts(
            self, per_gpu, starts, ends, [len(i) for i in insides], energies
        )
        # per piece: (b, inside, weights, each covering GPU's (gpu, interval, idle, dyn))
        pieces: list[tuple[float, list[Request], list[float] | None, list[_Part]]] = []
        predicted: dict[tuple[int, int], list[tuple[float, float | None]]] = {}
        for a, b, inside, parts, dyns, cover in zip(
            starts, ends, insides, cut, gpu_dyns, covers, strict=True
        ):
            if not parts:
                continue
            weights, pred = self._weights_many(inside, a, b, dyns, now_s, cover)
            for g, k, _, dyn, secs in parts:  # an interval's part of the prediction
                part_pred = None if pred is None else pred * (secs / (b - a))
                predicted.setdefault((g, k), []).append((dyn, part_pred))
            pieces.append((b, inside, weights, parts))
        # each interval's dynamic energy is reshaped within itself (its total kept)
        reshaped = {
            key: iter(self._reshape([d for d, _ in dp], [w for _, w in dp]))
            for key, dp in predicted.items()
        }
        for b, inside, weights, parts in pieces:
            idle = sum(p[2] for p in parts)
            dyn = sum(next(reshaped[(p[0], p[1])]) for p in parts)
            self._book(inside, b, idle, dyn, weights)
        return energies

    @staticmethod
    def _reshape(dyns: list[float], predicted: list[float | None]) -> list[float]:
        """Within one interval between two readings the power line is a straight guess;
        where the step model is in force, its predicted energy of each piece's work
        says better where the interval's dynamic energy went (a prompt chunk draws
        more than the decode beside it). The interval's total is kept exactly."""
        idx = [k for k, w in enumerate(predicted) if w is not None and dyns[k] > 0.0]
        if len(idx) < 2:
            return dyns
        pred = [predicted[k] or 0.0 for k in idx]
        total_pred = sum(pred)
        if total_pred <= 0.0:
            return dyns
        total = sum(dyns[k] for k in idx)
        out = list(dyns)
        for k, w in zip(idx, pred, strict=True):
            out[k] = total * w / total_pred
        return out

    def _share(
        self, inside: list[Request], a: float, b: float, idle: float, dyn: float, now: float
    ) -> None:
        """Share one piece: ``idle`` equally, ``dyn`` by the rule's weights."""
        weights, _ = self._weights(inside, a, b, dyn, now)
        self._book(inside, b, idle, dyn, weights)

    def _weights(
        self, inside: list[Request], a: float, b: float, dyn: float, now: float
    ) -> tuple[list[float] | None, float | None]:
        """Each request's weight in a piece with ``dyn`` joules above the baseline."""
        return self._weights_many(inside, a, b, [dyn], now)

    def _weights_many(
        self,
        inside: list[Request],
        a: float,
        b: float,
        dyns: list[float],
        now: float,
        covers: list[float] | None = None,
    ) -> tuple[list[float] | None, float | None]:
        """Each request's weight in a piece with ``dyns`` joules above the baseline on
        each GPU (the fits learn from every one, over the ``covers`` seconds of the piece
        its readings cover: :func:`~sidecar.ledger.rows.observe`), and the step model's
        predicted energy of the piece's work (``None`` where the model is not in
        force)."""
        if self.paced:  # before any piece needs it: a prompt's window reaches back
            self.prefill_queue.note(inside)
        if not any(dyn > 0.0 for dyn in dyns):
            return None, None
        n = len(inside)
        informed = [r.informed_at(a) for r in inside]
        parts = [
            self._work(r, a, b, now) if k else (0.0, 0.0, 0.0)
            for r, k in zip(inside, informed, strict=True)
        ]
        pace = 1.0
        if self.paced:
            pace = self._decode_pace(sum(p for p, _, _ in parts), b - a)
            parts = _lockstep(parts)
        works = [(p, d + s * pace) for p, d, s in parts]
        prefill, decode = sum(p for p, _ in works), sum(d for _, d in works)
        contexts = [_context(r) for r in inside]
        x = StepModel.features(works, contexts)
        observe(self.prefill_fit, self.step_model, prefill, decode, x, dyns,
                covers or [b - a] * len(dyns), b - a)  # fmt: skip
        self._pieces += 1
        if self._pieces % PROBE_EVERY == 0:
            self._probe(inside, a, b)
        batched = self.paced or self.lockstep > 0.5
        modelled = self.step_model.weights(x, works, contexts, batched=batched)
        raw = modelled or [p * self.prefill_fit.ratio + d for p, d in works]
        n_inf = sum(informed)
        mean = (sum(raw) / n_inf) if n_inf else 1.0
        weights = [w if k else mean for w, k in zip(raw, informed, strict=True)]
        predicted = sum(weights) if modelled is not None and n_inf else None
        if sum(weights) <= 0.0:
            return [1.0] * n, None
        return weights, predicted

    def _book(
        self, inside: list[Request], b: float, idle: float, dyn: float, weights: list[float] | None
    ) -> None:
        self.phase_j["idle_serving"] += idle
        self.phase_j["dynamic"] += dyn
        each_idle = idle / len(inside)
        if dyn > 0.0 and weights is None:
            weights = [1.0] * len(inside)
        total_w = sum(weights) if weights else 1.0
        by_model: dict[str, list[float]] = {}  # [idle, dynamic]: one update per model
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
                acc = by_model.get(r.model)
                if acc is None:
                    acc = by_model[r.model] = [0.0, 0.0]
                acc[0] += each_idle
                acc[1] += d
        for model, (idle_j, dyn_j) in by_model.items():
            self._add_model(model, idle_j, dyn_j)

    def _probe(self, inside: Iterable[Request], a: float, b: float) -> None:
        """Whether the server batches continuously, from the streams in one piece: such a
        server ends every running request's token in the same step, so the distinct
        arrival times (chained within ``LOCKSTEP_S``) are about as many as one stream's
        tokens; a server that runs each request on its own clock has about as many as
        all streams' tokens together. Three streams at least; a moving average decides."""
        times: list[float] = []
        most = streams = 0
        for r in inside:
            if r.streamed == 0 or r.first_token_s is None:
                continue
            mine = 0
            for _, t1, p, d in r.segments:
                if t1 > b:
                    break
                if t1 > a and d > 0.0 and p == 0.0:
                    times.append(t1)
                    mine += 1
            if mine:
                streams += 1
                most = max(most, mine)
                if streams == PROBE_STREAMS:
                    break
        self._vote(times, most, streams, b - a)

    def _vote(self, times: list[float], most: int, streams: int, seconds: float) -> None:
        """The probe's verdict from ``streams`` streams' token ``times`` (``most``: the
        most one stream got) in a piece of ``seconds``. A piece too short to hold three
        times the distinct arrivals a lockstep server would leave is no evidence: its
        arrivals chain within ``LOCKSTEP_S`` whoever sends them (a 3 ms piece, cut where
        the next GPU's reading ends, voted lockstep on streams with their own clocks)."""
        if streams < 3 or most < 2 or seconds < 3.0 * 1.5 * most * LOCKSTEP_S:
            return
        times.sort()
        distinct = 1 + sum(1 for x, y in itertools.pairwise(times) if y - x > LOCKSTEP_S)
        together = 1.0 if distinct <= 1.5 * most else 0.0
        self.lockstep += 0.1 * (together - self.lockstep)

    def _decode_pace(self, prompt_tokens: float, seconds: float) -> float:
        """How fast output known only as a total (a trace) comes in a piece that also
        prefills ``prompt_tokens``, relative to its average: every running request
        gets one token a step, and a step carrying a prompt chunk is long, so a
        prompt busy for share ``x`` of the piece at the server's rate leaves ``1 - x``
        of its pace (never under ``MIN_DECODE_PACE``: a long step still yields a token)."""
        rate = self.prefill_rate.tokens_per_s
        if rate is None or seconds <= 0.0 or prompt_tokens <= 0.0:
            return 1.0
        return max(MIN_DECODE_PACE, 1.0 - prompt_tokens / (rate * seconds))

    def _work(self, r: Request, a: float, b: float, now: float) -> tuple[float, float, float]:
        """Prefill and decode tokens worked in [a, b]: :meth:`Request.work`, with a streamed
        prompt placed in the last ``tokens / rate`` seconds before its first token
        (:class:`PrefillRate`), not over its whole wait. A server's own span (``paced``,
        totals only) starts when the engine scheduled the request, which is when its
        first prompt chunk ran (vLLM's ``time_in_queue`` ends there; chunked prefill
        continues it in the next steps), so its prompt keeps its whole window (the
        serving bench's code trace measured 10.2 -> 9.4 % median with it), and within it
        its work goes where the prompts ahead of it left the server room
        (:class:`PrefillQueue`: code 8.6 -> 4.5 %, chat 3.55 -> 3.15 % on 300 s). The third
        figure is the part of the decode spread evenly from a total (not in the second)."""
        rate = self.prefill_rate.tokens_per_s
        first = r.first_token_s
        totals_only = r.streamed == 0 and first is not None
        scheduled = self.paced  # a server's own span starts where it scheduled the request
        prefill = decode = spread_total = 0.0
        for t0, t1, p, d in r.segments:
            if t1 <= a:
                continue
            if t0 >= b:
                break
            if p > 0.0 and t1 == first:  # a streamed prompt (and its first token)
                p = r.exact_prompt(p)
                if a < t1 <= b and not r.rate_seen:  # where the prompt ends
                    r.rate_seen = True
                    self.prefill_rate.observe(p, t1 - t0)
                span = scheduled and totals_only
                if rate is not None and (r.counted or span):  # first come, first served
                    if r.counted and not r.queued:  # exact from the first chunk
                        self.prefill_queue.add(r, t1, p)
                    part = self.prefill_queue.share(r, a, b, rate)
                    if part is not None:
                        prefill += p * part
                        continue
                if rate is not None and not span:
                    t0 = max(t0, t1 - PLACE_FACTOR * p / rate)
            if t1 <= t0:  # all at one instant (spread()'s rule, inlined: this is the hot loop)
                share = 1.0 if a < t0 <= b else 0.0
            else:
                overlap = (t1 if t1 < b else b) - (t0 if t0 > a else a)
                share = overlap / (t1 - t0) if overlap > 0.0 else 0.0
            prefill += p * share
            if totals_only and p == 0.0:
                spread_total += d * share
            else:
                decode += d * share
        if r.first_token_s is None and r.end_s == INF and r.prompt_work:
            prefill += spread(r.prompt_work, r.start_s, max(now, b), a, b)
        return prefill, decode, spread_total

    def _add_model(self, model: str, idle: float, dyn: float) -> None:
        key_i: tuple[str, Phase] = (model, "idle_serving")
        key_d: tuple[str, Phase] = (model, "dynamic")
        self.model_j[key_i] = self.model_j.get(key_i, 0.0) + idle
        self.model_j[key_d] = self.model_j.get(key_d, 0.0) + dyn

    def book(self, r: Request) -> None:
        """A provisional label became final: its shares so far go to its model."""
        r.booked = True
        self._add_model(r.model, r.idle_j, r.dynamic_j)


def _lockstep(parts: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """A continuous batcher gives every running request one token a step, so in one
    piece each request whose output is known only as a total (a span) did the same
    number of decode tokens, whatever its average rate over its whole life (a request
    that lived through busy minutes averaged fewer tokens a second than one that lived
    through quiet ones, though in the steps they shared they kept pace). Their mean
    spread estimates that count for all of them. Serving bench, traces view: chat
    3.99 -> 3.74 % median, 12.2 -> 11.2 % p90; code 33.1 -> 30.0 % p90."""
    spreads = [s for _, _, s in parts if s > 0.0]
    if len(spreads) < 2:
        return parts
    steps = sum(spreads) / len(spreads)
    return [(p, d, steps if s > 0.0 else 0.0) for p, d, s in parts]


def _context(r: Request) -> float:
    """Tokens in its KV cache while it decodes: its prompt and about half its output
    (the streamed count where the proxy sees it; a trace knows only the total)."""
    prompt = r.prompt_tokens if r.prompt_tokens is not None else (r.prompt_work or 0.0)
    return prompt + (r.streamed if r.streamed else (r.completion_tokens or 0) / 2.0)
