"""The protocol between activity sources and the accounting.

A source (proxy, observer, traces) reports what it sees through
:class:`Accounts`, the accounting's narrow face: the ledger for energy,
the label budget for names, and the request and token counters. The
accounting asks every source the same three things (:class:`ActivitySource`):
what it has in flight now, to let its own waits expire, and to flush at shutdown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal, Protocol

from sidecar.figures import ModelLabels
from sidecar.ledger import Ledger, Status

SourceName = Literal["proxy", "observer", "traces"]
SOURCE_ORDER: Final[tuple[SourceName, ...]] = ("proxy", "observer", "traces")
"""The order of the ``mode`` label (CONTRACT.md: ``proxy+observer+traces``)."""

Endpoint = Literal[
    "chat", "completion", "responses", "embedding", "pooling", "generate", "unknown", "other"
]
ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    "chat", "completion", "responses", "embedding", "pooling", "generate", "unknown", "other",
)  # fmt: skip


class Accounts(Protocol):
    """What a source may do with the accounting."""

    ledger: Ledger
    models: ModelLabels
    default_model: str
    clock: Callable[[], float]

    def count_finished(
        self,
        model: str,
        endpoint: Endpoint,
        status: Status,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """One finished request for ``requests_total`` and the token counters."""
        ...

    def count_tokens(self, model: str, prompt: int, completion: int, finished: int) -> None:
        """Tokens (and finished requests) known only as totals (the server's counters)."""
        ...

    def set_tenant(self, request_id: str, tenant: str | None) -> None:
        """The showback label of a request whose final figure is still to come."""
        ...

    def collect(self) -> None:
        """Fold what the ledger assigned into the outputs."""
        ...


class ActivitySource(Protocol):
    """One source of request activity."""

    name: SourceName

    def in_flight(self) -> dict[str, int]:
        """Requests this source sees in flight now, by model label."""
        ...

    def tick(self, now_s: float) -> None:
        """Let this source's own waits expire (called about once a second)."""
        ...

    def flush(self) -> None:
        """Shutdown: hand over whatever is still waiting."""
        ...
