"""The metrics port: ``/metrics``, ``/healthz``, ``/readyz`` and ``/summary``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import exposition
from prometheus_client.registry import CollectorRegistry

from sidecar.meter import Meter
from sidecar.sampler import SamplerStats

REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
METER_KEY = web.AppKey("meter", Meter)
ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
StatsView = Callable[[], SamplerStats]
STATS_KEY: web.AppKey[StatsView] = web.AppKey("stats")
READY_KEY: web.AppKey[ReadyCheck] = web.AppKey("ready")


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    encoder, content_type = exposition.choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(registry), headers={"Content-Type": content_type})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: this handler running proves the process and its event loop answer."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the proxy can serve. Stale power samples never make this fail."""
    ok, detail = await request.app[READY_KEY]()
    return web.json_response(
        {"status": "ok" if ok else "unavailable", "detail": detail}, status=200 if ok else 503
    )


async def summary(request: web.Request) -> web.Response:
    meter = request.app[METER_KEY]
    stats = request.app[STATS_KEY]()
    doc = meter.summary(stats.last_power_w)
    doc["sampler"] = {
        "interval_seconds": stats.mean_interval_s,
        "seconds_since_last_sample": (
            None
            if not stats.last_sample_s
            else round(time.monotonic() - max(stats.last_sample_s.values()), 3)
        ),
    }
    return web.json_response(doc)


def create_metrics_app(
    registry: CollectorRegistry,
    meter: Meter,
    stats: Callable[[], SamplerStats],
    ready: Callable[[], Awaitable[tuple[bool, str]]],
) -> web.Application:
    app = web.Application()
    app[REGISTRY_KEY] = registry
    app[METER_KEY] = meter
    app[STATS_KEY] = stats
    app[READY_KEY] = ready
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/summary", summary)
    return app
