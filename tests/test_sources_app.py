"""proxy+traces in a whole sidecar: the proxied request and its span become one request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from otlp_build import export, llm_request
from procs import free_port
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import Sidecar
from sidecar.config import Settings

ServerFactory = Callable[..., Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


async def test_proxied_request_and_its_span_join_by_the_response_id(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    """The proxy learns the response's id; the span with that id replaces the proxy's
    tokens and window, and the request keeps the proxy's endpoint: counted once, as chat."""
    from upstreams import create_upstream

    upstream = await aiohttp_server(create_upstream())
    settings = Settings.without_env(
        upstream=str(upstream.make_url("/")),
        otlp_listen=f"127.0.0.1:{free_port()}",
        power_source="simulated",
        sample_hz=50,
    )
    assert settings.mode == "proxy+traces"
    sidecar = Sidecar(settings, env={})
    await sidecar.start()
    proxy = await aiohttp_client(sidecar.proxy_app())
    metrics = await aiohttp_client(sidecar.metrics_app())
    try:
        await asyncio.sleep(0.3)
        started_ns = round(time.time() * 1e9)
        r = await proxy.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert (await r.json())["id"] == "cmpl-2"  # the server's id, as vLLM's spans name it
        span = llm_request(
            "cmpl-2", arrival_ns=started_ns, ttft_s=0.02, prefill_s=0.01, decode_s=0.03
        )
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://{settings.otlp_listen}/v1/traces",
                data=export(span).SerializeToString(),
                headers={"Content-Type": "application/x-protobuf"},
            ) as posted,
        ):
            assert posted.status == 200
        await asyncio.sleep(0.2)
        meter = sidecar.meter
        assert meter is not None
        assert meter.join is not None
        assert meter.join.joined == 1
    finally:
        await sidecar.stop()
    page = await (await metrics.get("/metrics")).text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    requests = {k[1]: v for k, v in samples.items() if k[0] == "llm_energy_requests_total"}
    assert requests == {(("endpoint", "chat"), ("model", "m"), ("status", "ok")): 1}
    tokens = {k[1]: v for k, v in samples.items() if k[0] == "llm_energy_tokens_total"}
    assert tokens[(("kind", "prompt"), ("model", "m"))] == 17  # the span's, not the proxy's 7
    assert tokens[(("kind", "completion"), ("model", "m"))] == 20
    assert samples[("llm_energy_request_joules_count", (("model", "m"),))] == 1
