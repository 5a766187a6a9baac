"""A bare aiohttp reverse proxy, the sidecar minus metering: the floor of the approach.

``python -m bench.bare_proxy UPSTREAM_PORT PORT [uvloop]``. Same client and
server settings as the sidecar's proxy (keep-alive pool, no decompression,
chunks passed as they come), no parsing, no ledger, no sampler. The gap
between it and the sidecar is what metering costs; the gap between it and
nginx is what Python and aiohttp cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer", "host"}
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def handle(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    async with session.request(
        request.method,
        request.app[UPSTREAM] + request.rel_url.raw_path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                response.headers.add(k, v)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def main(upstream_port: int, port: int) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    app = web.Application(client_max_size=0)
    app[SESSION] = session
    app[UPSTREAM] = f"http://127.0.0.1:{upstream_port}"
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


if __name__ == "__main__":
    if sys.argv[3:] == ["uvloop"]:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
