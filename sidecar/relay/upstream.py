"""Connections to the one upstream: a keep-alive pool, requests out, answers parsed by llhttp.

Each request takes an idle connection (or opens one within the connect
timeout), writes its head and body (a small held body in one write with the
head, a streamed one as it arrives: Content-Length bodies as they are, others
chunked), and gets an :class:`UpstreamResponse` once the status line and
headers are in. The body arrives in a :class:`BodyStream`: Content-Length,
chunked or, without either, up to the connection's close. A connection goes
back to the pool only when its answer was read to the end and both sides
allow keep-alive; anything else closes it. A reused connection that the server
had closed (nothing answered) is retried once on a fresh one when the body can
be sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable
from typing import Final, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.relay.streams import BodyStream

KEEPALIVE_S: Final = 60.0
"""How long an idle upstream connection is kept (aiohttp's connector default is 15 s; ours was 60)."""
RESEND_BYTES: Final = 64 << 10
"""Held bodies up to this size are kept for one resend (a reused connection the server had closed)."""
SWEEP_S: Final = 10.0
MAX_IDLE: Final = 1024
"""Idle connections kept at most; more are closed (a burst's connections mostly return at once)."""


class UpstreamError(ConnectionError):
    """The upstream closed or broke the connection (not a client reset: that is ConnectionResetError)."""


Body = bytes | BodyStream | None


class UpstreamResponse:
    """Status, headers and body of one answer; ``release``/``close`` as aiohttp's ClientResponse."""

    __slots__ = ("_conn", "content", "headers", "reason", "status")

    def __init__(self, conn: _Conn, status: int, reason: str, headers: CIMultiDict[str]) -> None:
        self._conn: _Conn | None = conn
        self.status, self.reason = status, reason
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(headers)
        self.content = conn.body

    def release(self) -> None:
        """Done with the answer: the connection is reused if it was read to its end, else closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


class _Conn(asyncio.Protocol):
    """One upstream connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body = BodyStream(self.loop, self._pause, self._resume, timeout_s=pool.read_timeout_s)
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.head_only = False  # answering a HEAD: no body whatever the headers say
        self.framed = False  # Content-Length or chunked: the close is not the end
        self.complete = False
        self.in_body = False  # the headers are in: the body is what arrives now
        self.got_bytes = False
        self.reusable = False
        self.pump: asyncio.Task[None] | None = None
        self.idle_since = 0.0  # loop time it went back to the pool
        self._drain: asyncio.Future[None] | None = None
        self.uses = 0

    # ------------------------------------------------------------ protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.complete and self.head is None:  # bytes on an idle connection: not ours to reuse
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError("malformed answer from the upstream: " + type(e).__name__))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        self.pool.forget(self)
        if self.head is not None and not self.head.done():
            self._fail(UpstreamError("upstream closed the connection before answering"))
        elif not self.complete and self.in_body:
            if not self.framed:
                self.complete = True  # close-delimited: the close is the end
                self.body.feed_eof()
            else:
                self._fail(UpstreamError("upstream closed the connection mid-body"))
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)  # the writer finds the transport gone and stops

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain
        if self.transport is None:
            raise UpstreamError("upstream connection lost")

    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        else:
            self.body.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # --------------------------------------------------- httptools callbacks
    def on_message_begin(self) -> None:
        self.headers = []
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        low = name.lower()
        if low == b"content-length" or (
            low == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.framed = False
            return  # an interim answer (100 Continue): the real one follows
        headers: CIMultiDict[str] = CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in self.headers
        )
        if self.head_only or status in (204, 304):
            self.head_only = True
        response = UpstreamResponse(self, status, self.reason.decode("latin-1"), headers)
        head, self.head = self.head, None
        self.in_body = True
        if self.head_only:  # no body follows; llhttp cannot be told, so the connection ends here
            self.complete = True
            self.reusable = False
            self.body.feed_eof()
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if not self.head_only:
            self.body.feed(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return
        if self.complete:
            return
        self.complete = True
        self.reusable = self.parser.should_keep_alive()
        self.body.feed_eof()

    # ------------------------------------------------------------ requests
    def begin(self, head_only: bool) -> asyncio.Future[UpstreamResponse]:
        self.uses += 1
        self.head = self.loop.create_future()
        self.head_only, self.framed = head_only, False
        self.complete = self.in_body = False
        self.got_bytes = self.reusable = False
        if self.uses > 1:
            self.body = BodyStream(
                self.loop, self._pause, self._resume, timeout_s=self.pool.read_timeout_s
            )
        return self.head

    def done(self) -> None:
        """The caller is finished with the answer: reuse the connection if it can be."""
        pump = self.pump
        if pump is not None and not pump.done():
            self.reusable = False
        if self.complete and self.reusable and self.transport is not None:
            self.pump = None
            self.pool.put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.reusable = False
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
        self.pump = None
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """The keep-alive connections to one upstream URL (its path is a prefix of every request's)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--upstream: {url!r} is not an http(s) URL")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        default = (self.port == 443) if self.tls else (self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default else f"{host}:{self.port}").encode("idna")
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.keepalive_s = keepalive_s
        self.loop = asyncio.get_running_loop()
        self._ssl = ssl.create_default_context() if self.tls else None
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self, method: str, target: str, headers: CIMultiDict[str], body: Body
    ) -> UpstreamResponse:
        """Send one request; the answer once its headers are in.

        A held body is referred to only until it is written (hundreds of large
        uploads waiting for their answers must not each keep theirs), except
        one small enough to send again on a fresh connection. Raises
        :class:`TimeoutError` (connect or read timeout), :class:`OSError`
        (connection refused and the like) or :class:`UpstreamError`.
        """
        chunked = isinstance(body, BodyStream) and "Content-Length" not in headers
        head = _head(method, self.prefix + target, self.host_header, headers, chunked)
        conn = self._take()
        again = body is None or (isinstance(body, bytes) and len(body) <= RESEND_BYTES)
        resend = body if again else None
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        answer = self._write(conn, method, head, body, chunked)
        body = None
        try:
            return await self._answer(conn, answer)
        except UpstreamError:
            if not (reused and again) or conn.got_bytes:
                raise
        # the server closed the idle connection as it was reused: once more, on a fresh one
        conn = await self._connect()
        return await self._answer(conn, self._write(conn, method, head, resend, chunked))

    def _write(
        self, conn: _Conn, method: str, head: bytes, body: Body, chunked: bool
    ) -> asyncio.Future[UpstreamResponse]:
        answer = conn.begin(head_only=method == "HEAD")
        transport = conn.transport
        if transport is None:
            answer.set_exception(UpstreamError("upstream connection lost"))
        elif isinstance(body, BodyStream):
            transport.write(head)
            conn.pump = self.loop.create_task(_pump(conn, body, chunked))
        elif body is not None and len(body) > RESEND_BYTES:
            transport.write(head)  # no copy of a large body just to join it to its head
            transport.write(body)
        else:
            transport.write(head + body if body else head)
        return answer

    async def _answer(
        self, conn: _Conn, answer: asyncio.Future[UpstreamResponse]
    ) -> UpstreamResponse:
        timer = self.loop.call_later(self.read_timeout_s, _expire, answer)
        try:
            return await answer
        except BaseException:
            conn.abort()
            raise
        finally:
            timer.cancel()

    def _take(self) -> _Conn | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self) -> _Conn:
        async with asyncio.timeout(self.connect_timeout_s):
            _, conn = await self.loop.create_connection(
                lambda: _Conn(self),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self.tls else None,
            )
        self._all.add(conn)
        return conn

    def put_back(self, conn: _Conn) -> None:
        if len(self._idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive time (one timer for the pool, not one each)."""
        self._sweeper = None
        stale = self.loop.time() - self.keepalive_s
        keep: list[_Conn] = []
        for conn in self._idle:
            if conn.idle_since < stale:
                conn.abort()
            else:
                keep.append(conn)
        self._idle = keep
        if keep:
            self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    def forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()


def header_lines(items: Iterable[tuple[str, str]]) -> bytes:
    """The headers' lines on the wire, as one piece (one encode for all, not two a header);
    undecodable bytes go back out as they came (the parsers hand them over surrogate-escaped)."""
    return "".join([f"{name}: {value}\r\n" for name, value in items]).encode(
        "utf-8", "surrogateescape"
    )


def _head(method: str, target: str, host: bytes, headers: CIMultiDict[str], chunked: bool) -> bytes:
    """The request line and headers, Host first (aiohttp's order), then framing for a streamed body."""
    lines = [method.encode("ascii"), b" ", target.encode("utf-8", "surrogateescape")]
    lines.append(b" HTTP/1.1\r\nHost: " + host + b"\r\n")
    lines.append(header_lines(headers.items()))
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


async def _pump(conn: _Conn, body: BodyStream, chunked: bool) -> None:
    """A streamed request body to the upstream as it arrives, paced by the upstream's reads."""
    try:
        while True:
            data = await body.readany()
            transport = conn.transport
            if transport is None:
                return
            if not data:
                if chunked:
                    transport.write(b"0\r\n\r\n")
                return
            transport.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            await conn.drain()
    except OSError:
        conn.abort()  # the client's body broke off: the upstream must not wait for the rest


def _expire(answer: asyncio.Future[UpstreamResponse]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError("upstream read timed out"))
