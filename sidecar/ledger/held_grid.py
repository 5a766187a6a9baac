"""The held slots' grid (:mod:`sidecar.ledger.held`): one slot, one count, which slots a
window covers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.ledger.held_request import HeldRequest

__all__ = ["Report", "Slot", "heard_in", "window"]


class Slot:
    """One slot of the grid."""

    __slots__ = (
        "absent", "claimed", "dyn_j", "idle_j", "k", "phased", "placed", "reps", "running",
        "settled", "sure", "taker", "waiting",
    )  # fmt: skip

    def __init__(self, k: int) -> None:
        self.k = k
        self.idle_j = 0.0  # energy below the baseline, summed over the GPUs
        self.dyn_j = 0.0  # energy above it
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


def heard_in(held: HeldRequest, t0: float, t1: float) -> bool:
    """Whether a count over [t0, t1] may have counted this request: edges included (a
    request scheduled at the scrape's instant was running then), nothing wider, or a
    neighbour would stand in for a request still running (its share lost)."""
    return held.heard_from_s <= t1 and held.heard_to_s >= t0
