"""The held slots' grid (:mod:`sidecar.ledger.held`): one slot, one count, which slots a
window covers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.ledger.held_request import HeldRequest
from sidecar.ledger.requests import Request

__all__ = ["Piece", "Profile", "Report", "Slot", "absent_count", "heard_in", "window"]


class Slot:
    """One slot of the grid."""

    __slots__ = (
        "absent", "claimed", "dyn_j", "dyn_m", "idle_j", "idle_m", "k", "phased", "placed", "reps", "running",
        "settled", "sure", "taker", "waiting",
    )  # fmt: skip

    def __init__(self, k: int) -> None:
        self.k = k
        self.idle_j = 0.0  # energy below the baseline, summed over the GPUs
        self.dyn_j = 0.0  # energy above it
        self.idle_m = 0.0  # their first moments about the slot's middle (J s): the
        self.dyn_m = 0.0  # power's slope within it (Profile)
        self.running: int | None = None  # the largest count over it, where one came
        self.waiting = 0  # counts over it not satisfied yet
        self.placed: list[HeldRequest] = []
        self.phased = False  # its phases are booked already (the server's count)
        self.sure = False  # a count says some request ran through all of it
        self.settled = False
        self.claimed = False  # past the grace: those placed took their shares, fixed
        self.absent = 0  # once claimed: co-runners whose share is still in it
        self.taker: HeldRequest | None = None  # once claimed: the latest span that took
        self.reps: tuple[Report, ...] = ()  # the counts over it


@dataclass(slots=True)
class Report:
    """A source's count over [t0, t1]: ``through`` ran all of it, ``heard`` reported."""

    t0: float
    t1: float
    running: int
    through: int = 0
    heard: int = 0


@dataclass(slots=True)
class Piece:
    """One piece of a slot between its cuts, weighed, waiting to be booked."""

    b: float
    placed: list[Request]
    idle_j: float
    dyn_j: float
    weights: list[float] | None
    predicted: float | None


class Profile:
    """A slot's energy spread over it by a straight line with the slot's energy and first
    moment: the power line's slope within the slot is kept (on the serving bench, power
    taken as constant within 0.1 s slots cost 1 to 4 points of p90 per-request error),
    clamped so the line stays at or above zero (no piece gets negative energy); the
    pieces of a slot add up to its energy whatever the cuts."""

    __slots__ = ("_e", "_slope", "_t0", "_w")

    def __init__(self, energy_j: float, moment_js: float, t0: float, width_s: float) -> None:
        self._e, self._t0, self._w = energy_j, t0, width_s
        bound = 2.0 * abs(energy_j) / width_s**2  # beyond: the line dips below zero
        self._slope = min(bound, max(-bound, 12.0 * moment_js / width_s**3))

    def part(self, a: float, b: float) -> float:
        """The energy in [a, b] (within the slot)."""
        w, mid = self._w, self._w / 2.0
        lo, hi = a - self._t0, b - self._t0
        return self._e * (hi - lo) / w + self._slope / 2.0 * ((hi - mid) ** 2 - (lo - mid) ** 2)


def window(t0: float, t1: float, slot_s: float) -> range:
    """The slots [t0, t1] overlaps, by the test a new slot applies to the counts held
    (``k * slot_s`` against the window's ends). At epoch seconds a fixed epsilon is below
    the float resolution: a slot counted by one test and not the other gets its waiting
    count out of step (a window then waits on, or is taken for, its neighbour's)."""
    k0, k1 = math.floor(t0 / slot_s), math.floor(t1 / slot_s)
    if k0 * slot_s > t0:  # t0 / slot_s rounded up past a slot's start
        k0 -= 1
    elif (k0 + 1) * slot_s <= t0:
        k0 += 1
    if (k1 + 1) * slot_s < t1:
        k1 += 1
    elif k1 * slot_s >= t1 and k1 > k0:
        k1 -= 1
    return range(k0, k1 + 1)


def absent_count(slot: Slot, slot_s: float) -> int:
    """Co-runners not reported that ran in this slot, by the count most waited for, at
    most its count less those placed in it. At the claim a co-runner still to report is
    still running (or just ended), so it ran in the slot for sure where it was running
    at the window's start too (``through``, less those placed that ran all of it);
    one that began within the window ran in the slot only if it began before the
    slot's end: those count in proportion to the window before the slot's end (a
    stand-in kept for one that began after it is taken by no span, and what it kept
    was the placed requests' share)."""
    end = (slot.k + 1) * slot_s
    most = 0
    for rep in slot.reps:
        unheard = rep.running - rep.heard
        if unheard <= 0:
            continue
        ran_all = sum(1 for r in slot.placed if r.heard_from_s <= rep.t0 and r.heard_to_s >= rep.t1)
        sure = min(unheard, max(0, rep.through - ran_all))
        width = rep.t1 - rep.t0
        before = min(1.0, max(0.0, (end - rep.t0) / width)) if width > 0 else 1.0
        most = max(most, sure + math.floor((unheard - sure) * before + 0.5))
    return max(0, min(most, (slot.running or 0) - len(slot.placed)))


def heard_in(held: HeldRequest, t0: float, t1: float) -> bool:
    """Whether a count over [t0, t1] may have counted this request: edges included (a
    request scheduled at the scrape's instant was running then), nothing wider, or a
    neighbour would stand in for a request still running (its share lost)."""
    return held.heard_from_s <= t1 and held.heard_to_s >= t0
