"""A test client for a proxy served by the relay (aiohttp's TestClient needs an aiohttp app).

``make_rig`` in test_proxy.py uses it when ``LLM_ENERGY_TEST_DATA_PLANE=relay``,
so every rig test runs the same assertions on the relay data plane.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from yarl import URL

from sidecar.relay import listen_relay
from sidecar.relay.server import RelayServer


class RelayClient:
    """The part of aiohttp's TestClient the rig tests use: ``session``, ``make_url``, requests."""

    def __init__(self, server: RelayServer, port: int) -> None:
        self.server, self.port = server, port
        self.session = aiohttp.ClientSession(auto_decompress=False)

    def make_url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}").join(URL(path))

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return self.session.request(method, self.make_url(path), **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    async def close(self) -> None:
        await self.session.close()
        await self.server.cleanup()


async def relay_client(sidecar: Any) -> RelayClient:
    """The sidecar's proxy on the relay, listening on a free local port."""
    server = await listen_relay(
        sidecar, sidecar.settings.model_copy(update={"listen": "127.0.0.1:0"})
    )
    return RelayClient(server, server.port)
