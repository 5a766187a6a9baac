"""Where the proxy and the server's traces see the same request: one record of it.

The proxy knows the API, the tenant and the model label the client saw, live;
the span knows the server's exact times (scheduled, first token, end) and
tokens, seconds later. They meet on the server's request id (vLLM: the
response's ``id`` is the span's ``gen_ai.request.id``). The joined request
takes the span's window and tokens and the proxy's labels. A proxied request
whose span has not come by the end of the hold keeps the proxy's own view
(placed while its intervals are still held); a span no proxied request
matches is a request of its own, with endpoint ``unknown``. A server id may come
back for another request (a client that reuses its ``X-Request-Id``): a span and a
proxied request are one only where the proxy's window holds the span's (within
``SLACK_S``), or where one proxied request of that id waits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from sidecar.ledger import Status, computed_prompt
from sidecar.sources.base import Accounts, Endpoint
from sidecar.traces.span import RequestSpan

MARGIN_S: Final = 10.0
"""A proxied request without a span is placed this long before its start leaves the hold."""
SLACK_S: Final = 1.0
"""A span's window (the server's clock, mapped through one wall-clock anchor) and the
proxy's view of the same request meet within this much."""
Window = tuple[float, float]


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
    cached_tokens: int | None = None


class ProxySpanJoin:
    """Joins proxied requests and spans by the server's request id."""

    def __init__(self, accounts: Accounts, hold_s: float) -> None:
        self._accounts = accounts
        self._hold_s = hold_s
        # server id -> (deadline, view) of each proxied request waiting for its span
        self._waiting: dict[str, list[tuple[float, ProxiedView]]] = {}
        # server id -> windows of spans or proxied views placed alone: the other half of
        # the same request (a proxy end after its span, a span after the hold) adds nothing
        self._alone: dict[str, list[tuple[Window, bool]]] = {}  # (window, whether a span's)
        self._alone_order: deque[tuple[float, str, tuple[Window, bool]]] = deque()
        self.joined = 0
        self.proxy_only = 0

    def pending(self) -> int:
        """Proxied requests waiting for their span."""
        return sum(len(v) for v in self._waiting.values())

    def proxied(self, view: ProxiedView) -> None:
        """The proxy saw a request end: wait for its span, or place its own view."""
        sid = view.server_id
        if sid is None:
            self._place_view(view)
            return
        if self._placed_alone(sid, (view.start_s, view.end_s), span=False):
            return  # the span came first: it is placed; the proxy adds nothing
        deadline = max(view.end_s, view.start_s + self._hold_s - MARGIN_S)
        self._waiting.setdefault(sid, []).append((deadline, view))

    def span(self, span: RequestSpan) -> bool:
        """A span arrived: joined with its proxied request if one waits, else on its own.
        False for a duplicate (a retried export)."""
        sid, window = span.request_id, (span.arrival_s, span.end_s)
        view = self._match(sid, window)
        acc = self._accounts
        if view is None:
            if self._placed_alone(sid, window, span=True):
                return False  # its proxied request was placed on its own: counted once
            label = acc.models(span.model or acc.default_model)  # the server served it
            placed = self._place(span, label, "unknown", "ok", None)
            if placed:
                self._remember(sid, window, span=True)
            return placed
        self.joined += 1
        heard = (view.start_s, view.end_s)  # the proxy counted it queued and to its last byte
        return self._place(span, view.model, view.endpoint, view.status, view.tenant, heard)

    def tick(self, now_s: float) -> None:
        """Proxied requests whose span did not come in time keep the proxy's view."""
        for sid, entries in list(self._waiting.items()):
            due = [view for deadline, view in entries if deadline <= now_s]
            if not due:
                continue
            kept = [e for e in entries if e[0] > now_s]
            if kept:
                self._waiting[sid] = kept
            else:
                del self._waiting[sid]
            for view in due:
                self._place_view(view)
        keep = now_s - 2.0 * self._hold_s
        while self._alone_order and self._alone_order[0][0] < keep:
            _, sid, entry = self._alone_order.popleft()
            alone = self._alone.get(sid)
            if alone is not None and entry in alone:
                alone.remove(entry)
                if not alone:
                    del self._alone[sid]

    def flush(self) -> None:
        for entries in list(self._waiting.values()):
            for _, view in entries:
                self._place_view(view)
        self._waiting.clear()

    # --------------------------------------------------------------- internals
    def _match(self, sid: str, window: Window) -> ProxiedView | None:
        """The waiting proxied request of this id whose window holds the span's (the
        nearest end where the id was reused while both waited), or the only one that
        waits (a clock that moved since start); it stops waiting."""
        entries = self._waiting.get(sid)
        if not entries:
            return None
        near = [
            (abs(v.end_s - window[1]), i)
            for i, (_, v) in enumerate(entries)
            if _holds((v.start_s, v.end_s), window)
        ]
        if not near and len(entries) == 1:
            near = [(0.0, 0)]
        if not near:
            return None
        _, i = min(near)
        view = entries.pop(i)[1]
        if not entries:
            del self._waiting[sid]
        return view

    def _placed_alone(self, sid: str, window: Window, *, span: bool) -> bool:
        """Whether the other half of this request (``window``: a span's, or a proxied
        request's) was placed on its own already."""
        for other, other_is_span in self._alone.get(sid, ()):
            if other_is_span != span and (
                _holds(window, other) if other_is_span else _holds(other, window)
            ):
                return True
        return False

    def _remember(self, sid: str, window: Window, *, span: bool) -> None:
        entry = (window, span)
        self._alone.setdefault(sid, []).append(entry)
        self._alone_order.append((self._accounts.clock(), sid, entry))

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
            prefill = (computed_prompt(view.prompt_tokens, view.cached_tokens) or 0) * ratio
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
            cached_tokens=view.cached_tokens,
            endpoint=view.endpoint,
            status=view.status,
        )
        if placed:
            self.proxy_only += 1
            if view.server_id is not None:
                self._remember(view.server_id, (view.start_s, view.end_s), span=False)
            acc.set_tenant(rid, view.tenant)
            acc.count_finished(
                view.model, view.endpoint, view.status, view.prompt_tokens, view.completion_tokens
            )


def _holds(proxied: Window, span: Window) -> bool:
    """Whether a proxied request's window holds a span's (the proxy sees a request from
    before the server does to after), within ``SLACK_S``."""
    return proxied[0] - SLACK_S <= span[0] and span[1] <= proxied[1] + SLACK_S
