"""How far the work of every request in flight is known: the ledger's waiting rule, in O(1).

An interval of the power line waits until every request overlapping it is
known through its end (a streamed request's rate up to a time is final only
once its next chunk, or its end, arrives). Asking that of the requests
overlapping the interval is asking it of *all* live ones: a request's known
time is never before its start (so one that starts after the interval cannot
be unknown in it) and is infinite once it ended (so one that ended before it
cannot either). The earliest known time over the live requests decides for
every interval of every GPU at once, and a lazy heap keeps it: checked at every
sample (800 times a second at 8 GPUs and 100 Hz), it no longer scans the
requests in flight.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from sidecar.ledger.requests import INF, Request

__all__ = ["Frontier"]


class Frontier:
    """The least ``known_s`` over the requests in ``live`` (the ledger's own dict).

    Each live request has one entry, keyed by its known time when the entry was last
    looked at: a known time only moves forward, so keys lag behind, never ahead, and a
    top entry whose key is still its request's known time is the true minimum. A token
    event therefore costs nothing here; an entry is brought up to date only when it
    reaches the top.
    """

    def __init__(self, live: Mapping[str, Request]) -> None:
        self._live = live
        self._heap: list[tuple[float, int, Request]] = []
        self._seq = 0

    def started(self, req: Request) -> None:
        """``req`` is live from now on, known through ``req.known_s`` (its start)."""
        self._seq += 1
        heapq.heappush(self._heap, (req.known_s, self._seq, req))

    def earliest_s(self) -> float:
        """The earliest time some live request is known through (``INF``: none waits)."""
        heap, live = self._heap, self._live
        while heap:
            key_s, seq, req = heap[0]
            known_s = req.known_s
            if known_s == key_s:
                if live.get(req.id) is req:
                    return key_s
                heapq.heappop(heap)  # left the ledger before it ended (never in practice)
            elif known_s < INF and live.get(req.id) is req:
                heapq.heapreplace(heap, (known_s, seq, req))  # moved on: its key catches up
            else:
                heapq.heappop(heap)  # ended: it waits for nothing more
        return INF
