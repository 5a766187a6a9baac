"""Where the proxy and the server's traces see the same request: one record of it.

The proxy knows the API, the tenant and the model label the client saw, live;
the span knows the server's exact times (scheduled, first token, end) and
tokens, seconds later. They meet on the server's request id (vLLM: the
response's ``id`` is the span's ``gen_ai.request.id``). The joined request
takes the span's window and tokens and the proxy's labels. A proxied request
whose span has not come by the end of the hold keeps the proxy's own view
(placed while its intervals are still held); a span no proxied request
matches is a request of its own, with endpoint ``unknown``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from sidecar.ledger import Status
from sidecar.sources.base import Accounts, Endpoint
from sidecar.traces.span import RequestSpan

MARGIN_S: Final = 10.0
"""A proxied request without a span is placed this long before its start leaves the hold."""


@dataclass(frozen=True, slots=True)
class ProxiedView:
    """A finished request as the proxy saw it."""

    request_id: str  # the proxy's own id
    server_id: str | None  # the response's id, where it named one
    model: str  # its final label
    endpoint: Endpoint
    status: Status
    tenant: str | None
    start_s: float
    first_token_s: float | None
    end_s: float
    prompt_tokens: int | None
    completion_tokens: int | None


class ProxySpanJoin:
    """Joins proxied requests and spans by the server's request id."""

    def __init__(self, accounts: Accounts, hold_s: float) -> None:
        self._accounts = accounts
        self._hold_s = hold_s
        self._waiting: dict[str, tuple[float, ProxiedView]] = {}  # server id -> (deadline, view)
        self._spans: dict[str, float] = {}  # ids of spans placed alone, for a proxy end after them
        self._span_order: deque[tuple[float, str]] = deque()
        self.joined = 0
        self.proxy_only = 0

    def pending(self) -> int:
        """Proxied requests waiting for their span."""
        return len(self._waiting)

    def proxied(self, view: ProxiedView) -> None:
        """The proxy saw a request end: wait for its span, or place its own view."""
        sid = view.server_id
        if sid is None:
            self._place_view(view)
            return
        if sid in self._spans:  # the span came first: it is placed; the proxy adds nothing
            return
        deadline = max(view.end_s, view.start_s + self._hold_s - MARGIN_S)
        self._waiting[sid] = (deadline, view)

    def span(self, span: RequestSpan) -> bool:
        """A span arrived: joined with its proxied request if one waits, else on its own.
        False for a duplicate (a retried export)."""
        entry = self._waiting.pop(span.request_id, None)
        acc = self._accounts
        if entry is None:
            label = acc.models(span.model or acc.default_model)  # the server served it
            placed = self._place(span, label, "unknown", "ok", None)
            if placed:
                now = acc.clock()
                self._spans[span.request_id] = now
                self._span_order.append((now, span.request_id))
            return placed
        view = entry[1]
        self.joined += 1
        heard = (view.start_s, view.end_s)  # the proxy counted it queued and to its last byte
        return self._place(span, view.model, view.endpoint, view.status, view.tenant, heard)

    def tick(self, now_s: float) -> None:
        """Proxied requests whose span did not come in time keep the proxy's view."""
        for sid, (deadline, view) in list(self._waiting.items()):
            if deadline <= now_s:
                del self._waiting[sid]
                self._place_view(view)
        keep = now_s - 2.0 * self._hold_s
        while self._span_order and self._span_order[0][0] < keep:
            self._spans.pop(self._span_order.popleft()[1], None)

    def flush(self) -> None:
        for _, view in list(self._waiting.values()):
            self._place_view(view)
        self._waiting.clear()

    # --------------------------------------------------------------- internals
    def _place(
        self,
        span: RequestSpan,
        model: str,
        endpoint: Endpoint,
        status: Status,
        tenant: str | None,
        heard_s: tuple[float, float] | None = None,
    ) -> bool:
        acc = self._accounts
        placed = acc.ledger.place(
            span.request_id,
            model=model,
            start_s=span.scheduled_s,
            first_token_s=span.first_token_s,
            end_s=span.end_s,
            prompt_tokens=span.prompt_tokens,
            completion_tokens=span.completion_tokens,
            cached_tokens=span.cached_tokens,
            endpoint=endpoint,
            status=status,
            heard_s=heard_s,
        )
        if placed:
            acc.set_tenant(span.request_id, tenant)
            acc.count_finished(model, endpoint, status, span.prompt_tokens, span.completion_tokens)
        return placed

    def _place_view(self, view: ProxiedView) -> None:
        """The proxy's own window and tokens; an unknown first token (a response not
        streamed) splits its time by token work, as the sharing rule weighs it."""
        acc = self._accounts
        first = view.first_token_s
        if first is None:
            ratio = acc.ledger.prefill_fit.ratio
            prefill = (view.prompt_tokens or 0) * ratio
            decode = float(view.completion_tokens or 0)
            share = prefill / (prefill + decode) if prefill + decode > 0 else 1.0
            first = view.start_s + (view.end_s - view.start_s) * share
        rid = view.server_id or view.request_id
        placed = acc.ledger.place(
            rid,
            model=view.model,
            start_s=view.start_s,
            first_token_s=first,
            end_s=view.end_s,
            prompt_tokens=view.prompt_tokens,
            completion_tokens=view.completion_tokens,
            endpoint=view.endpoint,
            status=view.status,
        )
        if placed:
            self.proxy_only += 1
            acc.set_tenant(rid, view.tenant)
            acc.count_finished(
                view.model, view.endpoint, view.status, view.prompt_tokens, view.completion_tokens
            )
