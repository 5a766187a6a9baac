"""Held slots: energy kept in compact records until late request reports place it.

In traces mode a request is heard of only when its span arrives, seconds to
minutes after it ended. The power line cannot wait that long in raw form (10 Hz
x 8 GPUs x 15 minutes), so each GPU interval is integrated, exactly, onto a grid
of time slots of ``slot_s`` summed over the GPUs: per slot its energy below the
baseline, its energy above it, the running count a source reported over it, and
the requests already placed in it. A slot's size does not depend on the number
of GPUs or the sample rate (about 360 bytes, plus 8 per request placed in it).

A slot settles (its energy is shared among the requests placed in it by the
ledger's own rule, :class:`~sidecar.ledger.pieces.Books`) once every running
count over it has been satisfied (as many requests reported as it counted) and
the exporter's delay (``grace_s``) has passed, or when the hold ends. A count
is a window's: the requests that ran in it (those still running at its end plus
those that finished in it), so a short request between two scrapes is waited
for too. Requests a count saw that never reported share as requests that weigh
the mean of those placed: that energy goes to the unattributed bucket. Within a
slot the power's slope is kept (its first moment) and the dynamic energy goes to
its pieces by the fitted work in each, as the live path does between readings.

A long generation must not hold up the requests that ran beside it, so a counted
slot is claimed once it is ``claim_s`` old (30 s) with co-runners still to report:
those placed take their shares now, fixed, each co-runner likely to have run in
it (:func:`~sidecar.ledger.held_grid.absent_count`) weighing as a stand-in (the
lightest placed one, or what the fitted costs leave unexplained, the more); their
energy stays in the slot. A later span takes one stand-in's share of it; what no
span takes goes to unattributed at the hold's end, or, once every count is
satisfied, to standby, or to the last co-runner that took where a count said the
slot was serving. Without a count (traces alone) nothing says how many ran beside
a request, so an early split could hand a later span's share to those heard
first: those slots wait for the hold, as before.

With the server's own count (``live_phases``), phases are booked once a slot is
past the grace where the count shows a request ran through it (running at both
scrapes, more than finished between them); otherwise they are booked as shares
are given, from what reported (a window's count cannot say which part of it ran
requests). A request is final once every slot it ran in has settled or been
claimed; the ledger hands it out then. Conservation holds at every step: settled
energy is in requests, ``idle_standby`` or unattributed; the rest is held
(:attr:`held_j` in slots, :attr:`open_j` on requests not final yet).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from sidecar.ledger.held_grid import Piece, Profile, Report, Slot, absent_count, heard_in, window
from sidecar.ledger.held_request import HeldRequest, span_request, stand_in, weighs
from sidecar.ledger.pieces import Books
from sidecar.ledger.requests import INF, Request

__all__ = ["GRACE_S", "HOLD_S", "SLOT_S", "HeldRequest", "HeldSlots", "span_request"]

SLOT_S: Final = 0.1
"""Default slot width: one sample period at the default 10 Hz, where the live path too
lets the fitted work, not the readings, place energy (wider scored better on a simulator
whose power has the step model's form, so says nothing of real power)."""
HOLD_S: Final = 900.0
"""Default hold (CONTRACT.md, "Late spans": 15 minutes)."""
GRACE_S: Final = 6.0
"""A slot waits this long for reports before its phases are booked or it settles:
vLLM's batch span exporter sends up to 5 s after a request ends."""
CLAIM_S: Final = 30.0
"""How long a slot waits for the co-runners its count saw before those placed take their
shares with the rest estimated (:meth:`HeldSlots._claim`). On the serving bench (real
arrival traces, batches of 14 to 24) claiming at the grace (6 s) cost 5 to 8 points of
median per-request error (p90 to 97 %), 10 s 1 to 2, 20 s under 0.3, 30 s none: the
split needs who ran beside, and a stand-in is only a guess at unseen work."""
SEEN_KEEP: Final = 2.0
"""Request ids (with their start) are kept this many holds: a retried export counts once."""


@dataclass(slots=True)
class HeldSlots:
    """The hold: slots from the oldest unsettled one to the newest sample."""

    books: Books
    slot_s: float = SLOT_S
    hold_s: float = HOLD_S
    counted: bool = False
    """Whether a source reports running counts (observer, proxy): then a slot settles
    once they are satisfied, not at the hold."""
    live_phases: bool = False
    """Whether the count is the server's own (the observer's): then phases follow it."""
    grace_s: float = GRACE_S
    claim_s: float = CLAIM_S
    """A counted slot whose co-runners have not all reported is claimed this long after
    its end (:meth:`_claim`)."""
    _slots: dict[int, Slot] = field(default_factory=dict)
    _first_k: int | None = None
    _last_k: int | None = None
    _close_k: int | None = None
    _claim_k: int | None = None
    _waiting: list[HeldRequest] = field(default_factory=list)
    _reports: deque[Report] = field(default_factory=deque)
    _seen: dict[tuple[str, float], float] = field(default_factory=dict)
    _seen_order: deque[tuple[float, tuple[str, float]]] = field(default_factory=deque)
    _done_s: float = -INF
    _now_s: float = -INF
    _reported_s: float = -INF
    _last_end_s: float = -INF
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
        total = 0.0
        for a, b in itertools.pairwise(sorted(cuts)):
            if b <= a:
                continue
            pa, pb = p0 + slope * (a - t0), p0 + slope * (b - t0)
            energy = (pa + pb) / 2.0 * (b - a)
            total += energy
            above = pa + pb > 2.0 * idle_w
            idle_part = idle_w * (b - a) if above else energy
            k = self._k((a + b) / 2.0)
            off = a - (k + 0.5) * self.slot_s  # from the slot's middle
            moment = (b - a) ** 2 * (pa + 2.0 * pb) / 6.0 + off * energy
            idle_m = idle_part * (off + (b - a) / 2.0) if above else moment
            self._add_energy(k, idle_part, energy - idle_part, idle_m, moment - idle_m)
        return total

    def _add_energy(
        self, k: int, idle_j: float, dyn_j: float, idle_m: float = 0.0, dyn_m: float = 0.0
    ) -> None:
        slot = self._slot(k)
        if slot is None or slot.settled:  # a silent GPU came back after it settled
            if slot is not None and not slot.phased and not slot.placed and not slot.running:
                self.books.phase_j["idle_standby"] += idle_j + dyn_j
            else:
                self._book_phase(idle_j, dyn_j)
                self.books.unattributed_j += idle_j + dyn_j
            return
        slot.idle_j += idle_j
        slot.dyn_j += dyn_j
        slot.idle_m += idle_m
        slot.dyn_m += dyn_m
        self.held_j += idle_j + dyn_j
        if slot.phased:
            self._book_phase(idle_j, dyn_j)

    # ---------------------------------------------------------- running counts
    def running(self, t0: float, t1: float, count: int, through: int = 0) -> None:
        """A source's count of the requests that ran over [t0, t1] (the observer's
        scrape window, the proxy's view between two ticks); ``through`` of them ran
        all of it (running at both ends: the window is serving for sure)."""
        rep = Report(t0, t1, max(0, count), max(0, through))
        heard = {id(r) for r in self._waiting if heard_in(r, t0, t1)}
        for k in self._window(t0, t1):
            slot = self._slots.get(k)
            if slot is not None:
                heard.update(id(r) for r in slot.placed if heard_in(r, t0, t1))
        rep.heard = len(heard)
        self._reports.append(rep)
        self._reported_s = max(self._reported_s, t1)
        for k in self._window(t0, t1):
            slot = self._slots.get(k)
            if slot is not None and not slot.settled:
                self._apply(slot, rep)
        self._close_passed()

    def _apply(self, slot: Slot, rep: Report) -> None:
        slot.running = rep.running if slot.running is None else max(slot.running, rep.running)
        slot.sure = slot.sure or rep.through > 0
        slot.reps += (rep,)
        if rep.heard < rep.running:
            slot.waiting += 1

    # ---------------------------------------------------------------- requests
    def place(self, held: HeldRequest) -> bool:
        """A request reported whole: it joins every held slot it ran in. A duplicate
        report (a retried export: same id, same start) is ignored: returns False; an id
        reused for another request (a client's ``X-Request-Id``) is another request."""
        req = held.req
        key = (req.id, req.start_s)
        if key in self._seen:
            return False
        self._seen[key] = req.end_s
        self._seen_order.append((req.end_s, key))
        self._last_end_s = max(self._last_end_s, req.end_s)
        first, last = self._first_k, self._last_k
        span = self._window(held.heard_from_s, held.heard_to_s)
        k0 = span.start
        k1 = span.stop - 1 if held.heard_to_s > held.heard_from_s else k0
        if first is not None and self._k(req.start_s) < first:
            held.missed_s = max(0.0, min(req.end_s, first * self.slot_s) - req.start_s)
        touched: list[Slot] = []
        # only the held slots: a window far outside them (a wild clock) costs nothing
        for k in range(0 if first is None else max(k0, first), 0 if last is None else k1 + 1):
            if last is not None and k > last:
                break
            slot = self._slots.get(k)
            if slot is None:
                continue
            if slot.settled:
                t0 = k * self.slot_s
                held.missed_s += max(0.0, min(req.end_s, t0 + self.slot_s) - max(req.start_s, t0))
                continue
            if slot.claimed:  # its share waits in the slot: taken now, fixed
                self._take(slot, held)
                continue
            slot.placed.append(held)
            held.open_slots += 1
            touched.append(slot)
        if last is None or k1 > last:
            held.waiting_slots = True
            self._waiting.append(held)
        for rep in reversed(self._reports):  # the counts it satisfies one more of
            if rep.t1 < held.heard_from_s:
                break
            if heard_in(held, rep.t0, rep.t1):
                rep.heard += 1
                if rep.heard == rep.running:
                    for k in self._window(rep.t0, rep.t1):
                        slot = self._slots.get(k)
                        if slot is not None and not slot.settled:
                            slot.waiting -= 1
                            touched.append(slot)
        for slot in touched:
            self._settle_if_complete(slot)
        self._release(held)
        return True

    # -------------------------------------------------------------------- time
    def advance(self, now_s: float, done_s: float) -> None:
        """Time passed: ``done_s`` is how far every GPU has assigned its energy.

        Slots past the grace book their phases (the server's count), settle when complete
        or are claimed; slots older than the hold settle as they are. Each slot is
        visited once on each path, so a call costs what changed."""
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
            self._seen.pop(self._seen_order.popleft()[1], None)

    def flush(self) -> None:
        """Shutdown: settle every slot as it stands."""
        for k in sorted(self._slots):
            slot = self._slots[k]
            if not slot.settled:
                self._settle(slot)
        for held in self._waiting:
            held.waiting_slots = False
            self._release(held)
        self._waiting.clear()
        self._drop_settled()

    def pop_finished(self) -> list[HeldRequest]:
        out, self.finished = self.finished, []
        return out

    def standby(self, t: float) -> bool:
        """Whether nothing is known to run at ``t`` (for the baseline estimator): no
        count above zero by then and no placed request covering it. Without counts a
        reading is live and its requests report later, so none counts as standby
        while a request ended within the hold (the baseline holds its last figure)."""
        slot = self._slots.get(self._k(t))
        if slot is not None and (slot.placed or slot.running):
            return False
        for rep in reversed(self._reports):  # the latest count begun by then holds
            if rep.t0 <= t:
                return rep.running == 0
        return t - self._last_end_s > self.hold_s

    def __len__(self) -> int:
        """Slots held now (for the memory figure)."""
        return len(self._slots)

    # --------------------------------------------------------------- internals
    def _k(self, t: float) -> int:
        return math.floor(t / self.slot_s)

    def _window(self, t0: float, t1: float) -> range:
        return window(t0, t1, self.slot_s)

    @staticmethod
    def _overlaps(held: HeldRequest, t0: float, t1: float) -> bool:
        return held.heard_from_s < t1 and held.heard_to_s > t0

    def _slot(self, k: int) -> Slot | None:
        slot = self._slots.get(k)
        if slot is not None:
            return slot
        if self._first_k is not None and k < self._first_k:
            return None
        slot = Slot(k)
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
            done: list[HeldRequest] = []
            for held in self._waiting:
                if self._overlaps(held, t0, t1):
                    slot.placed.append(held)
                    held.open_slots += 1
                if held.heard_to_s > t1:
                    still.append(held)
                else:
                    held.waiting_slots = False
                    done.append(held)
            self._waiting = still
            for held in done:
                self._release(held)
        return slot

    def _close_passed(self) -> None:
        """Walk, in order, the slots every GPU has passed and the grace has passed: book
        the phases the server's count gives, settle the complete ones. A counted slot
        whose count has not come yet stops the walk until it comes (one no count will
        cover, from before the first, waits for the hold)."""
        first, last = self._first_k, self._last_k
        if first is None or last is None:
            return
        k = first if self._close_k is None else max(self._close_k, first)
        until = min(self._done_s, self._now_s - self.grace_s)
        while k <= last and (k + 1) * self.slot_s <= until:
            slot = self._slots.get(k)
            if slot is not None and not slot.settled:
                if self.counted and slot.running is None:
                    if (k + 1) * self.slot_s > self._reported_s:
                        break  # its count is still to come
                    k += 1
                    continue
                settled = self._settle_if_complete(slot)
                if not settled and self.live_phases and slot.sure and not slot.phased:
                    slot.phased = True
                    self._book_phase(slot.idle_j, slot.dyn_j)
            k += 1
        self._close_k = k
        if self.counted:
            self._claim_passed()

    def _claim_passed(self) -> None:
        """Walk, in order, the slots past ``claim_s`` (and the grace) that the close walk
        passed: claim those whose co-runners have not all reported (:meth:`_claim`)."""
        first, close = self._first_k, self._close_k
        if first is None or close is None:
            return
        k = first if self._claim_k is None else max(self._claim_k, first)
        until = min(self._done_s, self._now_s - max(self.grace_s, self.claim_s))
        while k < close and (k + 1) * self.slot_s <= until:
            slot = self._slots.get(k)
            if slot is not None and not (slot.settled or slot.claimed or slot.running is None):
                self._claim(slot)
            k += 1
        self._claim_k = k

    def _settle_if_complete(self, slot: Slot) -> bool:
        """A counted slot settles once its counts are satisfied, past the grace."""
        if slot.settled:
            return True
        if not self.counted or slot.running is None or slot.waiting > 0:
            return False
        end = (slot.k + 1) * self.slot_s
        if end > min(self._done_s, self._now_s - self.grace_s):
            return False
        self._settle(slot)
        return True

    def _settle(self, slot: Slot) -> None:
        """Share the slot's energy among the requests placed in it (CONTRACT.md, Sharing)."""
        if slot.claimed:
            self._settle_claimed(slot)
            return
        slot.settled = True
        self.held_j -= slot.idle_j + slot.dyn_j
        placed = slot.placed
        missing = max(0, (slot.running or 0) - len(placed)) if slot.waiting else 0
        t0, t1 = slot.k * self.slot_s, (slot.k + 1) * self.slot_s
        if not any(r.req.start_s < t1 and r.req.end_s > t0 for r in placed) and not missing:
            if slot.phased:  # the count said it ran; what reported ran elsewhere
                self.books.unattributed_j += slot.idle_j + slot.dyn_j
            else:
                self.books.phase_j["idle_standby"] += slot.idle_j + slot.dyn_j
        else:
            self._share_slot(slot, [stand_in(slot.k, i, t0, t1) for i in range(missing)])
        self._let_go(slot)

    def _claim(self, slot: Slot) -> None:
        """Past the grace with co-runners still to report (the server's count says how
        many ran): those placed take their shares now, fixed, each co-runner still to come
        weighing as the mean of those placed; what the co-runners would take stays in the
        slot for their spans (:meth:`_take`). Phases are booked for what was shared. With
        none of them likely to have run in it, those placed share all of it (a stand-in
        that no span takes would keep their share)."""
        absent = absent_count(slot, self.slot_s)
        if absent == 0 and slot.waiting == 0:
            self._settle(slot)
            return
        slot.claimed = True
        slot.absent = absent
        t0, t1 = slot.k * self.slot_s, (slot.k + 1) * self.slot_s
        if any(r.req.start_s < t1 and r.req.end_s > t0 for r in slot.placed):
            stand_ins = [stand_in(slot.k, i, t0, t1, attributable=True) for i in range(absent)]
            before = slot.idle_j + slot.dyn_j
            self._share_slot(slot, stand_ins)
            idle_left = sum(r.idle_j for r in stand_ins)
            dyn_left = sum(r.dynamic_j for r in stand_ins)
            if not slot.phased:  # only what was shared is booked: the rest may be standby
                self._book_phase(-idle_left, -dyn_left)
            slot.idle_m *= idle_left / slot.idle_j if slot.idle_j > 0 else 0.0
            slot.dyn_m *= dyn_left / slot.dyn_j if slot.dyn_j > 0 else 0.0
            slot.idle_j, slot.dyn_j = idle_left, dyn_left
            self.held_j -= before - idle_left - dyn_left
        self._let_go(slot)

    def _take(self, slot: Slot, held: HeldRequest) -> None:
        """A span for a claimed slot: one co-runner's share of what was kept, the idle part
        by the time it covers, the dynamic part as its work weighs against a stand-in's
        (decoding all through the slot), never more than is left."""
        r = held.req
        t0, t1 = slot.k * self.slot_s, (slot.k + 1) * self.slot_s
        cover = min(r.end_s, t1) - max(r.start_s, t0)
        if cover <= 0.0:
            return
        n = max(1, slot.absent)
        first = r.end_s if r.first_token_s is None else r.first_token_s
        pre_s = max(0.0, min(first, t1) - max(r.start_s, t0))
        prompt_w, decode_w = weighs(self.books, r, t0, t1, slot.running or 1)
        if n == 1:  # the last one the count saw: what was kept is its own
            decode_w = max(decode_w, cover / self.slot_s - prompt_w)
        weight = prompt_w + decode_w
        idle = slot.idle_j * cover / (n * self.slot_s)
        dyn = slot.dyn_j * min(n, weight) / n  # a heavy prompt takes at most all
        r.prefill_j += idle * pre_s / cover + (dyn * prompt_w / weight if weight > 0 else 0.0)
        slot.idle_j -= idle
        slot.dyn_j -= dyn
        slot.absent = max(0, slot.absent - 1)
        slot.taker = held
        r.idle_j += idle
        r.dynamic_j += dyn
        self.held_j -= idle + dyn
        self.open_j += idle + dyn
        if not slot.phased:
            self._book_phase(idle, dyn)
        if r.booked:
            self.books._add_model(r.model, idle, dyn)

    def _settle_claimed(self, slot: Slot) -> None:
        """A claimed slot's end. The hold ended with a count not satisfied: its co-runners
        were never heard from (unattributed). Every count satisfied: what no span took is
        the part of the slot its last co-runner did not cover: standby where no count said
        the slot was serving, else serving energy, the last co-runner's while its figure is
        still open (unattributed only once it is final: no figure is reopened)."""
        slot.settled = True
        left = slot.idle_j + slot.dyn_j
        self.held_j -= left
        taker = slot.taker
        if slot.waiting > 0 or (slot.phased and (taker is None or taker.open_slots < 0)):
            if not slot.phased:
                self._book_phase(slot.idle_j, slot.dyn_j)
            self.books.unattributed_j += left
        elif slot.phased and taker is not None:
            r = taker.req
            r.idle_j += slot.idle_j
            r.dynamic_j += slot.dyn_j
            self.open_j += left
            if r.booked:
                self.books._add_model(r.model, slot.idle_j, slot.dyn_j)
        else:
            self.books.phase_j["idle_standby"] += left
        slot.idle_j = slot.dyn_j = 0.0
        slot.taker = None

    def _share_slot(self, slot: Slot, absent: list[Request]) -> None:
        """Share the slot among those placed and ``absent``, cut where any placed one
        starts, reaches its first token or ends, by the ledger's own rule; as the live
        path does within an interval between readings (:meth:`Books._assign_pieces`),
        the slot's dynamic energy is spread over its pieces by the step model's predicted
        energy of each one's work (a prompt chunk draws more than the decode beside it),
        its total kept: most of the gap to the live path on the serving bench."""
        t0, t1 = slot.k * self.slot_s, (slot.k + 1) * self.slot_s
        cuts = {t0, t1}
        for r in slot.placed:
            for c in (r.req.start_s, r.req.first_token_s, r.req.end_s):
                if c is not None and t0 < c < t1:
                    cuts.add(c)
        idle = Profile(slot.idle_j, slot.idle_m, t0, self.slot_s)
        dyn = Profile(slot.dyn_j, slot.dyn_m, t0, self.slot_s)
        books = self.books
        pieces: list[Piece] = []
        for a, b in itertools.pairwise(sorted(cuts)):
            if b <= a:
                continue
            idle_j, dyn_j = idle.part(a, b), dyn.part(a, b)
            placed = [r.req for r in slot.placed if r.req.start_s <= a and r.req.end_s >= b]
            if not placed and not absent:
                if slot.phased:  # the count said it ran, but nothing placed covers this part
                    books.unattributed_j += idle_j + dyn_j
                else:
                    books.phase_j["idle_standby"] += idle_j + dyn_j
                continue
            weights, predicted = books._weights(placed + absent, a, b, dyn_j, self._now_s)
            pieces.append(Piece(b, placed, idle_j, dyn_j, weights, predicted))
        shaped = [p for p in pieces if p.predicted is not None and p.dyn_j > 0.0]
        total_pred = sum(p.predicted or 0.0 for p in shaped)
        if len(shaped) > 1 and total_pred > 0.0 and not absent:  # stand-ins: by the line
            total = sum(p.dyn_j for p in shaped)
            for p in shaped:
                p.dyn_j = total * (p.predicted or 0.0) / total_pred
        for p in pieces:
            self._share_piece(slot, absent, p)

    def _let_go(self, slot: Slot) -> None:
        """The requests placed in it have their share of it."""
        for r in slot.placed:
            r.open_slots -= 1
            self._release(r)
        slot.placed = []

    def _share_piece(self, slot: Slot, absent: list[Request], p: Piece) -> None:
        """Book one piece; requests a count saw but that did not report share as
        uninformed requests (into the unattributed bucket, or onto stand-ins that keep
        it for their spans)."""
        placed, weights, dyn_j = p.placed, p.weights, p.dyn_j
        books = self.books
        phases = books.phase_j
        saved = phases["idle_serving"], phases["dynamic"]
        given = sum(r.idle_j + r.dynamic_j for r in placed)
        if weights is not None and p.predicted is not None and placed and absent:
            # the step model's weights are joules: a stand-in weighs as the lightest placed
            # one (a co-runner still to report is most likely decoding), and what the
            # placed ones' work does not explain is kept for the stand-ins
            n = len(placed)
            known = sum(weights[:n])
            each = max(min(weights[:n]), (dyn_j - known) / len(absent))
            weights = [*weights[:n], *([each] * len(absent))]
        books._book(placed + absent, p.b, p.idle_j, dyn_j, weights)
        if slot.phased:  # booked already, as the server's count went
            phases["idle_serving"], phases["dynamic"] = saved
        self.open_j += sum(r.idle_j + r.dynamic_j for r in placed) - given

    def _book_phase(self, idle_j: float, dyn_j: float) -> None:
        phase = self.books.phase_j
        phase["idle_serving"] += idle_j
        phase["dynamic"] += dyn_j

    def _release(self, held: HeldRequest) -> None:
        if held.open_slots == 0 and not held.waiting_slots:
            held.open_slots = -1  # handed out once
            self.open_j -= held.req.dynamic_j + held.req.idle_j
            self.finished.append(held)

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
