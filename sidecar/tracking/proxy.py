"""The reverse proxy: every request passes through, byte for byte, and is metered.

Bodies stream both ways without being held whole; the upstream client never
decompresses, so a gzip body reaches the client exactly as the server sent
it. Only JSON request bodies up to :data:`MAX_PARSED_BODY` are read before
forwarding (to learn the model and whether the reply streams), and only while
the shared :class:`ParseBudget` has room; response bytes go to a protocol
tracker that counts tokens as they pass, within the same budget. Whatever is
not read streams through aiohttp's bounded buffers (flow control, socket
reads of :data:`READ_BYTES`), so a large request in flight costs its
connection's buffers (a few hundred KiB), never its whole body. Every
metering call is wrapped: a fault there is logged and counted, and the
user's request goes on.

Usage injection (on by default) asks OpenAI-compatible streams for their
usage chunk and strips it, with the ``"usage": null`` members an upstream
adds only because it was asked, so the client gets the bytes it would have
got. Whether an upstream writes ``"usage": null`` unasked (SGLang does, vLLM
does not) is learned: an injected stream without any such member settles it
(vLLM: exact from the first request); one with them is ambiguous (OpenAI's
API writes them only when asked, SGLang always), so they are removed, as the
OpenAI documentation says they come from the asking, and the next stream goes
as is to find out. An upstream that refuses ``stream_options`` (a 4xx that
names it, before any byte reached the client) gets the original body at
once, and injection stops for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.ledger import Status
from sidecar.meter import Meter
from sidecar.tracking.budget import ParseBudget
from sidecar.tracking.held_body import Held, OneShot
from sidecar.tracking.protocols import (
    RequestInfo,
    ResponseTracker,
    classify,
    inject_include_usage,
    parse_request,
)
from sidecar.tracking.receipts import receipt_hold, small_reads
from sidecar.tracking.tenant import TenantLabels

log = structlog.get_logger("sidecar.proxy")

MAX_PARSED_BODY: Final = 1 << 20
"""Request bodies larger than this stream through unparsed (prompt estimated from length)."""
ERROR_PEEK: Final = 64 << 10
READ_BYTES: Final = 64 << 10
"""Largest socket read per client connection (asyncio's default is 256 KiB): with hundreds of
large uploads in flight, each connection's read and write buffers are what memory is made of."""
"""How much of a 4xx answer to an injected body is read to look for ``stream_options``."""
TOKEN_PERIOD_S: Final = 0.1
"""How often a stream's token count goes to the meter, by default (the sidecar passes its
sampling period): the ledger shares a sample's energy by the tokens of its period, so one
hand-over a period, at the time of its last chunk, loses only where in the period each came."""
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)


def _forwardable(
    headers: CIMultiDictProxy[str], *, drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones, including those the Connection header names."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        low = key.lower()
        if low in HOP_BY_HOP or low in named or low in drop:
            continue
        out.add(key, value)
    return out


class Proxy:
    """Forwards to one upstream and tells the meter what happened."""

    response_class: Callable[..., Any] = web.StreamResponse  # the relay's differs (sidecar/relay)

    def __init__(
        self,
        meter: Meter,
        upstream: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        inject_usage: bool = True,
        budget: ParseBudget | None = None,
        tenants: TenantLabels | None = None,
        clock: Callable[[], float] = time.monotonic,
        token_period_s: float = TOKEN_PERIOD_S,
        receipts: bool = False,
    ) -> None:
        self._meter, self._receipts = meter, receipts
        self._token_period_s = token_period_s
        self._upstream = upstream.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout_s,
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        )
        self._inject_usage = inject_usage
        self.null_usage_unasked: bool | None = None
        self._calibrate = False  # an injected stream had nulls: send the next one as is
        self._budget_logged = False
        self._fingerprint: str | None = None  # vLLM's system_fingerprint, from a usage chunk
        """Whether the upstream writes ``"usage": null`` in chunks unasked; ``None``: not seen yet."""
        self.budget = budget if budget is not None else ParseBudget()
        self._tenants = tenants
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self.inflight = 0

    @property
    def injecting(self) -> bool:
        """Whether usage injection is on for this upstream (it stops if the upstream refuses)."""
        return self._inject_usage

    async def start(self) -> None:
        small_reads(READ_BYTES)
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=60.0, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=self._timeout,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            # servers send long headers (trace ids, cookies); the proxy must not refuse them
            max_line_size=65536,
            max_field_size=65536,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Proxy.start() was not awaited")
        return self._session

    # -------------------------------------------------------------- fail-open
    def _safe(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:
            self._meter.tracking_errors += 1
            log.exception("proxy.tracking_failed", step=what)
            return None

    # ---------------------------------------------------------------- handler
    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock()
        endpoint, api = classify(request.method, request.path)
        inference = endpoint != "other"
        held = Held(self.budget)
        try:
            body: bytes | None = None
            length = request.content_length
            if (
                inference
                and api != "none"  # unknown paths: no token information to read
                and length is not None
                and length <= MAX_PARSED_BODY
                and request.body_exists
            ):
                if held.take(length):
                    body = await _read(request)  # not request.read(), which keeps a copy
                else:
                    self._budget_full()
            content_type = request.headers.get("Content-Type")
            info = self._safe(
                "parse_request",
                parse_request,
                endpoint,
                api,
                body if _is_json(content_type) else None,
                content_type,
                path=request.path,
            )
            if inference and info is not None and body is None and length and api != "none":
                info = _with_estimate(info, length)
            tenant: str | None = None
            if inference and self._tenants is not None:
                tenant = self._safe("tenant", self._tenants.candidate, request.headers)
            rid: str | None = None
            if inference:
                rid = self._safe(
                    "start",
                    self._meter.request_started,
                    endpoint,
                    info.model if info is not None else None,
                    info.prompt_tokens_estimate if info is not None else None,
                    arrived,
                )
            held.body = body
            # only a metered request is injected: its tracker is what strips the answer
            if body is not None and rid is not None and self._should_inject(info):
                injected = self._safe(
                    "inject_usage", inject_include_usage, body, streaming_object=True
                )
                if injected is not None and held.take(len(injected)):
                    held.original, held.body = body, injected
                injected = None
            body = None  # from here only `held` refers to it
            self.inflight += 1
            try:
                return await self._forward(request, held, rid, info, tenant)
            finally:
                self.inflight -= 1
        finally:
            held.release()

    def _should_inject(self, info: RequestInfo | None) -> bool:
        """Inject only where the stripped stream is sure to be the one the client would get."""
        return (
            info is not None
            and self._inject_usage
            and info.api == "openai"
            and info.endpoint in ("chat", "completion")
            and info.stream
            and not info.wants_usage
            and (self.null_usage_unasked is not None or not self._calibrate)
        )

    async def _send(
        self,
        request: web.Request,
        body: OneShot | None,
        length: int | None,
        headers: CIMultiDict[str],
    ) -> aiohttp.ClientResponse:
        if length is not None:
            headers["Content-Length"] = str(length)
        data: Any = body if body is not None else (request.content if request.body_exists else None)
        url = self._upstream + request.rel_url.raw_path_qs
        return await self.session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        )

    async def _refused_injection(self, upstream: aiohttp.ClientResponse) -> bytes | None:
        """A 4xx to an injected body: ``None`` if it names ``stream_options``, else its first bytes.

        The bytes read (at most :data:`ERROR_PEEK`) go to the client first, so
        an error about anything else reaches it exactly as sent.
        """
        parts: list[bytes] = []
        size = 0
        while size < ERROR_PEEK:
            part = await upstream.content.read(ERROR_PEEK - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
        peek = b"".join(parts)
        if b"stream_options" in peek and _identity(upstream.headers.get("Content-Encoding")):
            return None
        return peek

    async def _forward(
        self,
        request: web.Request,
        held: Held,
        rid: str | None,
        info: Any,
        tenant: str | None,
    ) -> web.StreamResponse:
        headers = _forwardable(request.headers, drop=frozenset({"host", "content-length"}))
        length = len(held.body) if held.body is not None else request.content_length
        strip_usage = held.original is not None
        status: Status = "ok"
        usage_tokens: tuple[int | None, int | None] = (None, None)
        server_id: str | None = None  # the response's id: the join with the server's trace
        cached: int | None = None  # prompt tokens the server read from its prefix cache
        upstream: aiohttp.ClientResponse | None = None
        counted = 0
        pending = 0  # streamed tokens not handed to the meter yet (one hand-over a period)
        first_at: float | None = None  # the first token's time, told once its chunk is out
        first_prompt: int | None = None
        hand_at: float | None = None  # a period's hand-over is due, at this time
        prefix, metered = b"", rid is not None
        try:
            try:
                upstream = await self._send(request, held.payload(), length, headers)
                if strip_usage and 400 <= upstream.status < 500:
                    peek = await self._refused_injection(upstream)
                    if peek is None:  # the upstream refuses stream_options: send the original
                        refused = upstream.status
                        upstream.release()
                        upstream = None
                        self._stop_injecting(upstream_status=refused)
                        strip_usage = False
                        held.body, held.original = held.original, None
                        length = len(held.body) if held.body is not None else None
                        upstream = await self._send(request, held.payload(), length, headers)
                    else:
                        prefix, strip_usage = peek, False  # another 4xx: to the client as is
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                status = "error"
                log.warning("proxy.upstream_unreachable", error=type(e).__name__, path=request.path)
                return web.json_response(
                    {"error": {"message": "upstream unreachable", "type": "upstream_unavailable"}},
                    status=502,
                )
            finally:
                held.release()  # sent and answered: no resend can need the body now
            if upstream.status >= 400:
                status = "error"
            response: web.StreamResponse = self.response_class(
                status=upstream.status, reason=upstream.reason
            )
            drop = frozenset({"content-length"}) if strip_usage else frozenset()
            response.headers.extend(_forwardable(upstream.headers, drop=drop))
            tracker: ResponseTracker | None = None
            if rid is not None and info is not None:
                tracker = self._safe(
                    "tracker",
                    ResponseTracker,
                    info,
                    upstream.headers.get("Content-Type"),
                    upstream.headers.get("Content-Encoding"),
                    upstream.headers,
                    strip_usage_chunk=strip_usage,
                    keep_null_usage=self.null_usage_unasked is True,
                    fingerprint=self._fingerprint,
                    max_buffer=MAX_PARSED_BODY,
                    budget=self.budget,
                )
            streamed = bool(info is not None and info.stream) or bool(
                tracker is not None and tracker.streaming
            )
            on = self._receipts and rid is not None  # receipts: [DONE] (SSE), or a JSON body, held
            hold = receipt_hold(on, upstream, response, streamed, self.budget)
            try:
                await (response if hold is None else hold).prepare(request)
                first = True
                clock, period = self._clock, self._token_period_s
                due = 0.0  # when the tokens counted since the last hand-over go to the meter
                content = upstream.content
                last = b""  # bytes read after the upstream's end: they go with our end
                chunk = prefix or await content.readany()  # b"" at the end of the body
                while chunk:
                    out = chunk
                    if tracker is not None:
                        try:  # _safe's handling, inline: this runs for every chunk
                            fed = tracker.feed(chunk)
                        except Exception:
                            fed = None
                            self._meter.tracking_errors += 1
                            log.exception("proxy.tracking_failed", step="feed")
                        if fed is not None:
                            out = fed.out
                            if first and streamed:  # the prompt's exact count, if it came
                                first_at, first_prompt = clock(), tracker.prompt_tokens
                            if fed.tokens and streamed:
                                counted += fed.tokens
                                pending += fed.tokens
                                now = clock()
                                if now >= due:  # once a period: the count, at the period's time
                                    hand_at, due = now, now + period
                        elif strip_usage:
                            tracker, out = None, chunk  # tracker broke: pass raw bytes from now on
                    first = False
                    if hold is not None:
                        out = hold.feed(out)
                    elif content.at_eof():  # the upstream has ended: one send, not two
                        last, out = out, b""
                    if out:
                        await response.write(out)
                    # the meter hears of a chunk once it is on its way: its calls never hold
                    # it (bytes after the upstream's end wait for them, to leave with our end)
                    if first_at is not None:
                        self._safe(
                            "first_token", self._meter.first_token, rid, first_at, first_prompt
                        )
                        first_at = None
                    if hand_at is not None:
                        self._safe("tokens", self._meter.tokens_streamed, rid, pending, hand_at)
                        pending, hand_at = 0, None
                    chunk = await content.readany()
                if pending:
                    self._safe("tokens", self._meter.tokens_streamed, rid, pending)
                    pending = 0
                if tracker is not None:  # strip mode holds back an unterminated last event
                    tail = self._safe("flush", tracker.flush)
                    if tail and hold is not None:
                        await response.write(hold.feed(tail))
                    elif tail:
                        last += tail
                if tracker is not None:
                    usage = self._safe("usage", tracker.finish)
                    if usage is not None:
                        # no usage in the stream: its chunks are the best count there is
                        completion = usage.completion_tokens
                        if completion is None and streamed and (usage.token_events or counted):
                            completion = usage.token_events or counted
                        usage_tokens = (usage.prompt_tokens, completion)
                        server_id, cached = usage.response_id, usage.cached_tokens
                        if usage.model and rid is not None:
                            self._safe("model", self._meter.model_learned, rid, usage.model)
                    self._learn_null_usage(info, tracker, strip_usage, upstream.status)
                    if strip_usage and tracker.usage_fingerprint is not None:
                        self._fingerprint = tracker.usage_fingerprint
                if hold is not None and rid is not None:  # the end stays the upstream's last byte
                    waiter = self._meter.watch_receipt(rid)
                    self._finish(rid, status, usage_tokens, server_id, tenant, cached)
                    done, rid = rid, None
                    await hold.end(self._meter, done, waiter, request)
                await response.write_eof(last)
            finally:
                if tracker is not None:
                    self._safe("release", tracker.release)
                if hold is not None:
                    hold.release()
            return response
        except asyncio.CancelledError:
            status = "cancelled"  # the client went away: stop the upstream call now
            raise
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            status = "cancelled"
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            status = "error"  # the upstream failed mid-body: the client sees a cut stream
            log.warning("proxy.upstream_failed", error=type(e).__name__, path=request.path)
            raise
        finally:
            if first_at is not None and rid is not None:  # its chunk's write failed
                self._safe("first_token", self._meter.first_token, rid, first_at, first_prompt)
            if pending and rid is not None:  # cut short: the tokens that did stream
                self._safe("tokens", self._meter.tokens_streamed, rid, pending)
            if usage_tokens == (None, None) and counted:  # cut short: what did stream counts
                usage_tokens = (None, counted)
            if upstream is not None:
                if status == "cancelled" or not upstream.content.at_eof():
                    upstream.close()
                else:
                    upstream.release()
            if rid is not None:
                self._finish(rid, status, usage_tokens, server_id, tenant, cached)
            elif not metered:
                self._safe("other", self._meter.other_request, status)

    def _finish(
        self, rid: str, status: Status, usage: tuple[int | None, int | None],
        server_id: str | None, tenant: str | None, cached: int | None = None,
    ) -> None:  # fmt: skip
        extra: dict[str, Any] = {}
        if server_id is not None:
            extra["server_id"] = server_id
        if cached:
            extra["cached_tokens"] = cached
        if tenant is not None and self._tenants is not None:
            extra["tenant"] = self._safe(
                "tenant_label", self._tenants.label, tenant, ok=status == "ok"
            )
        self._safe("finish", self._meter.request_finished, rid, status, *usage, **extra)

    def _budget_full(self) -> None:
        """Log the first time a body streams unparsed for want of budget (then only count)."""
        if not self._budget_logged:
            self._budget_logged = True
            log.warning(
                "proxy.parse_budget_full",
                limit_bytes=self.budget.limit_bytes,
                action="bodies stream through unparsed while the budget is spent",
            )

    def _stop_injecting(self, *, upstream_status: int) -> None:
        if self._inject_usage:
            self._inject_usage = False
            log.warning(
                "proxy.inject_usage_refused",
                upstream=self._upstream,
                status=upstream_status,
                action="original body resent; injection off for this upstream",
            )

    def _learn_null_usage(
        self, info: Any, tracker: ResponseTracker, injected: bool, status: int
    ) -> None:
        """Whether the upstream writes ``"usage": null`` unasked, from a whole stream.

        A stream sent as is answers it; an injected one only when it had no such
        member (a server that omits them when asked omits them unasked too).
        """
        if not (
            self.null_usage_unasked is None
            and status < 300
            and info is not None
            and info.api == "openai"
            and info.endpoint in ("chat", "completion")
            and info.stream
            and not info.wants_usage
            and tracker.streaming
            and tracker.finish().token_events > 0
        ):
            return
        if not injected:
            self.null_usage_unasked = tracker.null_usage_seen
        elif not tracker.null_usage_seen:
            self.null_usage_unasked = False
        else:
            self._calibrate = True


async def _read(request: web.Request) -> bytes:
    """The whole request body, held only by the caller."""
    parts = [chunk async for chunk in request.content.iter_any()]
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _identity(encoding: str | None) -> bool:
    return not encoding or encoding.strip().lower() == "identity"


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # many clients omit it; parsing is tolerant and cheap under the cap
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or main.endswith("+json")


def _with_estimate(info: Any, length: int) -> Any:
    """A large body streamed unparsed: estimate the prompt from its length (~4 bytes a token)."""
    if info.prompt_tokens_estimate is None:
        return dataclasses.replace(info, prompt_tokens_estimate=max(1, length // 4))
    return info
