"""The client side of the relay: connections parsed by llhttp, one handler task per request.

A :class:`RelayRequest` and :class:`RelayResponse` carry what the proxy's
handler uses of aiohttp's ``web.Request`` and ``web.StreamResponse`` (see
:mod:`sidecar.relay.proxy`), and nothing else: no router, no middleware, no
per-request objects beyond these two and the body stream. Requests on one
connection are answered in order (pipelined ones wait their turn, reading
paused). A response without Content-Length goes chunked to an HTTP/1.1 client
and close-delimited to an HTTP/1.0 one. A client that goes away cancels its
request's handler, as aiohttp's ``handler_cancellation`` does, so the upstream
call stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast
from urllib.parse import unquote

import httptools
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.relay.streams import BodyStream
from sidecar.relay.upstream import header_lines

log = structlog.get_logger("sidecar.relay")

Handler = Callable[["RelayRequest"], Awaitable[Any]]
MAX_QUEUED: Final = 2
MAX_HEAD_BYTES: Final = 256 << 10
"""A request line and headers larger than this are refused (431): they would be held whole."""
KEEPALIVE_S: Final = 75.0
"""An idle client connection (no request in progress) is closed after this, as aiohttp's server does."""
SWEEP_S: Final = 15.0
"""Pipelined requests parsed ahead of the one being answered before the connection stops reading."""


class RelayRequest:
    """One request's head and body stream: what the proxy's handler reads of it."""

    __slots__ = (
        "body_exists",
        "conn",
        "content",
        "content_length",
        "continue_100",
        "headers",
        "keep_alive",
        "method",
        "path",
        "raw_path_qs",
        "version_10",
    )

    def __init__(
        self,
        conn: ClientConnection,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        *,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        version_10: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.raw_path_qs = target
        path = target.split("?", 1)[0]
        self.path = unquote(path) if "%" in path else path
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(headers)
        self.content_length = content_length
        self.body_exists = chunked or bool(content_length)
        self.keep_alive, self.version_10 = keep_alive, version_10
        self.continue_100 = False  # the client waits for "100 Continue" before its body
        self.content = BodyStream(conn.loop, conn.body_full, conn.body_read)
        if not self.body_exists:
            self.content.feed_eof()


class RelayResponse(web.StreamResponse):
    """A response written as the handler goes: head with the first bytes, then the body framed.

    Prepared on a :class:`RelayRequest` it writes to the relay's connection;
    prepared on an aiohttp request (``Sidecar.proxy_app()``, which embedders
    and tests mount) it is the ``web.StreamResponse`` it derives from, so
    one proxy serves both fronts.
    """

    def __init__(self, *, status: int = 200, reason: str | None = None) -> None:
        super().__init__(status=status, reason=reason)
        self._conn: ClientConnection | None = None
        self._head = b""  # written with the first body bytes (one send, as aiohttp does)
        self._chunked = False
        self._no_body = False
        self._remaining: int | None = None  # Content-Length bytes still to write
        self._done = False

    async def prepare(self, request: Any) -> Any:
        if not isinstance(request, RelayRequest):
            return await super().prepare(request)
        if self._conn is not None:
            return None
        conn = request.conn
        self._conn = conn
        status, headers = self.status, self.headers
        length = headers.get("Content-Length")
        self._no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        if length is not None:
            try:
                self._remaining = int(length)
            except ValueError:
                self._remaining = None
                conn.keep_alive = False
        elif not self._no_body:
            if request.version_10:
                conn.keep_alive = False  # close-delimited: the end is the close
            else:
                self._chunked = True
        if not request.keep_alive:
            conn.keep_alive = False
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, self.reason.encode("latin-1", "replace"))]
        lines.append(header_lines(headers.items()))
        if self._chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if not conn.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif request.version_10:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self._head = b"".join(lines)
        return None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        conn = self._conn
        if conn is None:
            await super().write(data)
            return
        if not data or self._no_body:
            return
        if self._remaining is not None:
            self._remaining -= len(data)
        out = bytes(data)
        if self._chunked:
            out = b"%x\r\n%b\r\n" % (len(out), out)
        if self._head:
            out, self._head = self._head + out, b""
        transport = conn.transport  # conn.send, inline: this runs for every chunk
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client connection lost")
        conn.wrote = True
        transport.write(out)
        if conn.paused:
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        conn = self._conn
        if conn is None:
            await super().write_eof(data)
            return
        if self._done:
            if data:
                await self.write(data)
            return
        self._done = True
        tail = b"0\r\n\r\n" if self._chunked else b""
        if data and not self._no_body:  # the last bytes and the end in one send
            if self._remaining is not None:
                self._remaining -= len(data)
            tail = (b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else bytes(data)) + tail
        if self._head:
            tail, self._head = self._head + tail, b""
        if tail:
            conn.send(tail)
        if self._remaining:  # fewer bytes than announced: only a close tells the client
            conn.keep_alive = False
        if conn.paused:
            await conn.drain()


class ClientConnection(asyncio.Protocol):
    """One client connection: parse, queue, hand each request to the handler in turn."""

    def __init__(self, handler: Handler, server: RelayServer) -> None:
        self.handler, self.server = handler, server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[RelayRequest] = deque()
        self.task: asyncio.Task[None] | None = None
        self.keep_alive = True
        self.paused = False  # the client reads slowly: writers wait in drain()
        self._drain: asyncio.Future[None] | None = None
        self._full = False  # a body waits unread: stop reading
        self._reading = True
        self._parsing: RelayRequest | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self.idle_since = self.loop.time()
        self.wrote = False  # bytes of the answer in progress went out: a fault can only cut it

    # ------------------------------------------------------------ protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.conns.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(b"501 Not Implemented")  # upgrades (WebSocket) are not relayed
        except httptools.HttpParserError:
            too_big = self._head_bytes > MAX_HEAD_BYTES
            self._refuse(b"431 Request Header Fields Too Large" if too_big else b"400 Bad Request")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.conns.discard(self)
        gone = ConnectionResetError("client connection lost")
        for request in self.queue:
            request.content.set_exception(gone)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: stop the upstream call now
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("client connection lost")
        if self.paused:
            if self._drain is None:
                self._drain = self.loop.create_future()
            await self._drain
            if self.transport is None:
                raise ConnectionResetError("client connection lost")

    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("client connection lost")
        self.wrote = True
        self.transport.write(data)

    # reading stops while a body waits unread or requests queue up ahead
    def body_full(self) -> None:
        self._full = True
        self._flow()

    def body_read(self) -> None:
        self._full = False
        self._flow()

    def _flow(self) -> None:
        want = not self._full and len(self.queue) <= MAX_QUEUED
        if want != self._reading and self.transport is not None:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _refuse(self, status: bytes) -> None:
        if self.transport is not None:
            if self.task is None:  # nothing being answered: say why before closing
                self.transport.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            self.transport.close()

    # --------------------------------------------------- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._grow(len(name) + len(value))

    def _grow(self, n_bytes: int) -> None:
        self._head_bytes += n_bytes
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ValueError("request head too large")  # llhttp stops: a parser error

    def on_headers_complete(self) -> None:
        parser = self.parser
        headers: CIMultiDict[str] = CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in self._headers
        )
        length: int | None = None
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        if not chunked and "Content-Length" in headers:
            length = int(headers["Content-Length"])  # llhttp has checked it is a number
        target = self._url.decode("utf-8", "surrogateescape")
        if not target.startswith("/") and "://" in target:  # absolute form: its path and query
            url = httptools.parse_url(self._url)
            target = (url.path or b"/").decode("utf-8", "surrogateescape")
            if url.query:
                target += "?" + url.query.decode("utf-8", "surrogateescape")
        expect = headers.get("Expect", "").lower() == "100-continue"
        if expect:
            del headers["Expect"]  # answered here when its turn comes, as aiohttp's server does
        request = RelayRequest(
            self,
            parser.get_method().decode("ascii"),
            target,
            headers,
            content_length=length,
            chunked=chunked,
            keep_alive=parser.should_keep_alive(),
            version_10=parser.get_http_version() == "1.0",
        )
        request.continue_100 = expect
        self._parsing = request
        self.queue.append(request)
        self._flow()
        if self.task is None:
            self.task = self.loop.create_task(self._answer(request))

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.content.feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.content.feed_eof()
            self._parsing = None

    # ------------------------------------------------------------ answering
    async def _answer(self, request: RelayRequest) -> None:
        response: Any = None
        self.wrote = False
        try:
            if request.continue_100:
                self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.wrote = False  # an interim answer: the real one is still to come
            response = await self.handler(request)
            if isinstance(response, RelayResponse):
                await response.prepare(request)  # a no-op once prepared
                await response.write_eof()
            else:  # an aiohttp Response made whole by the handler (the proxy's 502)
                await _send_whole(self, request, response)
        except asyncio.CancelledError:
            self._close()
            return
        except Exception as e:
            if self.wrote or isinstance(e, OSError):
                self._close()  # mid-body: only a cut connection tells the client
            else:
                log.exception("relay.handler_failed", path=request.path)
                with contextlib.suppress(OSError):
                    self.keep_alive = False
                    self.send(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")  # fmt: skip
                self._close()
            return
        finally:
            self.task = None
        self._next(request)

    def _next(self, request: RelayRequest) -> None:
        """The answer is out: keep the connection for the next request, or close it."""
        self.queue.popleft()
        self.idle_since = self.loop.time()
        if not self.keep_alive or not request.content.finished or self.server.closing:
            self._close()  # an unread body would be parsed as the next request's: close instead
            return
        self._flow()
        if self.queue:
            self.task = self.loop.create_task(self._answer(self.queue[0]))

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        return self.task is None and not self.queue


async def _send_whole(conn: ClientConnection, request: RelayRequest, response: Any) -> None:
    """An aiohttp ``web.Response`` (status, headers, body bytes) written in one go."""
    body = bytes(response.body or b"")
    out = RelayResponse(status=response.status, reason=response.reason)
    out.headers.extend(response.headers)
    if response.content_type and "Content-Type" not in out.headers:
        out.headers["Content-Type"] = response.content_type
    out.content_length = len(body)
    await out.prepare(request)
    await out.write(body)
    await out.write_eof()


class RelayServer:
    """The listening socket and its connections; ``cleanup`` drains as aiohttp's runner does."""

    def __init__(self, handler: Handler, *, grace_s: float = 0.0) -> None:
        self.handler = handler
        self.grace_s = grace_s
        self.loop = asyncio.get_running_loop()
        self.conns: set[ClientConnection] = set()
        self.closing = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str | None, port: int) -> int:
        """Listen (port 0: any free one); the port listened on."""
        self._server = await self.loop.create_server(
            lambda: ClientConnection(self.handler, self), host, port, backlog=4096
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)
        return self.port

    def _sweep(self) -> None:
        """Close connections idle past :data:`KEEPALIVE_S` (one timer for all, not one each)."""
        stale = self.loop.time() - KEEPALIVE_S
        for conn in list(self.conns):
            if conn.idle and conn.idle_since < stale:
                conn._close()
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    async def cleanup(self) -> None:
        """Stop accepting, close idle connections, let answers finish within the grace period."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.idle:
                conn._close()
        answering = {c.task for c in self.conns if c.task is not None}
        if answering and self.grace_s > 0:
            await asyncio.wait(answering, timeout=self.grace_s)
        for conn in list(self.conns):
            if conn.task is not None:
                conn.task.cancel()
            conn._close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
