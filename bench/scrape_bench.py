"""One ``/metrics`` scrape with 1,000 requests in flight, in-process.

A real :class:`~sidecar.app.Sidecar` (simulated power, sampler running) whose
meter holds 1,000 streaming requests in flight across 20 models (the
``--max-models`` default), each with a first token and some streamed tokens,
plus 2,000 finished requests behind it; then its metrics application, served
on 127.0.0.1, is scraped over HTTP. The figure is the median of several
scrapes, each timed from request sent to last byte read.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from bench.common import free_port, median
from sidecar.app import Sidecar
from sidecar.config import Settings

IN_FLIGHT = 1000
MODELS = 20


async def measure(scrapes: int = 15) -> dict[str, float]:
    settings = Settings.without_env(
        upstream="http://127.0.0.1:9",  # never called: the meter is driven directly
        power_source="simulated",
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
    )
    sidecar = Sidecar(settings, env={})
    await sidecar.start()
    runner: web.AppRunner | None = None
    try:
        meter = sidecar.meter
        assert meter is not None
        for k in range(2_000):  # history: finished requests across every label
            rid = meter.request_started("chat", f"model-{k % MODELS}", 100.0)
            meter.request_finished(rid, "ok", 100, 20)
            if k % 200 == 199:
                await asyncio.sleep(0.12)  # let samples arrive, as they would between requests
        rids = []
        for k in range(IN_FLIGHT):
            rid = meter.request_started("chat", f"model-{k % MODELS}", 300.0)
            meter.first_token(rid)
            meter.tokens_streamed(rid, 3)
            rids.append(rid)
        await asyncio.sleep(1.5)  # samples arrive, the ledger assigns intervals
        in_flight = sum(meter.in_flight().values())
        port = free_port()
        runner = web.AppRunner(sidecar.metrics_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}/metrics"
        times: list[float] = []
        size = 0
        async with aiohttp.ClientSession() as session:
            for _ in range(scrapes + 1):
                t0 = time.perf_counter()
                async with session.get(url) as r:
                    body = await r.read()
                times.append(time.perf_counter() - t0)
                size = len(body)
                await asyncio.sleep(0.05)
        first, rest = times[0], times[1:]
        for rid in rids:
            meter.request_finished(rid, "ok", 300, 3)
        return {
            "in_flight": float(in_flight),
            "scrape_ms_median": median(rest) * 1e3,
            "scrape_ms_max": max(rest) * 1e3,
            "scrape_ms_first": first * 1e3,
            "body_bytes": float(size),
        }
    finally:
        if runner is not None:
            await runner.cleanup()
        await sidecar.stop()


def run() -> dict[str, float]:
    return asyncio.run(measure())
