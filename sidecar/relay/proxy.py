"""The metered proxy on the relay's data plane: the same handler, other plumbing.

:class:`RelayProxy` is :class:`sidecar.tracking.proxy.Proxy` with its two
aiohttp ends swapped: requests come from :mod:`sidecar.relay.server` instead
of aiohttp's web server, and go out through :mod:`sidecar.relay.upstream`'s
pool instead of a ``ClientSession``. Everything between (parsing, injection
and its calibration, the response tracker, token hand-overs, receipts,
tenants, budget, fail-open) is ``Proxy.handle``/``_forward`` itself, run on
duck-typed stand-ins for ``web.Request``, ``web.StreamResponse`` and
``ClientResponse`` that carry exactly the members those methods use; so the
two data planes cannot drift apart in behaviour, only in cost.
"""

from __future__ import annotations

from typing import Any, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import split_host_port
from sidecar.relay.server import RelayRequest, RelayResponse, RelayServer
from sidecar.relay.upstream import Body, UpstreamPool
from sidecar.tracking.proxy import Proxy


class RelayProxy(Proxy):
    """A :class:`Proxy` whose requests arrive through a :class:`RelayServer`."""

    response_class = RelayResponse

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool: UpstreamPool | None = None

    async def start(self) -> None:
        await super().start()  # the aiohttp session, for requests from an aiohttp front
        timeout = self._timeout
        self._pool = UpstreamPool(
            self._upstream,
            connect_timeout_s=float(timeout.connect or 0) or 30.0,
            read_timeout_s=float(timeout.sock_read or 0) or 300.0,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        await super().close()

    async def _send(
        self,
        request: web.Request,
        body: Any,
        length: int | None,
        headers: CIMultiDict[str],
    ) -> aiohttp.ClientResponse:
        """The request to the upstream; the answer stands in for aiohttp's ClientResponse.

        A request from an aiohttp front (``Sidecar.proxy_app()``) goes out
        through aiohttp's session, as on the aiohttp data plane.
        """
        if not isinstance(request, RelayRequest):
            return await super()._send(request, body, length, headers)
        if self._pool is None:
            raise RuntimeError("RelayProxy.start() was not awaited")
        relay = request
        if length is not None:
            headers["Content-Length"] = str(length)
        # no local name for the body: this frame must not keep it while the answer is awaited
        answer = await self._pool.request(
            relay.method, relay.raw_path_qs, headers, await _payload(body, relay)
        )
        return cast(aiohttp.ClientResponse, answer)


async def _payload(body: Any, request: RelayRequest) -> Body:
    """The held body (handed over once: it gives its budget back), else the client's stream."""
    if body is not None:
        return b"".join([part async for part in body])
    return request.content if request.body_exists else None


async def listen(proxy_of: Any, listen_at: str, *, grace_s: float = 0.0) -> RelayServer:
    """A relay server on ``listen_at`` (``host:port``) answering with ``proxy_of.proxy``.

    The proxy is looked up per request, so the sidecar's swap from the
    un-metered to the metered proxy reaches the relay as it reaches aiohttp.
    Raises :class:`OSError` if the address cannot be listened on.
    """

    async def handle(request: RelayRequest) -> Any:
        return await proxy_of.proxy.handle(request)

    server = RelayServer(handle, grace_s=grace_s)
    host, port = split_host_port(listen_at)
    await server.start(host or None, port)
    return server
