"""The reverse proxy: every request passes through, byte for byte, and is metered.

Bodies stream both ways without being held whole; the upstream client never
decompresses, so a gzip body reaches the client exactly as the server sent
it. Only small JSON request bodies are read before forwarding (to learn the
model and whether the reply streams); response bytes go to a protocol
tracker that counts tokens as they pass. Every metering call is wrapped:
a fault there is logged and counted, and the user's request goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.ledger import Status
from sidecar.meter import Meter
from sidecar.tracking.protocols import (
    ResponseTracker,
    classify,
    inject_include_usage,
    parse_request,
)

log = structlog.get_logger("sidecar.proxy")

MAX_PARSED_BODY: Final = 1 << 20
"""Request bodies larger than this stream through unparsed (prompt estimated from length)."""
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

    def __init__(
        self,
        meter: Meter,
        upstream: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        inject_usage: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._meter = meter
        self._upstream = upstream.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout_s,
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        )
        self._inject_usage = inject_usage
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self.inflight = 0

    async def start(self) -> None:
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
        body: bytes | None = None
        length = request.content_length
        small = length is not None and length <= MAX_PARSED_BODY
        if inference and small and request.body_exists:
            body = await request.read()
        info = self._safe(
            "parse_request",
            parse_request,
            endpoint,
            api,
            body if _is_json(request.headers.get("Content-Type")) else None,
            request.headers.get("Content-Type"),
            path=request.path,
        )
        if inference and info is not None and body is None and length:
            info = _with_estimate(info, length)
        strip_usage = False
        if (
            inference
            and info is not None
            and body is not None
            and self._inject_usage
            and api == "openai"
            and info.stream
            and not info.wants_usage
        ):
            injected = self._safe("inject_usage", inject_include_usage, body)
            if injected is not None:
                body, strip_usage = injected, True
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
        self.inflight += 1
        try:
            return await self._forward(request, body, rid, info, strip_usage)
        finally:
            self.inflight -= 1

    async def _forward(
        self,
        request: web.Request,
        body: bytes | None,
        rid: str | None,
        info: Any,
        strip_usage: bool,
    ) -> web.StreamResponse:
        headers = _forwardable(request.headers, drop=frozenset({"host", "content-length"}))
        if body is not None:
            headers["Content-Length"] = str(len(body))
        elif request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        data: Any = body if body is not None else (request.content if request.body_exists else None)
        url = self._upstream + request.rel_url.raw_path_qs
        status: Status = "ok"
        usage_tokens: tuple[int | None, int | None] = (None, None)
        upstream: aiohttp.ClientResponse | None = None
        counted = 0
        try:
            try:
                upstream = await self.session.request(
                    request.method, url, headers=headers, data=data, allow_redirects=False
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                status = "error"
                log.warning("proxy.upstream_unreachable", error=type(e).__name__, path=request.path)
                return web.json_response(
                    {"error": {"message": "upstream unreachable", "type": "upstream_unavailable"}},
                    status=502,
                )
            if upstream.status >= 400:
                status = "error"
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            drop = frozenset({"content-length"}) if strip_usage else frozenset()
            response.headers.extend(_forwardable(upstream.headers, drop=drop))
            tracker = None
            if rid is not None and info is not None:
                tracker = self._safe(
                    "tracker",
                    ResponseTracker,
                    info,
                    upstream.headers.get("Content-Type"),
                    upstream.headers.get("Content-Encoding"),
                    upstream.headers,
                    strip_usage_chunk=strip_usage,
                )
            streamed = bool(info is not None and info.stream) or bool(
                tracker is not None and tracker.streaming
            )
            await response.prepare(request)
            first = True
            async for chunk in _chunks(upstream):
                out = chunk
                if tracker is not None:
                    fed = self._safe("feed", tracker.feed, chunk)
                    if fed is not None:
                        out = fed.out
                        if first and streamed:
                            self._safe("first_token", self._meter.first_token, rid)
                        if fed.tokens and streamed:
                            counted += fed.tokens
                            self._safe("tokens", self._meter.tokens_streamed, rid, fed.tokens)
                    elif strip_usage:
                        tracker, out = None, chunk  # tracker broke: pass raw bytes from now on
                first = False
                if out:
                    await response.write(out)
            if tracker is not None:  # strip mode holds back an unterminated last event
                tail = self._safe("flush", tracker.flush)
                if tail:
                    await response.write(tail)
            await response.write_eof()
            if tracker is not None:
                usage = self._safe("usage", tracker.finish)
                if usage is not None:
                    # no usage in the stream: its chunks are the best count there is
                    completion = usage.completion_tokens
                    if completion is None and streamed and (usage.token_events or counted):
                        completion = usage.token_events or counted
                    usage_tokens = (usage.prompt_tokens, completion)
                    if usage.model and rid is not None and (info is None or not info.model):
                        self._safe("model", self._meter.model_learned, rid, usage.model)
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
            if usage_tokens == (None, None) and counted:  # cut short: what did stream counts
                usage_tokens = (None, counted)
            if upstream is not None:
                if status == "cancelled" or not upstream.content.at_eof():
                    upstream.close()
                else:
                    upstream.release()
            if rid is not None:
                self._safe("finish", self._meter.request_finished, rid, status, *usage_tokens)
            else:
                self._safe("other", self._meter.other_request, status)


async def _chunks(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in upstream.content.iter_any():
        yield chunk


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
