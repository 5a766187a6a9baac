"""A bare relay on asyncio protocols with httptools framing: the other candidate data plane.

``python -m bench.bare_relay UPSTREAM_PORT PORT [uvloop]``. No metering, no
aiohttp: each client connection is parsed by llhttp (``httptools``, the parser
uvicorn uses) and paired with one keep-alive upstream connection, opened on its
first request; request and response bytes are re-framed, never buffered whole
(content-length bodies pass as they are, chunked ones are re-chunked piece by
piece), and a client that reads slowly pauses the upstream. It is a
measurement, beside ``bench/bare_proxy.py`` (the aiohttp floor): what a relay
costs when the per-request objects of a full HTTP framework are not made. It
handles what the benchmark sends (no upgrades, no pipelining, no 100-continue).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Final, cast

import httptools

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, answering into one client connection."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[bytes] = []
        self.chunked = False
        self.head = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.client.fail()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client.upstream_lost()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers = []
        self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True
        if low not in HOP_BY_HOP or low == b"content-length":
            self.headers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"OK")), *self.headers]
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        head.append(b"\r\n")
        self.client.write(b"".join(head))

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.client.write(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self.client.write(body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.client.write(b"0\r\n\r\n")
        self.client.answered()


_REASONS: Final = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Server Error"}


class Client(asyncio.Protocol):
    """One client connection: requests parsed by llhttp and written to the paired upstream."""

    def __init__(self, upstream_addr: tuple[str, int]) -> None:
        self.addr = upstream_addr
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []  # request bytes written before the upstream is connected
        self.connecting = False
        self.task: asyncio.Task[None] | None = None  # the connect in progress, kept referenced
        self.url = b""
        self.headers: list[bytes] = []
        self.chunked = False
        self.length: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def pause_writing(self) -> None:  # the client reads slowly: so does the upstream
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.chunked, self.length = b"", [], False, None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low == b"transfer-encoding":
            self.chunked = True
        elif low == b"content-length":
            self.length = value
        if low not in HOP_BY_HOP:
            self.headers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        method = self.parser.get_method()
        head = [
            method,
            b" ",
            self.url,
            b" HTTP/1.1\r\nHost: %s:%d\r\n" % (self.addr[0].encode(), self.addr[1]),
        ]
        head.extend(self.headers)
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        elif self.length is not None:
            head.append(b"Content-Length: " + self.length + b"\r\n")
        head.append(b"\r\n")
        self.send(b"".join(head))

    def on_body(self, body: bytes) -> None:
        self.send(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.send(b"0\r\n\r\n")
        if self.transport is not None:
            self.transport.pause_reading()  # one request at a time: no pipelining

    # plumbing
    def send(self, data: bytes) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
            return
        self.pending.append(data)
        if not self.connecting:
            self.connecting = True
            self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: Upstream(self), *self.addr)
        except OSError:
            self.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            self.answered()
            return
        finally:
            self.connecting = False
        self.upstream = up
        if up.transport is not None:
            up.transport.write(b"".join(self.pending))
        self.pending = []

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def answered(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def upstream_lost(self) -> None:
        self.upstream = None

    def fail(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def main(upstream_port: int, port: int) -> None:
    loop = asyncio.get_running_loop()
    addr = ("127.0.0.1", upstream_port)
    server = await loop.create_server(lambda: Client(addr), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[3:] == ["uvloop"]:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
