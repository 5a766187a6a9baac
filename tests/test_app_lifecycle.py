"""Start-up and shutdown as one exit stack: a failure late in start-up leaks nothing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import sidecar.app as app_module
from sidecar.app import Sidecar
from sidecar.config import Settings
from sidecar.power.base import PowerSource
from sidecar.power.factory import build_source

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
OURS = {"sampler", "ticker", "observer", "carbon-intensity-refresh", "power-source-wait"}


@pytest.fixture
def closed_sources(monkeypatch: pytest.MonkeyPatch) -> list[PowerSource]:
    """Every power source the sidecar builds, recorded when its close() runs."""
    closed: list[PowerSource] = []
    real = build_source

    def build(*args: Any, **kwargs: Any) -> PowerSource:
        source = real(*args, **kwargs)
        close = source.close

        def tracked() -> None:
            close()
            closed.append(source)

        source.close = tracked  # type: ignore[method-assign]
        return source

    monkeypatch.setattr(app_module, "build_source", build)
    return closed


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def _ours_pending() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if not t.done()} & OURS


async def _failing_start(
    sidecar: Sidecar, closed: list[PowerSource], expected: type[BaseException]
) -> None:
    with pytest.raises(expected):
        await sidecar.start()
    await sidecar.stop()  # what serve()'s start-up does after a failure
    await asyncio.sleep(0)
    assert _ours_pending() == set()
    assert len(closed) == 1  # the power source (an NVML handle on a real GPU) is closed
    assert sidecar.proxy is None or sidecar.proxy._session is None
    assert sidecar.observer is None or sidecar.observer._own_session is None
    for session in (sidecar._ready_session, sidecar._carbon_session):
        assert session is None or session.closed
    await sidecar.stop()  # twice is harmless


async def test_a_busy_otlp_port_releases_everything_started_before_it(
    aiohttp_server: ServerFactory, closed_sources: list[PowerSource]
) -> None:
    """--otlp-listen on a port in use fails start-up: the sampler, ticker and observer
    tasks, the proxy's and observer's sessions, and the power source are all released."""
    from upstreams import create_upstream

    upstream = await aiohttp_server(create_upstream())
    sock, port = _busy_port()
    try:
        settings = Settings(
            upstream=str(upstream.make_url("/")),
            observe=str(upstream.make_url("/metrics")),
            otlp_listen=f"127.0.0.1:{port}",
            power_source="simulated",
        )
        sidecar = Sidecar(settings, env={})
        from sidecar.app import StartupError

        await _failing_start(sidecar, closed_sources, StartupError)
        assert sidecar.traces is not None
        assert sidecar.traces._runner is None  # the receiver's runner is cleaned up
    finally:
        sock.close()


async def test_a_failure_at_the_last_step_releases_everything(
    aiohttp_server: ServerFactory,
    closed_sources: list[PowerSource],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The carbon refresh (the last step) failing to start leaves no task, session,
    listening socket or power source behind."""
    from upstreams import create_upstream

    upstream = await aiohttp_server(create_upstream())
    sock, port = _busy_port()
    sock.close()  # a free port for the receiver
    settings = Settings(
        upstream=str(upstream.make_url("/")),
        observe=str(upstream.make_url("/metrics")),
        otlp_listen=f"127.0.0.1:{port}",
        power_source="simulated",
    )
    sidecar = Sidecar(settings, env={})

    async def boom(*_: object) -> None:
        raise RuntimeError("carbon refresh cannot start")

    monkeypatch.setattr(type(sidecar.carbon), "start", boom)
    await _failing_start(sidecar, closed_sources, RuntimeError)
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))  # the receiver let go of its port
    finally:
        probe.close()


@pytest.mark.parametrize(
    ("flags", "hold_s"),
    [
        ({}, 0.0),
        ({"proxy_hold": 30.0}, 30.0),
        ({"proxy_hold": 60.0, "observe": "http://127.0.0.1:9/metrics"}, 60.0),
    ],
)
async def test_proxy_hold_is_the_ledgers_hold(
    aiohttp_server: ServerFactory, flags: dict[str, Any], hold_s: float
) -> None:
    """``--proxy-hold`` holds the ledger's intervals, beside the observer too."""
    from upstreams import create_upstream

    upstream = await aiohttp_server(create_upstream())
    if "observe" in flags:
        flags = {**flags, "observe": str(upstream.make_url("/metrics"))}
    settings = Settings(upstream=str(upstream.make_url("/")), power_source="simulated", **flags)
    sidecar = Sidecar(settings, env={})
    await sidecar.start()
    try:
        assert sidecar.meter is not None
        assert sidecar.meter.ledger.hold_s == hold_s
    finally:
        await sidecar.stop()
