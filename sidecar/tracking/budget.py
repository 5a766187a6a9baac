"""One budget for every byte the proxy holds in order to parse it.

Request bodies read before forwarding and response bytes buffered for
parsing, across all requests in flight, draw on the same budget. A request
that finds it spent is not refused: its bytes stream through unparsed (still
counted, still byte-exact), so memory stays bounded however many large
requests arrive at once.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_PARSE_BUDGET_BYTES", "ParseBudget"]

DEFAULT_PARSE_BUDGET_BYTES: Final = 64 << 20
"""64 MiB: with the 1 MiB per-body cap, 64 large bodies parsed at once; the rest pass through."""


class ParseBudget:
    """A counter of bytes held, with a ceiling; single-threaded (the event loop's)."""

    __slots__ = ("_held", "limit_bytes", "refused")

    def __init__(self, limit_bytes: int = DEFAULT_PARSE_BUDGET_BYTES) -> None:
        self.limit_bytes = max(limit_bytes, 0)
        self._held = 0
        self.refused = 0  # times a reservation was refused: bytes that streamed unparsed

    @property
    def held_bytes(self) -> int:
        return self._held

    def take(self, n_bytes: int) -> bool:
        """Reserve ``n_bytes``; ``False`` (nothing reserved) when they do not fit."""
        if n_bytes <= 0:
            return True
        if self._held + n_bytes > self.limit_bytes:
            self.refused += 1
            return False
        self._held += n_bytes
        return True

    def give(self, n_bytes: int) -> None:
        """Return bytes reserved with :meth:`take`."""
        if n_bytes > 0:
            self._held = max(self._held - n_bytes, 0)
