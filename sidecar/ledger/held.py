"""Held slots: energy kept in compact records until late request reports place it.

In traces mode a request is heard of only when its span arrives, seconds to
minutes after it ended. The power line cannot wait that long in raw form (10 Hz
x 8 GPUs x 15 minutes), so each GPU interval is integrated, exactly, onto a grid
of time slots of ``slot_s`` summed over the GPUs: per slot its energy below the
baseline, its energy above it, the server's running count where a source reports
one, and the requests already placed in it. A slot's size does not depend on the
number of GPUs or the sample rate.

A slot settles (its energy is shared among the requests placed in it, by the
ledger's rule: the resident part equally, the part above the baseline by token
work) once every request the running count says ran in it has been heard from,
or when the hold ends. Requests the count says ran but that never reported take
their equal share of the resident part, and weigh as the mean of those placed:
that energy goes to the unattributed bucket. Within a slot power is taken as
constant, so a request that covers part of a slot takes its share of that part.

A request is final once every slot it ran in has settled; the ledger hands it
out then. Conservation holds at every step: settled energy is in requests,
``idle_standby`` or unattributed; unsettled energy is "held" (:attr:`held_j`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from sidecar.ledger.pieces import Books
from sidecar.ledger.requests import INF, Phase, Status, spread

SLOT_S: Final = 0.25
"""Default slot width: finer than a scrape, about a few sample periods."""
HOLD_S: Final = 900.0
"""Default hold (CONTRACT.md, "Late spans": 15 minutes)."""
SEEN_KEEP: Final = 2.0
"""Request ids are remembered for this many holds, so a retried export counts once."""


@dataclass(slots=True)
class HeldRequest:
    """A request reported whole (a span, or a proxied request that had no span)."""

    id: str
    model: str
    start_s: float
    """When it began to hold energy: traces mode, its scheduling (queued time holds none)."""
    first_token_s: float
    end_s: float
    prompt_work: float
    """Prompt tokens it computed (cached ones left out: they cost almost nothing)."""
    completion_tokens: float
    endpoint: str = "unknown"
    status: Status = "ok"
    dynamic_j: float = 0.0
    idle_j: float = 0.0
    prefill_j: float = 0.0
    open_slots: int = 0
    waiting_slots: bool = False
    """Part of its window lies past the newest slot: samples for it are still due."""
    missed_s: float = 0.0
    """Seconds of its window no held slot covered any more (it came after the hold)."""
    heard_from_s: float = INF
    heard_to_s: float = -INF
    """Where a running count may have counted it: its window, widened to the proxy's
    view of it where joined (the proxy counts it queued, and until its last byte)."""

    def __post_init__(self) -> None:
        self.heard_from_s = min(self.heard_from_s, self.start_s)
        self.heard_to_s = max(self.heard_to_s, self.end_s)

    def work(self, a: float, b: float) -> tuple[float, float]:
        """Prefill and decode tokens worked in [a, b]: the prompt over scheduling..first
        token, the completion over first token..end (what a span tells)."""
        return (
            spread(self.prompt_work, self.start_s, self.first_token_s, a, b),
            spread(self.completion_tokens, self.first_token_s, self.end_s, a, b),
        )


class _Slot:
    """One slot of the grid: about 100 bytes plus 8 per request placed in it."""

    __slots__ = ("closed", "dyn_j", "idle_j", "k", "phased", "placed", "running", "settled")

    def __init__(self, k: int) -> None:
        self.k = k
        self.idle_j = 0.0  # energy below the baseline, summed over the GPUs
        self.dyn_j = 0.0  # energy above it
        self.running: int | None = None  # the server's running count over it, where known
        self.placed: list[HeldRequest] = []
        self.phased = False  # its phases are booked already (a live running count said so)
        self.closed = False  # every GPU passed it and its count is in: it may settle
        self.settled = False


@dataclass(slots=True)
class _Report:
    t0: float
    t1: float
    running: int


@dataclass(slots=True)
class HeldSlots:
    """The hold: slots from the oldest unsettled one to the newest sample."""

    books: Books
    slot_s: float = SLOT_S
    hold_s: float = HOLD_S
    counted: bool = False
    """Whether a source reports the running count (observer, proxy): then a slot settles
    as soon as every request that ran in it reported."""
    live_phases: bool = False
    """Whether that count is the server's own (the observer's): then the phases follow
    it live; otherwise they are booked when a slot settles."""
    _slots: dict[int, _Slot] = field(default_factory=dict)
    _first_k: int | None = None
    _close_k: int | None = None
    _last_k: int | None = None
    _waiting: list[HeldRequest] = field(default_factory=list)
    _reports: deque[_Report] = field(default_factory=deque)
    _seen: dict[str, float] = field(default_factory=dict)
    _seen_order: deque[tuple[float, str]] = field(default_factory=deque)
    _done_s: float = -INF
    _reported_s: float = -INF
    _now_s: float = -INF
    finished: list[HeldRequest] = field(default_factory=list)
    held_j: float = 0.0
    """Energy in slots not settled yet: requests still to be heard from may take it."""
    open_j: float = 0.0
    """Energy already shared to placed requests that are not final yet."""

    def __post_init__(self) -> None:
        if not self.slot_s > 0:
            raise ValueError(f"slot_s must be positive, got {self.slot_s}")
        if self.hold_s < 0:
            raise ValueError(f"hold_s must not be negative, got {self.hold_s}")

    # ---------------------------------------------------------------- energy in
    def add_interval(self, t0: float, p0: float, t1: float, p1: float, idle_w: float) -> float:
        """One GPU's interval of the power line, integrated exactly onto the slots."""
        if t1 <= t0:
            return 0.0
        slope = (p1 - p0) / (t1 - t0)
        cuts = {t0, t1}
        k0, k1 = self._k(t0), self._k(t1)
        cuts.update(k * self.slot_s for k in range(k0 + 1, k1 + 1) if t0 < k * self.slot_s < t1)
        if (p0 - idle_w) * (p1 - idle_w) < 0:
            cuts.add(t0 + (idle_w - p0) / slope)
        points = sorted(cuts)
        total = 0.0
        for a, b in itertools.pairwise(points):
            if b <= a:
                continue
            pa, pb = p0 + slope * (a - t0), p0 + slope * (b - t0)
            energy = (pa + pb) / 2.0 * (b - a)
            total += energy
            above = pa + pb > 2.0 * idle_w
            idle_part = idle_w * (b - a) if above else energy
            self._add_energy(self._k((a + b) / 2.0), idle_part, energy - idle_part)
        return total

    def _add_energy(self, k: int, idle_j: float, dyn_j: float) -> None:
        slot = self._slot(k)
        if slot is None:  # older than the hold: a silent GPU came back late
            self._book_phase(idle_j, dyn_j, serving=True)
            self.books.unattributed_j += idle_j + dyn_j
            return
        if slot.settled:
            if slot.placed or slot.running:
                self._book_phase(idle_j, dyn_j, serving=True)
                self.books.unattributed_j += idle_j + dyn_j
            else:
                self.books.phase_j["idle_standby"] += idle_j + dyn_j
            return
        slot.idle_j += idle_j
        slot.dyn_j += dyn_j
        self.held_j += idle_j + dyn_j
        if slot.phased:
            self._book_phase(idle_j, dyn_j, serving=True)

    # ---------------------------------------------------------- running counts
    def running(self, t0: float, t1: float, count: int) -> None:
        """A source's running count over [t0, t1] (the observer's scrape, the proxy's view)."""
        count = max(0, count)
        rep = _Report(t0, t1, count)
        self._reports.append(rep)
        self._reported_s = max(self._reported_s, t1)
        for k in range(self._k(t0), self._k(t1 - 1e-9) + 1):
            slot = self._slots.get(k)
            if slot is not None and not slot.settled:
                self._apply(slot, rep)
        self._close_passed()

    @staticmethod
    def _apply(slot: _Slot, rep: _Report) -> None:
        slot.running = rep.running if slot.running is None else max(slot.running, rep.running)

    # ---------------------------------------------------------------- requests
    def place(self, req: HeldRequest) -> bool:
        """A request reported whole: it joins every held slot it ran in. A duplicate
        report (a retried export) is ignored: returns False."""
        if req.id in self._seen:
            return False
        self._seen[req.id] = req.end_s
        self._seen_order.append((req.end_s, req.id))
        first = self._first_k
        k0 = self._k(req.heard_from_s)
        k1 = self._k(req.heard_to_s - 1e-9) if req.heard_to_s > req.heard_from_s else k0
        if first is not None and self._k(req.start_s) < first:
            req.missed_s = max(0.0, min(req.end_s, first * self.slot_s) - req.start_s)
        touched: list[_Slot] = []
        last = self._last_k
        for k in range(max(k0, first if first is not None else k0), k1 + 1):
            if last is not None and k > last:
                break
            slot = self._slots.get(k)
            if slot is None or slot.settled:
                if slot is not None:
                    t0 = k * self.slot_s
                    req.missed_s += max(
                        0.0, min(req.end_s, t0 + self.slot_s) - max(req.start_s, t0)
                    )
                continue
            slot.placed.append(req)
            req.open_slots += 1
            touched.append(slot)
        if last is None or k1 > last:
            req.waiting_slots = True
            self._waiting.append(req)
        for slot in touched:
            self._settle_if_complete(slot)
        self._release(req)
        return True

    # -------------------------------------------------------------------- time
    def advance(self, now_s: float, done_s: float) -> None:
        """Time passed: ``done_s`` is how far every GPU has assigned its energy.

        Slots every GPU has passed book their phases where a running count says so
        and settle when complete; slots older than the hold settle as they are.
        Each slot is visited once on each path, so a call costs what changed.
        """
        self._now_s = max(self._now_s, now_s)
        self._done_s = max(self._done_s, done_s)
        self._close_passed()
        horizon = self._now_s - self.hold_s
        first = self._first_k
        while first is not None and (first + 1) * self.slot_s <= min(horizon, self._done_s):
            slot = self._slots.get(first)
            if slot is not None and not slot.settled:
                self._settle(slot)
            self._drop_settled()
            if self._first_k == first:
                break
            first = self._first_k
        while self._reports and self._reports[0].t1 < horizon:
            self._reports.popleft()
        keep = self._now_s - SEEN_KEEP * self.hold_s
        while self._seen_order and self._seen_order[0][0] < keep:
            _, rid = self._seen_order.popleft()
            self._seen.pop(rid, None)

    def _close_passed(self) -> None:
        """Close, in order, the slots every GPU has passed; a counted slot whose count
        has not come yet stops the walk until it comes (a slot no count will cover,
        from before the first, waits for the hold)."""
        if self._last_k is None:
            return
        first = self._first_k
        assert first is not None
        k = first if self._close_k is None else max(self._close_k, first)
        while k <= self._last_k and (k + 1) * self.slot_s <= self._done_s:
            slot = self._slots.get(k)
            if slot is not None and not slot.settled:
                if self.counted and slot.running is None:
                    if (k + 1) * self.slot_s > self._reported_s:
                        break  # its count is still to come
                    k += 1  # no count ever covered it (before the first): the hold settles it
                    continue
                self._close(slot)
            k += 1
        self._close_k = k

    def flush(self) -> None:
        """Shutdown: settle every slot as it stands."""
        for k in sorted(self._slots):
            slot = self._slots[k]
            if not slot.settled:
                self._settle(slot)
        for req in self._waiting:
            req.waiting_slots = False
            self._release(req)
        self._waiting.clear()
        self._drop_settled()

    def pop_finished(self) -> list[HeldRequest]:
        out, self.finished = self.finished, []
        return out

    def standby(self, t: float) -> bool:
        """Whether nothing is known to run at ``t`` (for the baseline estimator): no
        running count above zero and no placed request covers it."""
        slot = self._slots.get(self._k(t))
        if slot is not None and (slot.placed or slot.running):
            return False
        for rep in reversed(self._reports):  # the latest count begun by then holds
            if rep.t0 <= t:
                return rep.running == 0
        return True

    def __len__(self) -> int:
        """Slots held now (for the memory figure)."""
        return len(self._slots)

    # --------------------------------------------------------------- internals
    def _k(self, t: float) -> int:
        return math.floor(t / self.slot_s)

    def _slot(self, k: int) -> _Slot | None:
        slot = self._slots.get(k)
        if slot is not None:
            return slot
        if self._first_k is not None and k < self._first_k:
            return None
        slot = _Slot(k)
        self._slots[k] = slot
        if self._first_k is None:
            self._first_k = k
        t0, t1 = k * self.slot_s, (k + 1) * self.slot_s
        for rep in self._reports:
            if rep.t0 < t1 and rep.t1 > t0:
                self._apply(slot, rep)
        if self._last_k is None or k > self._last_k:
            self._last_k = k
        if self._waiting:
            still: list[HeldRequest] = []
            for req in self._waiting:
                if req.heard_from_s < t1 and req.heard_to_s > t0:
                    slot.placed.append(req)
                    req.open_slots += 1
                if req.heard_to_s > t1:
                    still.append(req)
                else:
                    req.waiting_slots = False
            done = [r for r in self._waiting if not r.waiting_slots]
            self._waiting = still
            for req in done:
                self._release(req)
        return slot

    def _close(self, slot: _Slot) -> None:
        """Every GPU passed the slot: book its phases if a live count is known, settle if
        complete."""
        if slot.running is not None and not slot.closed:
            slot.closed = True
            if slot.running == 0 and not slot.placed:
                self._settle(slot)  # nothing ran: standby, and nothing will claim it
                return
            if self.live_phases:
                slot.phased = True
                self._book_phase(slot.idle_j, slot.dyn_j, serving=True)
        self._settle_if_complete(slot)

    def _settle_if_complete(self, slot: _Slot) -> None:
        """A closed slot settles once as many requests reported as the count says ran."""
        if slot.settled or slot.running is None or not slot.closed:
            return
        if len(slot.placed) >= slot.running:
            self._settle(slot)

    def _settle(self, slot: _Slot) -> None:
        """Share the slot's energy among the requests placed in it (CONTRACT.md, Sharing)."""
        slot.settled = True
        self.held_j -= slot.idle_j + slot.dyn_j
        t0, t1 = slot.k * self.slot_s, (slot.k + 1) * self.slot_s
        placed = slot.placed
        missing = max(0, (slot.running or 0) - len(placed))
        if not placed and not missing:
            if slot.phased:  # a count said it ran, and nothing reported within the hold
                self.books.unattributed_j += slot.idle_j + slot.dyn_j
            else:
                self.books.phase_j["idle_standby"] += slot.idle_j + slot.dyn_j
        else:
            cuts = {t0, t1}
            for r in placed:
                for c in (r.start_s, r.first_token_s, r.end_s):
                    if t0 < c < t1:
                        cuts.add(c)
            points = sorted(cuts)
            for a, b in itertools.pairwise(points):
                if b <= a:
                    continue
                frac = (b - a) / self.slot_s
                self._share_piece(slot, missing, a, b, slot.idle_j * frac, slot.dyn_j * frac)
            slot.phased = True
        for r in placed:
            r.open_slots -= 1
            self._release(r)
        slot.placed = []

    def _share_piece(
        self,
        slot: _Slot,
        missing: int,
        a: float,
        b: float,
        idle_j: float,
        dyn_j: float,
    ) -> None:
        inside = [r for r in slot.placed if r.start_s <= a and r.end_s >= b]
        n = len(inside) + missing
        if n == 0:
            if slot.phased:  # a count said it ran, but nothing placed covers this part
                self.books.unattributed_j += idle_j + dyn_j
            else:  # no count: nothing is known to run here
                self.books.phase_j["idle_standby"] += idle_j + dyn_j
            return
        if not slot.phased:  # no count: the phases follow what reported
            self._book_phase(idle_j, dyn_j, serving=True)
        works = [r.work(a, b) for r in inside]
        ratio = self.books.prefill_fit.ratio
        raw = [p * ratio + d for p, d in works]
        informed = [r.prompt_work > 0.0 or r.completion_tokens > 0.0 for r in inside]
        n_inf = sum(informed)
        mean = sum(raw) / n_inf if n_inf else 1.0
        weights = [w if k else mean for w, k in zip(raw, informed, strict=True)]
        total_w = sum(weights) + missing * mean
        if dyn_j > 0.0 and missing == 0:
            self.books.prefill_fit.observe(
                sum(p for p, _ in works), sum(d for _, d in works), dyn_j, b - a
            )
        each_idle = idle_j / n
        given = 0.0
        for r, w in zip(inside, weights, strict=True):
            d = dyn_j * w / total_w if total_w > 0 else dyn_j / n
            r.idle_j += each_idle
            r.dynamic_j += d
            if b <= r.first_token_s:
                r.prefill_j += each_idle + d
            given += each_idle + d
            self._add_model(r.model, each_idle, d)
        self.open_j += given
        self.books.unattributed_j += (idle_j + dyn_j) - given

    def _add_model(self, model: str, idle: float, dyn: float) -> None:
        key_i: tuple[str, Phase] = (model, "idle_serving")
        key_d: tuple[str, Phase] = (model, "dynamic")
        model_j = self.books.model_j
        model_j[key_i] = model_j.get(key_i, 0.0) + idle
        model_j[key_d] = model_j.get(key_d, 0.0) + dyn

    def _book_phase(self, idle_j: float, dyn_j: float, *, serving: bool) -> None:
        phase = self.books.phase_j
        if serving:
            phase["idle_serving"] += idle_j
            phase["dynamic"] += dyn_j
        else:
            phase["idle_standby"] += idle_j + dyn_j

    def _release(self, req: HeldRequest) -> None:
        if req.open_slots == 0 and not req.waiting_slots:
            req.open_slots = -1  # handed out once
            self.open_j -= req.dynamic_j + req.idle_j
            self.finished.append(req)

    def _drop_settled(self) -> None:
        first, last = self._first_k, self._last_k
        if first is None or last is None:
            return
        while first <= last:
            slot = self._slots.get(first)
            if slot is not None and not slot.settled:
                break
            self._slots.pop(first, None)
            first += 1
        self._first_k = first
