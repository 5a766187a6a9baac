"""The relay data plane (``--data-plane relay``) where it differs from aiohttp's: the wire itself.

The proxy's behaviour on the relay is pinned by the rig tests run with
``LLM_ENERGY_TEST_DATA_PLANE=relay`` (test_proxy*.py, test_receipts.py); here
are the framing and connection cases those do not reach: keep-alive reuse,
chunked uploads, HTTP/1.0, pipelining, close-delimited and cut upstream
bodies, timeouts, 502, long headers, and the process started with the flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from procs import free_port, start_simulated, wait_http
from pydantic import ValidationError
from test_proxy import ClientFactory, Rig, make_rig
from test_relay_client import RelayClient, relay_client
from upstreams import STATE, create_upstream

from sidecar.app import Sidecar
from sidecar.config import Settings
from sidecar.relay.proxy import RelayProxy
from sidecar.relay.server import ClientConnection

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
async def relay(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> AsyncIterator[Rig]:
    async for r in make_rig(aiohttp_server, aiohttp_client, data_plane="relay"):
        yield r


@contextlib.asynccontextmanager
async def relay_to(upstream: str, **settings: Any) -> AsyncIterator[tuple[Sidecar, RelayClient]]:
    """A metered sidecar on the relay in front of ``upstream``, and a client for it."""
    sidecar = Sidecar(
        Settings(upstream=upstream, power_source="simulated", data_plane="relay", **settings),
        env={},
    )
    await sidecar.start()
    client = await relay_client(sidecar)
    try:
        yield sidecar, client
    finally:
        await client.close()
        await sidecar.stop()


async def raw(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Bytes sent on one fresh connection, and everything read back until the proxy closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1) if until_close else reader.read(65536), 10)
    finally:
        writer.close()


def test_setting_selects_the_relay() -> None:
    """`data_plane` accepts aiohttp and relay (default relay) and names itself when wrong."""
    assert Settings(upstream="http://x:1", power_source="simulated").data_plane == "relay"
    plane = Settings(upstream="http://x:1", power_source="simulated", data_plane="aiohttp")
    assert plane.data_plane == "aiohttp"
    with pytest.raises(ValidationError, match="data_plane"):
        Settings(upstream="http://x:1", power_source="simulated", data_plane="nginx")


async def test_rig_runs_on_the_relay(relay: Rig) -> None:
    """The relay rig really is the relay: its proxy is a RelayProxy answering a chat."""
    assert isinstance(relay.sidecar.proxy, RelayProxy)
    r = await relay.proxy.post("/v1/chat/completions", json=CHAT)
    assert r.status == 200
    assert "Content-Length" in r.headers  # a known length passes as is (no re-chunking)
    assert (await r.json())["usage"]["completion_tokens"] == 5


def _peer_app(ports: list[int]) -> web.Application:
    """An upstream whose ``/peer`` notes the client port each request came from."""

    async def peer(request: web.Request) -> web.Response:
        ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/peer", peer)
    return app


async def test_keep_alive_reuses_one_upstream_connection(aiohttp_server: ServerFactory) -> None:
    """Sequential requests from one client ride one upstream connection (the pool keeps it)."""
    ports: list[int] = []
    server = await aiohttp_server(_peer_app(ports))
    async with relay_to(str(server.make_url("/"))) as (_sidecar, client):
        for _ in range(5):
            r = await client.get("/peer")
            assert await r.text() == "ok"
    assert len(ports) == 5
    assert len(set(ports)) == 1


async def test_idle_upstream_connections_expire(aiohttp_server: ServerFactory) -> None:
    """An upstream connection idle past the keep-alive time is closed; the next request opens one."""
    ports: list[int] = []
    server = await aiohttp_server(_peer_app(ports))
    async with relay_to(str(server.make_url("/"))) as (sidecar, client):
        assert (await (await client.get("/peer")).text()) == "ok"
        pool = cast(RelayProxy, sidecar.proxy)._pool
        assert pool is not None
        pool.keepalive_s = 0.0  # every idle connection is now past its time
        pool._sweep()
        assert (await (await client.get("/peer")).text()) == "ok"
    assert len(set(ports)) == 2


async def test_chunked_upload_arrives_whole(relay: Rig) -> None:
    """A request body of unknown length (chunked) streams through unchanged."""
    parts = [os.urandom(300_000) for _ in range(7)]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    r = await relay.proxy.post("/upload", data=body())
    whole = b"".join(parts)
    assert await r.json() == {"sha256": hashlib.sha256(whole).hexdigest(), "size": len(whole)}


async def test_http10_client_gets_a_close_delimited_stream(relay: Rig) -> None:
    """An HTTP/1.0 client gets an SSE stream without chunked framing, ended by the close."""
    body = b'{"model": "m1", "messages": [], "stream": true, "max_tokens": 3}'
    port = cast(RelayClient, relay.proxy).port
    out = await raw(
        port,
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body),
    )
    head, _, payload = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert payload.count(b"data: ") == 4
    assert payload.endswith(b"data: [DONE]\n\n")


async def test_pipelined_requests_are_answered_in_order(relay: Rig) -> None:
    """Two requests sent back to back on one connection get two answers, in order."""
    out = await raw(
        cast(RelayClient, relay.proxy).port,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    first, second = out.find(b"\r\n\r\nok"), out.find(b"up 1")
    assert out.count(b"HTTP/1.1 200") == 2
    assert 0 < first < second


async def test_head_request_gets_headers_only(relay: Rig) -> None:
    """A HEAD answer carries no body, and the connection stays usable."""
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.head(relay.proxy.make_url("/health")) as r:
                assert r.status == 200
                assert await r.read() == b""
        async with session.get(relay.proxy.make_url("/health")) as r:
            assert await r.text() == "ok"


async def _raw_upstream(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> Any:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await answer(writer)

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_close_delimited_upstream_body_arrives_whole() -> None:
    """An upstream answer with neither Content-Length nor chunked ends at its close, all of it."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        for word in (b"hello ", b"close ", b"delimited"):
            writer.write(word)
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    server = await _raw_upstream(answer)
    port = server.sockets[0].getsockname()[1]
    async with server, relay_to(f"http://127.0.0.1:{port}") as (_sidecar, client):
        r = await client.get("/anything")
        assert await r.read() == b"hello close delimited"


async def test_upstream_cut_mid_body_cuts_the_client_and_counts_error() -> None:
    """An upstream that closes before its Content-Length is reached: the client's body is cut too."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b'Content-Length: 100\r\n\r\n{"partial": ')
        await writer.drain()
        writer.close()

    server = await _raw_upstream(answer)
    port = server.sockets[0].getsockname()[1]
    async with server, relay_to(f"http://127.0.0.1:{port}") as (sidecar, client):
        r = await client.post("/v1/chat/completions", json=CHAT)
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
        assert sidecar.meter is not None
        for _ in range(40):
            if sidecar.meter.in_flight() == {}:
                break
            await asyncio.sleep(0.05)
        assert sidecar.meter.in_flight() == {}


async def test_a_stream_that_came_whole_leaves_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream's whole SSE stream in one read (what a fast server's short answer is):
    head, events and the chunked end go to the client in one write, one send, not a
    send for the events and another for the end; every byte as the upstream sent it."""
    events = [b'data: {"choices": [{"delta": {"content": "w%d"}}]}\n\n' % i for i in range(5)]
    events.append(b"data: [DONE]\n\n")
    body = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + body
        )
        await writer.drain()
        await asyncio.sleep(1)

    writes: list[bytes] = []
    made = ClientConnection.connection_made

    def counted(self: ClientConnection, transport: asyncio.BaseTransport) -> None:
        made(self, transport)
        sent = cast(asyncio.Transport, transport).write

        def write(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            sent(data)

        cast(Any, transport).write = write

    monkeypatch.setattr(ClientConnection, "connection_made", counted)
    server = await _raw_upstream(answer)
    port = server.sockets[0].getsockname()[1]
    async with server, relay_to(f"http://127.0.0.1:{port}") as (_sidecar, client):
        payload = {**CHAT, "stream": True}
        r = await client.post("/v1/chat/completions", json=payload)
        assert await r.read() == b"".join(events)
    answers = [w for w in writes if w.startswith(b"HTTP/1.1 200")]
    assert len(answers) == 1
    assert answers[0].endswith(b"0\r\n\r\n")
    assert len(writes) == 1


async def test_silent_upstream_times_out_mid_stream(aiohttp_server: ServerFactory) -> None:
    """`--upstream-read-timeout` ends a stream whose upstream goes silent; the client sees the cut."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n')
        await asyncio.sleep(5)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stall)
    server = await aiohttp_server(app)
    async with relay_to(str(server.make_url("/")), upstream_read_timeout=0.3) as (_s, client):
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 4)


async def test_upstream_down_gives_502() -> None:
    """No upstream: the same JSON 502 as on aiohttp, counted as an error."""
    async with relay_to("http://127.0.0.1:9", upstream_connect_timeout=1) as (sidecar, client):
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "upstream_unavailable"
        assert sidecar.meter is not None
        assert sidecar.meter.in_flight() == {}


async def test_long_upstream_header_passes_through(aiohttp_server: ServerFactory) -> None:
    """A 9 KB upstream header reaches the client unchanged."""

    async def big(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Big": "a" * 9000})

    app = web.Application()
    app.router.add_get("/big", big)
    server = await aiohttp_server(app)
    async with relay_to(str(server.make_url("/"))) as (_sidecar, client):
        r = await client.get("/big", max_line_size=16384, max_field_size=16384)
        assert r.status == 200
        assert r.headers["X-Big"] == "a" * 9000


async def test_cancelled_stream_counts_its_tokens(relay: Rig) -> None:
    """A client leaving mid-stream stops the upstream at once and its streamed tokens count."""
    body = {**CHAT, "model": "slow", "stream": True, "max_tokens": 1000, "delay": 0.02}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(relay.proxy.make_url("/v1/chat/completions"), json=body)
        got = b""
        while got.count(b"data: ") < 10:
            got += await resp.content.readany()
        resp.close()
    for _ in range(100):
        cancelled = await relay.value(
            "llm_energy_requests_total", model="slow", endpoint="chat", status="cancelled"
        )
        if cancelled == 1 and relay.upstream[STATE].get("streams_open") == 0:
            break
        await asyncio.sleep(0.05)
    assert cancelled == 1
    assert relay.upstream[STATE].get("streams_open") == 0
    assert await relay.value("llm_energy_tokens_total", model="slow", kind="completion") >= 10


async def test_process_with_the_flag_relays_and_stops_on_sigterm(
    aiohttp_server: ServerFactory,
) -> None:
    """`run --data-plane relay` serves streams and counts them; SIGTERM with grace 0 ends it."""
    upstream = await aiohttp_server(create_upstream())
    port, mport = free_port(), free_port()
    proc = start_simulated(
        str(upstream.make_url("/")), port, mport, "--data-plane", "relay", "--grace-period", "0"
    )
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json={**CHAT, "stream": True}) as r:
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
            text = await (await session.get(f"http://127.0.0.1:{mport}/metrics")).text()
            assert 'llm_energy_requests_total{endpoint="chat",model="m1",status="ok"} 1.0' in text
            slow = {**CHAT, "model": "slow", "stream": True, "max_tokens": 60, "delay": 0.5}
            async with session.post(url, json=slow) as r:
                await r.content.readany()
                proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.to_thread(proc.wait, 8)
                except subprocess.TimeoutExpired:
                    code = None
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_hundreds_of_large_requests_stay_bounded_on_the_relay(
    aiohttp_server: ServerFactory,
) -> None:
    """test_proxy_memory's 300 concurrent ~1 MiB requests through the relay: all answered, < 256 MiB."""
    from test_proxy_memory import CONCURRENT, LIMIT_MIB, bodies, held_upstream, peak_rss_mib

    upstream = await aiohttp_server(held_upstream(CONCURRENT))
    port, mport = free_port(), free_port()
    proc = start_simulated(
        str(upstream.make_url("/")), port, mport, "--log-level", "warning", "--data-plane", "relay"
    )
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        chat, embed = bodies()
        timeout = aiohttp.ClientTimeout(total=300)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one(i: int) -> tuple[int, bytes]:
                path, data = ("/v1/chat/completions", chat) if i % 2 else ("/v1/embeddings", embed)
                headers = {"Content-Type": "application/json"}
                async with session.post(
                    f"http://127.0.0.1:{port}{path}", data=data, headers=headers
                ) as r:
                    return r.status, await r.read()

            results = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
        peak = peak_rss_mib(proc.pid)
        print(f"relay sidecar VmHWM: {peak:.1f} MiB peak")
        assert all(status == 200 for status, _ in results)
        assert all(b"[DONE]" in body for i, (_, body) in enumerate(results) if i % 2)
        assert peak < LIMIT_MIB
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_relay_proxy_also_serves_an_aiohttp_front(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    """With the relay selected, `Sidecar.proxy_app()` (aiohttp) still proxies, byte for byte."""
    server = await aiohttp_server(create_upstream())
    sidecar = Sidecar(
        Settings(upstream=str(server.make_url("/")), power_source="simulated", data_plane="relay"),
        env={},
    )
    await sidecar.start()
    try:
        assert isinstance(sidecar.proxy, RelayProxy)
        front = await aiohttp_client(sidecar.proxy_app())
        body = {**CHAT, "stream": True}
        async with (
            aiohttp.ClientSession() as direct,
            direct.post(server.make_url("/v1/chat/completions"), json=body) as d,
        ):
            expected = await d.read()
        r = await front.post("/v1/chat/completions", json=body)
        assert await r.read() == expected
        r = await front.post("/v1/chat/completions", json=CHAT)
        assert (await r.json())["usage"]["completion_tokens"] == 5
    finally:
        await sidecar.stop()


async def test_oversized_request_head_is_refused(relay: Rig) -> None:
    """A request head past the relay's bound gets a 431 and the connection closes (no unbounded hold)."""
    from sidecar.relay.server import MAX_HEAD_BYTES

    huge = b"X-Pad: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n"
    out = await raw(
        cast(RelayClient, relay.proxy).port, b"GET /health HTTP/1.1\r\n" + huge + b"\r\n"
    )
    assert out.startswith(b"HTTP/1.1 431 ")


async def test_idle_client_connections_are_closed(
    relay: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client connection with no request in progress is closed once idle past the keep-alive time."""
    import sidecar.relay.server as server

    monkeypatch.setattr(server, "KEEPALIVE_S", 0.05)
    monkeypatch.setattr(server, "SWEEP_S", 0.05)
    client = cast(RelayClient, relay.proxy)
    assert client.server._sweeper is not None
    client.server._sweeper.cancel()
    client.server._sweep()  # the sweep re-arms itself at the patched period from here
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the relay
    finally:
        writer.close()


async def test_expect_100_continue_gets_its_interim_answer(relay: Rig) -> None:
    """A client that waits for `100 Continue` gets it, sends its body, and the upload arrives."""
    body = os.urandom(50_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", cast(RelayClient, relay.proxy).port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        answer = await asyncio.wait_for(reader.readexactly(length), 5)
        assert hashlib.sha256(body).hexdigest().encode() in answer
    finally:
        writer.close()


async def test_many_clients_leaving_leave_nothing_behind(relay: Rig) -> None:
    """100 streams, every other one cut by its client: the rest arrive whole, and afterwards no
    request is in flight, the parse budget is all back and no client connection is left open."""
    proxy = relay.sidecar.proxy
    assert proxy is not None
    assert relay.sidecar.meter is not None
    body = {**CHAT, "model": "c", "stream": True, "max_tokens": 20, "delay": 0.01}
    async with relay.direct.post("/v1/chat/completions", json=body) as d:
        expected = await d.read()

    async def one(i: int) -> bytes | None:
        async with aiohttp.ClientSession() as session:
            r = await session.post(relay.proxy.make_url("/v1/chat/completions"), json=body)
            if i % 2:
                await r.content.readany()
                r.close()
                return None
            return await r.read()

    results = await asyncio.gather(*(one(i) for i in range(100)))
    assert all(r == expected for r in results if r is not None)
    server = cast(RelayClient, relay.proxy).server
    for _ in range(200):
        if proxy.inflight == 0 and not server.conns and relay.sidecar.meter.in_flight() == {}:
            break
        await asyncio.sleep(0.05)
    assert proxy.inflight == 0
    assert proxy.budget.held_bytes == 0
    assert relay.sidecar.meter.in_flight() == {}
    assert not server.conns
