"""The server's traces as a source: each finished request, whole, seconds to minutes late.

A span names the request's scheduling, first token and end, and its exact
tokens; it goes to the join (:mod:`sidecar.sources.join`), which places it in
the ledger's held intervals, merged with the proxy's view of the same request
where the proxy saw it. Traces see nothing live: the in-flight figure comes
from the observer's running count (or the proxy's open requests).
"""

from __future__ import annotations

import structlog

from sidecar.sources.base import Accounts, SourceName
from sidecar.sources.join import ProxySpanJoin
from sidecar.traces.span import RequestSpan

log = structlog.get_logger("sidecar.sources.traces")


class TraceSource:
    """Request spans from the OTLP receiver."""

    name: SourceName = "traces"

    def __init__(self, accounts: Accounts, join: ProxySpanJoin) -> None:
        self._acc = accounts
        self._join = join
        self.spans = 0
        self.duplicates = 0

    def span_finished(self, span: RequestSpan) -> None:
        """One decoded request span; a retried export (same request id and start) counts once."""
        self.spans += 1
        if not self._join.span(span):
            self.duplicates += 1
            log.debug("traces.span_duplicate", request_id=span.request_id)
            return
        self._acc.collect()

    def in_flight(self) -> dict[str, int]:
        return {}

    def tick(self, now_s: float) -> None:
        self._join.tick(now_s)

    def flush(self) -> None:
        self._join.flush()
