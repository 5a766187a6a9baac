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
    """The least ``known_s`` over the requests in ``live`` (the ledger's own dict)."""

    def __init__(self, live: Mapping[str, Request]) -> None:
        self._live = live
        self._heap: list[tuple[float, int, Request]] = []
        self._seq = 0

    def moved(self, req: Request) -> None:
        """``req`` started, or its known time moved on (it only ever moves forward)."""
        if req.known_s == INF:
            return  # ended: its old entries go stale, nothing new to wait for
        self._seq += 1
        heapq.heappush(self._heap, (req.known_s, self._seq, req))
        if len(self._heap) > 4 * len(self._live) + 64:  # stale entries piled up: rebuild
            start = self._seq
            self._heap = [
                (r.known_s, start + i, r)
                for i, r in enumerate(self._live.values(), 1)
                if r.known_s < INF
            ]
            self._seq = start + len(self._live)
            heapq.heapify(self._heap)

    def earliest_s(self) -> float:
        """The earliest time some live request is known through (``INF``: none waits)."""
        heap, live = self._heap, self._live
        while heap:
            known_s, _, req = heap[0]
            if req.known_s == known_s and live.get(req.id) is req:
                return known_s
            heapq.heappop(heap)  # stale: the request moved on, ended or left
        return INF
