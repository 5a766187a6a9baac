"""The attribution ledger: pure, incremental, exact.

Power samples and request events go in; energy by phase, per request and per
model comes out. No I/O and no clock of its own: every call carries the time,
on the one monotonic clock that the sampler and the proxy share, so the live
path and the offline ``attribute`` command run the very same code.

How it works (CONTRACT.md fixes the semantics, DESIGN.md gives the reasons):

* Power is linear between two samples of a GPU. Each new sample closes an
  interval, which is cut at every request start, first token and end inside
  it and where the line crosses the GPU's idle baseline, so each piece has a
  constant set of requests in flight and lies wholly above or below the
  baseline: the phases are integrated exactly.
* ``idle_serving`` is shared equally among the requests in flight;
  ``dynamic`` by the work each request does in the piece (see
  :mod:`sidecar.ledger.requests`). The rate up to a time is only known once
  the next chunk (or the end) arrives, so an interval waits, at most
  ``max_wait_s``, until every request in it is known through the interval's end.
* A request's energy is final once every GPU has assigned past its end; it
  is then handed out by :meth:`Ledger.pop_finished` and forgotten, so memory
  follows the requests in flight, not history.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Final

from sidecar.ledger.baseline import BASELINE_WINDOW_S, BASES, SETTLE_S, BaselineEstimator, Basis
from sidecar.ledger.frontier import Frontier
from sidecar.ledger.gpu_state import GpuState as _Gpu
from sidecar.ledger.held import SLOT_S, HeldRequest, HeldSlots
from sidecar.ledger.pieces import Books
from sidecar.ledger.requests import (
    INF,
    FinishedRequest,
    Request,
    Status,
    cached_part,
    computed_prompt,
    prefill_j,
)

MAX_WAIT_S: Final = 5.0
SILENT_AFTER_S: Final = 30.0
"""A GPU without samples for this long stops holding finished requests back (longer
than the reconciler holds samples of a slow counter, so a dcgm GPU is not "silent")."""
GAP_PERIODS: Final = 3.0
"""A silence longer than this many sample periods is a gap (CONTRACT.md)."""
ROW_S: Final = 0.1
"""Sampled time a live ledger gathers before it assigns (:meth:`Ledger.gather`): at 10 Hz
one reading, at 100 Hz ten; the rest of a hand-over goes when it pauses (:meth:`Ledger.look`)."""


class Ledger:
    """Splits measured GPU energy into phases and shares it among requests.

    ``idle_watts`` fixes each GPU's baseline (``--idle-watts``); otherwise it is
    estimated with :class:`BaselineEstimator` over ``baseline_window_s``
    (``None``: the whole history, as ``attribute`` does after a first pass).
    ``hold_s`` keeps every interval back that long before assigning it, for
    sources of events that report late (observer mode's scrapes).
    ``sample_period_s`` is the sampler's period (``None``: no gaps, every
    interval is drawn): two samples further apart than three periods bound a gap, through which the power line is not drawn (the
    energy counter's increase is spread evenly over it where both ends carry a
    counter reading; without one nothing is invented).
    ``late_hold_s`` (traces mode): requests are reported whole, after they ended
    (:meth:`place`); the energy waits for them that long in compact slots
    (:mod:`sidecar.ledger.held`); ``counted`` says a source reports a running
    count (:meth:`running`), so intervals settle once all it counted reported, and
    ``live_phases`` that it is the server's own, so the phases follow it live.
    ``paced_decode``: output known only as a total slows where prompts are prefilled
    (a server known to batch continuously: traces mode), see :class:`Books`.
    """

    def __init__(
        self,
        gpus: Iterable[str],
        *,
        idle_watts: Mapping[str, float] | None = None,
        baseline_window_s: float | None = BASELINE_WINDOW_S,
        settle_s: float = SETTLE_S,
        max_wait_s: float = MAX_WAIT_S,
        silent_after_s: float = SILENT_AFTER_S,
        hold_s: float = 0.0,
        sample_period_s: float | None = None,
        late_hold_s: float | None = None,
        counted: bool = False,
        live_phases: bool = False,
        slot_s: float = SLOT_S,
        paced_decode: bool = False,
        grace_s: float | None = None,
        prompts_at_end: bool = False,
    ) -> None:
        if sample_period_s is not None and not sample_period_s > 0:
            raise ValueError(f"sample_period_s must be positive, got {sample_period_s}")
        idle = dict(idle_watts or {})
        self._gpus: dict[str, _Gpu] = {
            g: _Gpu(BaselineEstimator(window_s=baseline_window_s), idle.get(g)) for g in gpus
        }
        if not self._gpus:
            raise ValueError("the ledger needs at least one GPU")
        self._settle_s = settle_s
        self._max_wait_s = max_wait_s
        self._silent_after_s = max(silent_after_s, 2.0 * max_wait_s, 2.0 * hold_s)
        self._hold_s = hold_s
        self._prompts_at_end = prompts_at_end
        self._period_s = sample_period_s
        self._gap_after_s = INF if sample_period_s is None else GAP_PERIODS * sample_period_s
        self._first_s = INF
        self._first_request_s = INF
        self._ready_s: float | None = None
        self._live: dict[str, Request] = {}
        self._frontier, self._assigned_s = Frontier(self._live), -INF  # known, assigned up to
        self._starts: list[tuple[float, str]] = []  # live requests by start, for standby
        # ended requests awaiting finalisation, by end time: finalising pops, never scans
        self._ended: list[tuple[float, int, Request]] = []
        self._ended_seq = 0
        self._recent: dict[str, Request] = {}  # finalized, for late intervals of a lagging GPU
        self._finished: list[FinishedRequest] = []
        self._now_s = -INF
        self._last_end_s = -INF
        self._books = Books()
        self.phase_j = self._books.phase_j
        self.model_j = self._books.model_j
        self.prefill_fit = self._books.prefill_fit
        self._books.paced = paced_decode
        self.intervals_per_call: int | None = None
        """At most this many intervals of a GPU assigned per call (``None``: all that may
        go); the rest waits for :meth:`work`, so one call's work stays short (the loop's)."""
        self.backlog = False
        """Intervals free to go were left for :meth:`work` by :attr:`intervals_per_call`."""
        self.row_s = 0.0
        """Sampled time :meth:`samples` gathers before it assigns (see :meth:`gather`)."""
        self._look_s = -INF  # the sampled time the next gathered row waits for
        self.held: HeldSlots | None = None
        if late_hold_s is not None:
            self.held = HeldSlots(
                self._books, slot_s=slot_s, hold_s=late_hold_s, counted=counted,
                live_phases=live_phases,
            )  # fmt: skip
            if grace_s is not None:
                self.held.grace_s = grace_s

    # ----------------------------------------------------------------- requests
    @property
    def hold_s(self) -> float:
        """How long every interval waits before it is assigned (observer mode, --proxy-hold)."""
        return self._hold_s

    def start(
        self,
        request_id: str,
        time_s: float,
        *,
        model: str,
        endpoint: str = "chat",
        prompt_tokens: float | None = None,
        provisional: bool = False,
        attributable: bool = True,
        activity: bool = False,
    ) -> None:
        """An inference request arrived. ``prompt_tokens`` may be an estimate.

        ``provisional``: ``model`` is not confirmed yet; the request's shares reach
        :attr:`model_j` only once :meth:`relabel` settles the label (or at its end).
        ``attributable=False``: activity in flight that is no request of its own
        (its shares go to :attr:`unattributed_j`, and it is never handed out).
        ``activity=True``: a model's stretch of activity, not a request (observer mode):
        its shares count per model, and it is handed out marked so.
        """
        if request_id in self._live:
            raise ValueError(f"request {request_id!r} started twice")
        t = self._clamp(time_s)
        req = Request(request_id, model, endpoint, t, prompt_tokens, known_s=t)
        req.booked = not provisional
        req.attributable = attributable
        req.activity = activity
        self._live[request_id] = req
        self._frontier.started(req)
        bisect.insort(self._starts, (t, request_id))
        self._first_request_s = min(self._first_request_s, t)

    def relabel(self, request_id: str, model: str, *, final: bool = True) -> None:
        """The model label changed after the start (the response named it, or the
        label became final): a provisional request's shares so far are booked under it."""
        req = self._live.get(request_id)
        if req is None:
            return
        req.model = model
        if final and not req.booked:
            self._books.book(req)

    def upstream_ready(self, time_s: float) -> None:
        """The model server answered (its model is loaded): the first call counts.

        Power seen before it is a lower state, not the resident cost, so the
        start-up baseline looks only at what came after.
        """
        if self._ready_s is not None:
            return
        self._ready_s = time_s
        if self._first_request_s < INF:
            return  # requests already came: the start-up window is closed
        for state in self._gpus.values():
            state.baseline.upstream_ready(time_s)

    def first_token(
        self, request_id: str, time_s: float, *, prompt_tokens: int | None = None
    ) -> None:
        """The first response bytes of a streamed request: prefill is over.

        ``prompt_tokens``: the exact prompt count, where the first chunk carried it (a
        server sending usage in every chunk); its prompt is then placed where the prompts
        ahead of it left the server room (:class:`~sidecar.ledger.prefill_queue.PrefillQueue`).
        Token events only record; the next sample or :meth:`advance` assigns what
        they unblocked, so a busy stream costs O(1) per chunk, not O(in flight).
        """
        req = self._live.get(request_id)
        if req is None or req.first_token_s is not None or req.end_s != INF:
            return
        t = max(self._clamp(time_s), req.start_s)
        req.first_token_s = t
        req.last_chunk_s = t
        if prompt_tokens is not None and prompt_tokens >= 0:
            req.prompt_work = float(prompt_tokens)
            req.prompt_tokens = prompt_tokens
            req.counted = True
        if req.prompt_work:
            req.segments.append((req.start_s, t, req.prompt_work, 0.0))
        req.known_s = t

    def tokens(self, request_id: str, time_s: float, count: int = 1) -> None:
        """A streamed chunk carrying ``count`` tokens arrived at ``time_s``."""
        req = self._live.get(request_id)
        if req is None or req.end_s != INF or count <= 0:
            return
        t = time_s if time_s > self._assigned_s else self._assigned_s  # _clamp, inlined (hot)
        if t < req.start_s:
            t = req.start_s
        if req.first_token_s is None:
            self.first_token(request_id, t)
        prev = req.last_chunk_s if req.last_chunk_s is not None else t
        if t > prev:
            req.segments.append((prev, t, 0.0, float(count)))
        elif req.segments and req.segments[-1][1] >= t:
            t0, t1, p, d = req.segments[-1]
            req.segments[-1] = (t0, t1, p, d + count)
        elif req.segments:  # at the instant of a chunk without tokens (touch): no time left
            req.segments.append((t, t, 0.0, float(count)))
        else:
            req.segments.append((req.start_s, t, 0.0, float(count)))
        req.last_chunk_s = t
        req.streamed += count
        if t > req.known_s:
            req.known_s = t

    def touch(self, request_id: str, time_s: float) -> None:
        """No tokens since the last event, but the request is known to be working up to now."""
        req = self._live.get(request_id)
        if req is None or req.end_s != INF or req.first_token_s is None:
            return
        t = max(self._clamp(time_s), req.start_s)
        req.last_chunk_s = max(req.last_chunk_s or t, t)
        req.known_s = max(req.known_s, t)

    def finish(
        self,
        request_id: str,
        time_s: float,
        *,
        status: Status = "ok",
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        """The last response byte left (or the client left, or the upstream failed).
        ``cached_tokens``: of the prompt, those the server read from its prefix cache
        (the usage's ``cached_tokens``): they weigh no prefill work where the prompt is
        still to be placed (a reply not streamed; the pieces a hold kept)."""
        req = self._live.get(request_id)
        if req is None or req.end_s != INF:
            return
        t = max(self._clamp(time_s), req.start_s)
        req.status = status
        req.prompt_tokens = prompt_tokens
        req.completion_tokens = completion_tokens
        cached = cached_part(prompt_tokens, cached_tokens)
        if cached is not None:
            req.cached_tokens = cached
        if prompt_tokens is not None and req.first_token_s is None:
            req.prompt_work = float(req.computed_prompt)
        elif (
            self._prompts_at_end
            and prompt_tokens is not None
            and not req.counted
            and req.prompt_work
            and req.start_s >= self._assigned_s
        ):
            # Held (proxy mode's --proxy-hold): the usage brought the exact prompt before any
            # of the request was assigned, so its prompt is placed as one counted at its first
            # token (the prefill queue), as where the first chunk carried the count. Without a
            # hold few ends come that early, and mixing them in moved the serving bench the
            # wrong way (code 13.1 -> 13.7 % median); with 30 s: chat 4.5 -> 2.7 %, code 13.1
            # -> 3.0 %. Only where the proxy holds for it (``prompts_at_end``).
            req.counted = True
        if req.first_token_s is None:
            # Not streamed: prompt and completion were all computed before the reply.
            prefill, decode = req.prompt_work or 0.0, float(completion_tokens or 0)
            if prefill > 0 or decode > 0:
                req.segments.append((req.start_s, t, prefill, decode))
        elif req.streamed == 0 and completion_tokens:
            # Known only as a total (a recorded trace): spread between first token and end.
            req.segments.append((req.first_token_s, t, 0.0, float(completion_tokens)))
        req.end_s = t
        req.known_s = INF
        self._ended_seq += 1
        heapq.heappush(self._ended, (t, self._ended_seq, req))
        self._last_end_s = max(self._last_end_s, t)
        if not self.row_s:  # else the next row finalises it
            self._process()

    def add_request(
        self,
        request_id: str,
        *,
        model: str,
        start_s: float,
        end_s: float,
        first_token_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        status: Status = "ok",
        endpoint: str = "chat",
        cached_tokens: int | None = None,
    ) -> None:
        """A complete recorded request (``attribute``): the same path as live events."""
        computed = computed_prompt(prompt_tokens, cached_tokens)
        self.start(request_id, start_s, model=model, endpoint=endpoint, prompt_tokens=computed)
        if first_token_s is not None:
            self.first_token(request_id, min(max(first_token_s, start_s), end_s))
        self.finish(
            request_id,
            end_s,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
        )

    def place(
        self,
        request_id: str,
        *,
        model: str,
        start_s: float,
        first_token_s: float,
        end_s: float,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None = None,
        endpoint: str = "unknown",
        status: Status = "ok",
        heard_s: tuple[float, float] | None = None,
    ) -> bool:
        """Traces mode: a request reported whole after it ended; its share is placed in
        the held slots where it ran. False for a request placed already (the same id and
        start: a retried export), so a client's reused id is another request.
        ``heard_s``: a wider window over which a running count saw it (the proxy's)."""
        if self.held is None:
            raise RuntimeError("place() needs a ledger made with late_hold_s")
        held = HeldRequest.whole(
            request_id, model, start_s=start_s, first_token_s=first_token_s, end_s=end_s,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            cached_tokens=cached_tokens, endpoint=endpoint, status=status, heard_s=heard_s,
        )  # fmt: skip
        if not self.held.place(held):
            return False
        self._first_request_s = min(self._first_request_s, start_s)
        self._last_end_s = max(self._last_end_s, held.req.end_s)
        self._collect_held()
        return True

    def running(self, t0: float, t1: float, count: int, through: int = 0) -> None:
        """Traces mode: the requests that ran over [t0, t1] (all models), ``through``
        of them all of it (:meth:`HeldSlots.running`)."""
        if self.held is not None:
            self.held.running(t0, t1, count, through)
            if count > 0:
                self._first_request_s = min(self._first_request_s, t0)
            self._collect_held()

    # ------------------------------------------------------------------ samples
    def sample(
        self, gpu: str, time_s: float, power_w: float, energy_j: float | None = None
    ) -> None:
        """One power reading of ``gpu`` (``energy_j``: its hardware counter, where it
        has one); closes the interval since its previous reading."""
        if self._record(gpu, time_s, power_w, energy_j):
            self._tick(time_s)

    def _record(self, gpu: str, time_s: float, power_w: float, energy_j: float | None) -> bool:
        """The reading's interval, pending; whether it was new."""
        state = self._gpus[gpu]
        p = max(0.0, power_w)
        t = time_s
        if state.last is not None and t <= state.last[0]:
            return False  # duplicate or out-of-order reading: the interval is already closed
        state.baseline.observe(
            t, p, standby=self._is_standby(t), before_request=t < self._first_request_s
        )
        if state.last is not None:
            t0, p0 = state.last
            if t - t0 > self._gap_after_s:
                state.gap_s += t - t0
                flat_w = 0.0  # no counter: nothing is invented over the gap
                e0 = state.last_counter_j
                if e0 is not None and energy_j is not None and energy_j >= e0:
                    flat_w = (energy_j - e0) / (t - t0)
                state.pending.append((t0, flat_w, t, flat_w, state.idle_w))
            else:
                state.pending.append((t0, p0, t, p, state.idle_w))
        state.last = (t, p)
        state.last_counter_j = energy_j
        return True

    def samples(self, readings: Iterable[tuple[str, float, float, float | None]]) -> None:
        """The sampler's hand-over, ``(gpu, time_s, power_w, energy_j)`` each: every reading
        closes its interval, and the intervals are assigned once :attr:`row_s` of sampled
        time gathered since the last row (at once while it is 0, as :meth:`sample` does)."""
        if not self.row_s:
            for reading in readings:
                self.sample(*reading)
            return
        t = -INF
        for gpu, time_s, power_w, energy_j in readings:
            self._record(gpu, time_s, power_w, energy_j)
            t = max(t, time_s)
        if t == -INF:
            return
        self._clock(t)
        if t >= self._look_s:
            # half a period early, so a reading's jitter does not let a row run one long
            early = 0.5 * min(self.row_s, self._period_s or 0.0)
            self._look_s = t + self.row_s - early
            self._process()

    def gather(self, row_s: float = ROW_S) -> None:
        """Live use: :meth:`samples` assigns rows of ``row_s``, and a call at most about one
        row per GPU (the rest on :meth:`work`); a request's end waits for the next row, and
        the meter calls :meth:`look` once the sampler's hand-over pauses.

        A row costs mostly per request in flight, whatever its width. A live sidecar's
        samples come a reconciliation window late, past every request's known time, so
        each GPU's sample went alone: at 8 GPUs and 100 Hz, 800 rows a second of 256
        requests each, slower than real time (``python -m bench.ledger_bench``)."""
        self.row_s = row_s
        period = self._period_s
        self.intervals_per_call = 1 if period is None else math.ceil(row_s / period) + 1

    def advance(self, now_s: float) -> None:
        """Let time pass without events: intervals that waited too long are assigned."""
        self._tick(now_s)

    def look(self) -> None:
        """Assign what may go now, though less than a row (:attr:`row_s`) gathered: the
        sampler's hand-over paused, so no more samples are on their way to fill it."""
        self._process()

    def work(self) -> None:
        """The next :attr:`intervals_per_call` of the :attr:`backlog`. One GPU's figures equal
        all at once within rounding (a grid cut at an interval's end); GPUs read in turn
        keep each GPU's energy and the phases, requests within 2 % in the tests (a slice's last
        instants of a GPU read later are a sliver piece of their own)."""
        if self.backlog:
            self._process()

    def flush(self) -> None:
        """Assign everything now (end of a trace, or shutdown): no more waiting."""
        self._assign(force=True)
        self._finalize(force=True)
        if self.held is not None:
            self.held.flush()
            self._collect_held()

    def pop_finished(self) -> list[FinishedRequest]:
        """Requests whose energy became final since the last call."""
        out, self._finished = self._finished, []
        return out

    # ------------------------------------------------------------------ queries
    @property
    def gpus(self) -> list[str]:
        return list(self._gpus)

    def gpu_energy_j(self, gpu: str) -> float:
        """Energy measured on ``gpu`` and already assigned to phases."""
        return self._gpus[gpu].energy_j

    def gap_s(self, gpu: str) -> float:
        """Seconds of ``gpu``'s closed gaps: silences longer than three sample periods,
        counted whole once the next reading ends them."""
        return self._gpus[gpu].gap_s

    def idle_basis(self) -> Basis:
        """The rule behind the baseline in force: the weakest over the GPUs."""
        return min((s.basis for s in self._gpus.values()), key=BASES.index)

    def open_j(self) -> float:
        """Energy already shared to requests not handed out yet (for the invariant)."""
        live = sum(r.dynamic_j + r.idle_j for r in self._live.values() if r.attributable)
        return live + self.held_j

    @property
    def held_j(self) -> float:
        """Traces mode: energy still held for requests yet to report (no phase's final
        owner yet: it reaches requests, standby or unattributed when its slot settles)."""
        return 0.0 if self.held is None else self.held.held_j + self.held.open_j

    def idle_baseline_w(self, gpu: str | None = None) -> float:
        """The baseline of one GPU, or the total over GPUs (what outputs call it)."""
        if gpu is not None:
            return self._gpus[gpu].idle_w
        return sum(s.idle_w for s in self._gpus.values())

    def in_flight(self) -> dict[str, int]:
        """Requests in flight by model (arrived, not yet ended)."""
        out: dict[str, int] = {}
        for r in self._live.values():
            if r.end_s == INF:
                out[r.model] = out.get(r.model, 0) + 1
        return out

    @property
    def unattributed_j(self) -> float:
        """Energy of requests in flight that no finished request can carry: activity
        never heard from as a request, and a silent GPU's late share of requests
        already handed out. Part of ``dynamic + idle_serving``, in no request."""
        return self._books.unattributed_j

    @property
    def total_j(self) -> float:
        return sum(self.phase_j.values())

    # ----------------------------------------------------------------- internals
    def _clamp(self, time_s: float) -> float:
        """Events older than what a GPU already assigned are moved up to it."""
        return time_s if time_s > self._assigned_s else self._assigned_s

    def _is_standby(self, t: float) -> bool:
        if self.held is not None and not self.held.standby(t):
            return False
        if t - self._last_end_s < self._settle_s:
            return False
        for start, rid in self._starts:
            if start > t:
                break
            if self._live[rid].end_s > t:
                return False
        return True

    def _tick(self, t: float) -> None:
        self._clock(t)
        self._process()

    def _clock(self, t: float) -> None:
        """Time moves only with samples and ``advance``: event times may lie ahead
        (a recorded request is added whole), and waiting is measured in sampled time."""
        if t > self._now_s:
            self._now_s = t
        if self._first_s == INF:
            self._first_s = t

    def _process(self) -> None:
        self._assign(force=False)
        self._finalize(force=False)
        if self.held is not None:
            self.held.advance(self._now_s, self._done_s())
            self._collect_held()

    def _collect_held(self) -> None:
        """Held requests every slot of which settled become finished requests."""
        assert self.held is not None
        self._finished.extend(h.finished() for h in self.held.pop_finished())

    def _assign(self, *, force: bool) -> None:
        """Every GPU's intervals that may go now, on one grid (:meth:`Books.assign_grid`);
        whether one still waits for its requests' work, :class:`Frontier` says for all."""
        ready: list[list[tuple[float, float, float, float, float]]] = [[] for _ in self._gpus]
        now, hold_s, wait_s, held = self._now_s, self._hold_s, self._max_wait_s, self.held
        known_s = INF if force else self._frontier.earliest_s()
        limit = -1 if force or self.intervals_per_call is None else self.intervals_per_call
        self.backlog = False
        for g, state in enumerate(self._gpus.values()):
            pending, left = state.pending, limit
            while pending:
                t1 = pending[0][2]
                if not force and (now - t1 < hold_s or (known_s < t1 and now - t1 < wait_s)):
                    break  # observer mode: activity is learned up to a scrape late
                if left == 0:  # the rest on the next call (:meth:`work`)
                    self.backlog = True
                    break
                left -= 1
                iv = pending.popleft()
                if held is not None and not self._overlaps_any(iv[0], t1):
                    state.energy_j += held.add_interval(*iv)
                else:
                    ready[g].append(iv)
                state.assigned_s = t1
                if t1 > self._assigned_s:
                    self._assigned_s = t1
        if any(ready):
            lo, hi = min(v[0][0] for v in ready if v), max(v[-1][2] for v in ready if v)
            reqs = self._overlapping(lo, hi)
            energies = self._books.assign_grid(ready, reqs, self._now_s)
            for state, e in zip(self._gpus.values(), energies, strict=True):
                state.energy_j += sum(e)
            self._prune(reqs)

    def _overlaps_any(self, t0: float, t1: float) -> bool:
        reqs = itertools.chain(self._live.values(), self._recent.values())
        return any(r.start_s < t1 and r.end_s > t0 for r in reqs)

    def _overlapping(self, t0: float, t1: float) -> list[Request]:
        out = [r for r in self._live.values() if r.start_s < t1 and r.end_s > t0]
        if self._recent:
            out.extend(r for r in self._recent.values() if r.start_s < t1 and r.end_s > t0)
        return out

    def _finalize(self, *, force: bool) -> None:
        ended = self._ended
        if ended:
            done_s = INF if force else self._done_s()
            every_gpu_s = min(s.assigned_s for s in self._gpus.values())
            while ended and ended[0][0] <= done_s:
                r = heapq.heappop(ended)[2]
                # a silent GPU may come back: keep the request where its late intervals find it
                self._emit(r, lagging=not force and r.end_s > every_gpu_s)
        if self._recent:
            horizon = self._now_s - 60.0
            for rid in [k for k, r in self._recent.items() if r.end_s < horizon or force]:
                del self._recent[rid]

    def _done_s(self) -> float:
        """Time up to which every GPU that still samples has assigned its energy.

        A GPU silent for longer than ``silent_after_s`` (lost, failing) no longer
        holds requests back; its late intervals still count in the totals.
        """
        cutoff = self._now_s - self._silent_after_s
        fresh = [
            s.assigned_s
            for s in self._gpus.values()
            if (s.last[0] if s.last is not None else self._first_s) >= cutoff
        ]
        return min(fresh) if fresh else self._now_s

    def _prune(self, reqs: list[Request]) -> None:
        """Drop work segments every GPU has assigned past: long streams stay cheap."""
        done_s = self._done_s()
        for r in reqs:
            while r.segments and r.segments[0][1] < done_s:
                r.segments.popleft()

    def _emit(self, r: Request, *, lagging: bool) -> None:
        del self._live[r.id]
        i = bisect.bisect_left(self._starts, (r.start_s, r.id))
        if i < len(self._starts) and self._starts[i] == (r.start_s, r.id):
            del self._starts[i]
        if lagging:
            self._recent[r.id] = r
        r.segments.clear()
        r.emitted = True
        if not r.attributable:
            return
        if not r.booked:
            self._books.book(r)
        self._finished.append(
            FinishedRequest(
                id=r.id, model=r.model, endpoint=r.endpoint, status=r.status,
                start_s=r.start_s, end_s=r.end_s, first_token_s=r.first_token_s,
                prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                dynamic_j=r.dynamic_j, idle_j=r.idle_j,
                prefill_j=prefill_j(r, self.prefill_fit.ratio), activity=r.activity,
                cached_tokens=r.cached_tokens,
            )
        )  # fmt: skip
