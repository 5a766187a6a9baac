"""Traces mode in a whole sidecar: --otlp-listen alone meters spans; energy spans follow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from otlp_build import export, llm_request
from procs import free_port
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.app import Sidecar, StartupError, _started
from sidecar.config import Settings
from sidecar.traces.receiver import RUNNER_KWARGS

ServerFactory = Callable[..., Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: TestClient[web.Request, web.Application]) -> Samples:
    """The sidecar's /metrics page by (sample name, sorted labels)."""
    r = await client.get("/metrics")
    assert r.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await r.text())
        for s in family.samples
    }


async def test_traces_mode_alone(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    """With only --otlp-listen, a vLLM span becomes one request with its exact tokens, the
    export reaches the forward target unchanged, and an energy span lands in its trace."""
    bodies: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    collector = await aiohttp_server(app, **RUNNER_KWARGS)
    settings = Settings.without_env(
        otlp_listen=f"127.0.0.1:{free_port()}",
        otlp_forward=str(collector.make_url("/v1/traces")),
        otlp_energy_spans=True,
        power_source="simulated",
        sample_hz=50,
    )
    assert settings.mode == "traces"
    sidecar = Sidecar(settings, env={})
    await sidecar.start()
    metrics = await aiohttp_client(sidecar.metrics_app())
    try:
        await asyncio.sleep(0.3)  # samples around the request
        arrival_ns = round((time.time() - 0.25) * 1e9)
        trace_id, span_id = bytes(range(1, 17)), bytes(range(1, 9))
        body = export(
            llm_request(
                "chatcmpl-1",
                arrival_ns=arrival_ns,
                ttft_s=0.05,
                prefill_s=0.03,
                decode_s=0.1,
                trace_id=trace_id,
                span_id=span_id,
            )
        ).SerializeToString()
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://{settings.otlp_listen}/v1/traces",
                data=body,
                headers={"Content-Type": "application/x-protobuf"},
            ) as r,
        ):
            assert r.status == 200
        await asyncio.sleep(0.2)
    finally:
        await sidecar.stop()  # the hold ends: the request's figure is final
    samples = await scrape(metrics)
    assert (
        samples[
            (
                "llm_energy_build_info",
                (("mode", "traces"), ("power_source", "simulated"), ("version", __version__)),
            )
        ]
        == 1
    )
    assert samples[("llm_energy_otlp_spans_total", (("result", "accepted"),))] == 1
    assert samples[("llm_energy_request_joules_count", (("model", "default"),))] == 1
    tokens = {k[1]: v for k, v in samples.items() if k[0] == "llm_energy_tokens_total"}
    assert tokens[(("kind", "prompt"), ("model", "default"))] == 17
    assert tokens[(("kind", "completion"), ("model", "default"))] == 20
    for _ in range(100):
        if len(bodies) >= 2:
            break
        await asyncio.sleep(0.02)
    assert bodies[0] == body
    energy = ExportTraceServiceRequest.FromString(bodies[1])
    (span,) = energy.resource_spans[0].scope_spans[0].spans
    assert (span.trace_id, span.parent_span_id) == (trace_id, span_id)
    attrs = {kv.key: kv.value.double_value for kv in span.attributes}
    joules = samples[("llm_energy_request_joules_sum", (("model", "default"),))]
    assert joules > 0  # the resident power while it ran is its share at least
    assert attrs["llm_energy.joules"] == pytest.approx(joules)
    assert attrs["llm_energy.prefill_joules"] + attrs["llm_energy.decode_joules"] == pytest.approx(
        joules
    )


async def test_port_in_use_names_the_flag() -> None:
    """A receiver port already taken stops start-up with one line naming --otlp-listen."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings.without_env(otlp_listen=f"127.0.0.1:{port}", power_source="simulated")
        with pytest.raises(StartupError, match=r"^--otlp-listen: cannot listen"):
            await _started(settings)


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"otlp_forward": "http://c:4318"}, "--otlp-forward"),
        ({"otlp_listen": "127.0.0.1:4318", "otlp_energy_spans": True}, "--otlp-energy-spans"),
    ],
)
def test_flags_that_need_another(values: dict[str, object], flag: str) -> None:
    """--otlp-forward needs --otlp-listen, --otlp-energy-spans needs --otlp-forward."""
    from sidecar.config import SettingsError, load_settings

    with pytest.raises(SettingsError, match=flag):
        load_settings({"observe": "http://vllm:8000/metrics", **values})


def test_mode_order() -> None:
    """build_info's mode joins the sources in the order proxy, observer, traces."""
    s = Settings.without_env(
        upstream="http://u", observe="http://u/metrics", otlp_listen="127.0.0.1:4318"
    )
    assert s.mode == "proxy+observer+traces"
    assert Settings.without_env(observe="http://u/metrics", otlp_listen=":4318").mode == (
        "observer+traces"
    )
