"""Observer mode: a vLLM stand-in's own counters become energy per model and per token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import Sidecar
from sidecar.config import Settings
from sidecar.power.simulated import SimulatedGpus

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
COUNTERS = web.AppKey("counters", dict)


def vllm_page(c: dict[str, dict[str, float]]) -> str:
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
    ]
    for model, v in c.items():
        lines.append(f'vllm:num_requests_running{{engine="0",model_name="{model}"}} {v["running"]}')
    lines += [
        "# HELP vllm:prompt_tokens_total Prefill tokens.",
        "# TYPE vllm:prompt_tokens_total counter",
    ]
    for model, v in c.items():
        lines.append(f'vllm:prompt_tokens_total{{engine="0",model_name="{model}"}} {v["prompt"]}')
    lines += [
        "# HELP vllm:generation_tokens_total Generation tokens.",
        "# TYPE vllm:generation_tokens_total counter",
    ]
    for model, v in c.items():
        lines.append(f'vllm:generation_tokens_total{{engine="0",model_name="{model}"}} {v["gen"]}')
    lines += [
        "# HELP vllm:request_success_total Finished.",
        "# TYPE vllm:request_success_total counter",
    ]
    for model, v in c.items():
        lines.append(
            f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{model}"}} {v["done"]}'
        )
    return "\n".join(lines) + "\n"


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=vllm_page(request.app[COUNTERS]), content_type="text/plain")


async def test_energy_splits_between_models_by_token_throughput(
    aiohttp_server: ServerFactory,
) -> None:
    """Two models busy at once: dynamic energy follows their token throughput (3:1),
    also for a model whose requests never show as running at a scrape."""
    app = web.Application()
    counters = {
        m: {"running": 0.0, "prompt": 0.0, "gen": 0.0, "done": 0.0} for m in ("big", "small")
    }
    app[COUNTERS] = counters
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    gpu = SimulatedGpus(gpus=1, idle_w=50.0, noise_w=0.0)
    settings = Settings(
        observe=str(server.make_url("/metrics")),
        power_source="simulated",
        sample_hz=20,
        idle_watts=(50.0,),
        carbon_intensity=100.0,
    )
    sidecar = Sidecar(settings, env={}, simulated=gpu, drive_simulated=False)
    await sidecar.start()
    try:
        await asyncio.sleep(1.2)
        gpu.set_load("work", sidecar.clock(), 200.0)
        for _ in range(6):
            for model, rate in (("big", 300.0), ("small", 100.0)):
                c = counters[model]
                # "small" serves short requests that start and end between two scrapes
                c["running"] = 2.0 if model == "big" else 0.0
                c["gen"] += rate
                c["done"] += 1
            await asyncio.sleep(1.0)
        for c in counters.values():
            c["running"] = 0.0
        gpu.set_load("work", sidecar.clock(), 0.0)
        await asyncio.sleep(2.5)
    finally:
        await sidecar.stop()
    meter = sidecar.meter
    assert meter is not None
    big = meter.ledger.model_j[("big", "dynamic")]
    small = meter.ledger.model_j[("small", "dynamic")]
    assert big + small == pytest.approx(meter.ledger.phase_j["dynamic"], rel=1e-6)
    # the load ran 6 s at 200 W: nearly all of it is attributed, little falls into standby
    assert big + small == pytest.approx(6 * 200.0, rel=0.2)
    assert big / small == pytest.approx(3.0, rel=0.25)
    assert meter.tokens[("big", "completion")] == pytest.approx(1800, abs=300)
    assert meter.requests[("big", "generate", "ok")] >= 4
    assert meter.request_j == {}  # no per-request histogram in observer mode
    assert meter.model_g["big"] > 0


async def test_proxy_view_wins_when_both_modes_run(aiohttp_server: ServerFactory) -> None:
    """With --upstream and --observe, the observer stops feeding the ledger once requests are proxied."""
    from upstreams import create_upstream

    app = create_upstream()
    upstream = await aiohttp_server(app)
    settings = Settings(
        upstream=str(upstream.make_url("/")),
        observe=str(upstream.make_url("/metrics")),
        power_source="simulated",
    )
    sidecar = Sidecar(settings, env={})
    await sidecar.start()
    try:
        assert settings.mode == "proxy+observer"
        meter = sidecar.meter
        assert meter is not None
        meter.proxy.last_seen_s = sidecar.clock()  # the proxy saw an inference request
        await asyncio.sleep(2.3)
        assert meter.observer.in_flight() == {}
        assert meter.ledger.in_flight() == {}  # no activity span beside the proxied requests
        assert sidecar.observer is not None
        assert sidecar.observer.scrapes >= 1
    finally:
        await sidecar.stop()
