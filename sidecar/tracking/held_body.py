"""A proxied request's parsed body, held only until it is on the wire.

Out of :mod:`sidecar.tracking.proxy` so the handler module stays small; the
proxy is its one user.
"""

from __future__ import annotations

from sidecar.tracking.budget import ParseBudget


class Held:
    """A request's parsed body bytes and their budget; both let go as early as possible.

    Only this object refers to the bodies, so once :meth:`sent` or
    :meth:`release` drops them they are freed, not kept alive by a frame
    waiting for the upstream's answer.
    """

    __slots__ = ("_budget", "body", "n_bytes", "original")

    def __init__(self, budget: ParseBudget) -> None:
        self._budget = budget
        self.n_bytes = 0
        self.body: bytes | None = None  # what goes upstream
        self.original: bytes | None = None  # the client's own body, while a resend may need it

    def take(self, n_bytes: int) -> bool:
        if self._budget.take(n_bytes):
            self.n_bytes += n_bytes
            return True
        return False

    def payload(self) -> OneShot | None:
        """The body as an upload that drops it once handed to the transport."""
        if self.body is None:
            return None
        body, self.body = self.body, None
        return OneShot(body, self)

    def sent(self, n_bytes: int) -> None:
        """The injected body is on the wire: its share of the budget goes back."""
        keep = len(self.original) if self.original is not None else 0
        give = min(n_bytes, max(self.n_bytes - keep, 0))
        self._budget.give(give)
        self.n_bytes -= give

    def release(self) -> None:
        self.body = self.original = None
        self._budget.give(self.n_bytes)
        self.n_bytes = 0


class OneShot:
    """An upload of one bytes object that forgets it once written (aiohttp reads it once)."""

    __slots__ = ("_data", "_held")

    def __init__(self, data: bytes, held: Held) -> None:
        self._data: bytes | None = data
        self._held = held

    def __aiter__(self) -> OneShot:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        self._held.sent(len(data))
        return data
