"""Bounded memory: hundreds of concurrent ~1 MiB requests through a real sidecar process.

The sidecar runs as its own process (`python -m sidecar run`, default limits)
in front of a stand-in upstream that holds every request until all have
arrived, so they are truly in flight together. Its peak resident memory
(VmHWM from /proc) must stay under 256 MiB, and every request is answered.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from procs import free_port, start_simulated, wait_http

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

CONCURRENT = 300
BODY_BYTES = 1 << 20  # at the per-body parse cap: each one asks for the budget
LIMIT_MIB = 256


def held_upstream(expected: int) -> web.Application:
    """Reads each body as it streams (keeping none), answers once ``expected`` have arrived."""
    arrived = 0
    everyone = asyncio.Event()

    async def drain(request: web.Request) -> int:
        nonlocal arrived
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        arrived += 1
        if arrived >= expected:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), timeout=120)
        return size

    async def embeddings(request: web.Request) -> web.Response:
        size = await drain(request)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5] * 256}],
                "model": "embedder",
                "usage": {"prompt_tokens": size // 4, "total_tokens": size // 4},
            }
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        size = await drain(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("a", "b", "c"):
            chunk = {"id": "c", "object": "chat.completion.chunk", "model": "chatter",
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}  # fmt: skip
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        usage = {"prompt_tokens": size // 4, "completion_tokens": 3, "total_tokens": 0}
        last = {"id": "c", "object": "chat.completion.chunk", "model": "chatter", "choices": []}
        await resp.write(b"data: " + json.dumps({**last, "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application(client_max_size=4 << 20)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def bodies() -> tuple[bytes, bytes]:
    """One chat and one embedding body of exactly BODY_BYTES (shared by every request)."""

    def sized(text_of: Callable[[str], dict[str, object]]) -> bytes:
        base = len(json.dumps(text_of("")).encode())
        data = json.dumps(text_of("x" * (BODY_BYTES - base))).encode()
        assert len(data) == BODY_BYTES
        return data

    chat = sized(
        lambda text: {
            "model": "chatter",
            "stream": True,
            "messages": [{"role": "user", "content": text}],
        }
    )
    return chat, sized(lambda text: {"model": "embedder", "input": text})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_hundreds_of_large_requests_stay_under_256_mib(
    aiohttp_server: ServerFactory,
) -> None:
    """300 concurrent ~1 MiB chat and embedding requests: all answered, peak RSS < 256 MiB."""
    upstream = await aiohttp_server(held_upstream(CONCURRENT))
    port, mport = free_port(), free_port()
    proc = start_simulated(str(upstream.make_url("/")), port, mport, "--log-level", "warning")
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        before = peak_rss_mib(proc.pid)
        chat, embed = bodies()
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one(i: int) -> tuple[int, bytes]:
                path, data = ("/v1/chat/completions", chat) if i % 2 else ("/v1/embeddings", embed)
                async with session.post(
                    f"http://127.0.0.1:{port}{path}",
                    data=data,
                    headers={"Content-Type": "application/json"},
                ) as r:
                    return r.status, await r.read()

            results = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
            metrics = await (await session.get(f"http://127.0.0.1:{mport}/metrics")).text()
        peak = peak_rss_mib(proc.pid)
        print(f"sidecar VmHWM: {before:.1f} MiB at start, {peak:.1f} MiB peak")  # the bench figure
        assert all(status == 200 for status, _ in results)
        assert all(b"[DONE]" in body for i, (_, body) in enumerate(results) if i % 2)
        assert all(b'"usage"' in body for i, (_, body) in enumerate(results) if not i % 2)
        finished = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("llm_energy_requests_total{") and 'status="ok"' in line
        )
        assert finished == CONCURRENT
        assert peak < LIMIT_MIB
    finally:
        proc.terminate()
        proc.wait(timeout=30)
