"""The proxy as a source: each request it forwards, live, from arrival to last byte.

Alone (or beside the observer), the proxy's requests go to the ledger as they
happen. With traces on, the server's span is the better record of the same
request, so a finished request goes to the join (:mod:`sidecar.sources.join`)
instead, and the proxy's open count stands in for the server's running count
where no observer reports one.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass
from typing import Final, Protocol

from sidecar.figures import OTHER_MODEL
from sidecar.ledger import Status
from sidecar.sources.base import Accounts, Endpoint, SourceName
from sidecar.sources.join import ProxiedView, ProxySpanJoin

RECENT_S: Final = 60.0
"""The proxy counts as seeing the traffic for this long after a request arrived."""


class LoadListener(Protocol):
    """Told of request lifecycle events (the simulated GPU follows proxied load with it)."""

    def started(self, rid: str) -> None: ...
    def streaming(self, rid: str) -> None: ...
    def finished(self, rid: str) -> None: ...


@dataclass(slots=True)
class _Open:
    """A request the proxy is tracking; counters are bumped when it ends."""

    model: str
    """Its label now: provisional until a response confirms it."""
    endpoint: Endpoint
    start_s: float
    tenant: str | None = None
    response_model: str | None = None
    first_token_s: float | None = None


class ProxySource:
    """Request events from the reverse proxy."""

    name: SourceName = "proxy"

    def __init__(
        self,
        accounts: Accounts,
        *,
        join: ProxySpanJoin | None = None,
        report_counts: bool = False,
    ) -> None:
        self._acc = accounts
        self._join = join
        self._report_counts = report_counts
        self.listener: LoadListener | None = None
        self._ids = itertools.count(1)
        # request ids are unique across restarts, so appended --record files attribute cleanly
        self._id_prefix = secrets.token_hex(4)
        self._open: dict[str, _Open] = {}
        self.last_seen_s: float | None = None
        self._count_from_s: float | None = accounts.clock()  # counts cover from the start
        self._peak = 0

    # ------------------------------------------------------------------ events
    def request_started(
        self,
        endpoint: Endpoint,
        model: str | None,
        prompt_tokens: float | None,
        time_s: float | None = None,
        *,
        tenant: str | None = None,
    ) -> str:
        """An inference request arrived (at ``time_s``, default now); returns its id.

        The model label is provisional until the response: a name becomes a label
        only once a successful response confirms it (the response's name preferred).
        """
        acc = self._acc
        rid = f"{self._id_prefix}-r{next(self._ids)}"
        name = model or acc.default_model
        now = acc.clock()
        self.last_seen_s = now
        t = now if time_s is None else time_s
        self._open[rid] = _Open(name, endpoint, t, tenant)
        if tenant is not None and self._join is None:  # joined: the join books it by its final id
            acc.set_tenant(rid, tenant)
        self._peak = max(self._peak, len(self._open))
        if self._count_from_s is None:
            self._count_from_s = t
        if self._join is None:
            provisional = model is None or not acc.models.known(name)
            acc.ledger.start(
                rid, t, model=name, endpoint=endpoint, prompt_tokens=prompt_tokens,
                provisional=provisional,
            )  # fmt: skip
        if self.listener is not None:
            self.listener.started(rid)
        return rid

    def model_learned(self, rid: str, model: str) -> None:
        """The response named the model: it becomes the label if the request succeeds."""
        req = self._open.get(rid)
        if req is not None:
            req.response_model = model

    def first_token(
        self, rid: str, time_s: float | None = None, prompt_tokens: int | None = None
    ) -> None:
        now = self._acc.clock() if time_s is None else time_s
        req = self._open.get(rid)
        if req is not None and req.first_token_s is None:
            req.first_token_s = now
        if self._join is None:
            self._acc.ledger.first_token(rid, now, prompt_tokens=prompt_tokens)
        if self.listener is not None:
            self.listener.streaming(rid)

    def tokens_streamed(self, rid: str, count: int, time_s: float | None = None) -> None:
        if count > 0:
            now = self._acc.clock() if time_s is None else time_s
            req = self._open.get(rid)
            if req is not None and req.first_token_s is None:
                req.first_token_s = now
            if self._join is None:
                self._acc.ledger.tokens(rid, now, count)

    def request_finished(
        self,
        rid: str,
        status: Status,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        *,
        tenant: str | None = None,
        server_id: str | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        """The request ended. ``tenant``, when given, replaces the label given at the
        start; ``server_id`` is the id the server gave it (its response's ``id``);
        ``cached_tokens``: of the prompt, those the server read from its prefix cache."""
        req = self._open.pop(rid, None)
        if req is None:
            return
        acc = self._acc
        if tenant is not None:
            req.tenant = tenant
        label = self._final_label(req, status)
        now = acc.clock()
        if self._join is not None:
            end = max(now, req.start_s)
            view = ProxiedView(
                rid, server_id, label, req.endpoint, status, req.tenant, req.start_s,
                req.first_token_s, end, prompt_tokens, completion_tokens, cached_tokens,
            )  # fmt: skip
            self._join.proxied(view)
        else:
            acc.set_tenant(rid, req.tenant)
            acc.ledger.relabel(rid, label, final=True)
            acc.ledger.finish(
                rid, now, status=status, prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, cached_tokens=cached_tokens,
            )  # fmt: skip
            acc.count_finished(label, req.endpoint, status, prompt_tokens, completion_tokens)
        if self.listener is not None:
            self.listener.finished(rid)
        acc.collect()

    def other_request(self, status: Status) -> None:
        """A non-inference request (health, model list, metrics): counted, holds no energy."""
        acc = self._acc
        acc.count_finished(acc.models(acc.default_model), "other", status, None, None)

    # ------------------------------------------------------------------ source
    def saw_traffic(self) -> bool:
        """Whether the proxy saw an inference request lately (it then sees every one)."""
        last = self.last_seen_s
        return last is not None and self._acc.clock() - last < RECENT_S

    def in_flight(self) -> dict[str, int]:
        """Requests open in the proxy by model; a name no successful response confirmed
        yet counts under ``other``, so the gauge's label values stay bounded."""
        out: dict[str, int] = {}
        for req in self._open.values():
            label = req.model if self._acc.models.known(req.model) else OTHER_MODEL
            out[label] = out.get(label, 0) + 1
        return out

    def tick(self, now_s: float) -> None:
        """With traces on and no observer: the most requests open since the last tick
        is the running count of that stretch (what the held intervals wait to hear from)."""
        if not self._report_counts:
            return
        start = self._count_from_s
        if start is not None and now_s > start:
            self._acc.ledger.running(start, now_s, self._peak)
        self._count_from_s = now_s
        self._peak = len(self._open)

    def flush(self) -> None:
        return None

    # --------------------------------------------------------------- internals
    def _final_label(self, req: _Open, status: Status) -> str:
        """A request that did not fail registers its model's name (the response's name
        first; a client that left did not make the server fail); a failed one (a
        404 for a mistyped name, an upstream down) uses a name only if it is a label
        already, else ``other``, so failures cannot use up the label budget."""
        models = self._acc.models
        name = req.response_model or req.model
        if status != "error":
            return models(name)
        for candidate in (req.response_model, req.model):
            if candidate is not None and models.known(candidate):
                return candidate
        return OTHER_MODEL
