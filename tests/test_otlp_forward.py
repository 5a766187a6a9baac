"""Forwarding to the user's collector (byte for byte, never in the server's way) and energy spans."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp_build import export, gz, llm_request, otlp_json
from procs import free_port

from sidecar.config import Settings
from sidecar.ledger import FinishedRequest
from sidecar.traces.energy_spans import ATTRIBUTION, SPAN_NAME, EnergySpans
from sidecar.traces.forward import Forwarder, traces_url
from sidecar.traces.receiver import RUNNER_KWARGS
from sidecar.traces.service import TracesService
from sidecar.traces.span import RequestSpan

ServerFactory = Callable[..., Awaitable[TestServer]]


@dataclass
class Collector:
    """A stand-in for the user's OTLP collector: keeps each body as it came off the wire."""

    url: str
    bodies: list[tuple[bytes, str | None, str | None]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 200

    async def wait_for(self, n: int) -> None:
        for _ in range(500):
            if len(self.bodies) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"collector got {len(self.bodies)} bodies, expected {n}")


@pytest.fixture
async def collector(aiohttp_server: ServerFactory) -> Collector:
    box: list[Collector] = []

    async def handle(request: web.Request) -> web.Response:
        c = box[0]
        await c.gate.wait()
        body = await request.read()
        c.bodies.append(
            (body, request.headers.get("Content-Type"), request.headers.get("Content-Encoding"))
        )
        return web.Response(status=c.status, body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", handle)
    server = await aiohttp_server(app, **RUNNER_KWARGS)  # the wire bytes, not inflated
    box.append(Collector(str(server.make_url("/v1/traces"))))
    box[0].gate.set()
    return box[0]


def settings(**kw: object) -> Settings:
    return Settings.without_env(otlp_listen=f"127.0.0.1:{free_port()}", **kw)


@pytest.fixture
async def service(collector: Collector) -> AsyncIterator[tuple[TracesService, list[RequestSpan]]]:
    got: list[RequestSpan] = []
    svc = TracesService(
        settings(otlp_forward=collector.url, otlp_energy_spans=True),
        on_span=got.append,
        clock=lambda: 100.0,
        wall_offset_s=1_796_100_000.0,
        grams_per_joule=lambda: 0.5,
    )
    await svc.start()
    yield svc, got
    await svc.stop()


async def post(svc: TracesService, body: bytes, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(f"http://{svc.listen}/v1/traces", data=body, headers=headers) as r,
    ):
        await r.read()
        return r.status


@pytest.mark.parametrize(
    ("encode", "headers"),
    [
        (lambda m: m.SerializeToString(), {"Content-Type": "application/x-protobuf"}),
        (
            lambda m: gz(m.SerializeToString()),
            {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
        ),
        (
            lambda m: gz(otlp_json(m)),
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ),
    ],
    ids=["protobuf", "protobuf-gzip", "json-gzip"],
)
async def test_forward_is_byte_identical(
    service: tuple[TracesService, list[RequestSpan]],
    collector: Collector,
    encode: Callable[[ExportTraceServiceRequest], bytes],
    headers: dict[str, str],
) -> None:
    """The collector gets the very bytes, Content-Type and Content-Encoding the server sent."""
    svc, got = service
    body = encode(export(llm_request("a"), llm_request("b")))
    assert await post(svc, body, headers) == 200
    await collector.wait_for(1)
    assert collector.bodies == [(body, headers["Content-Type"], headers.get("Content-Encoding"))]
    assert [s.request_id for s in got] == ["a", "b"]


async def test_slow_collector_never_slows_the_export(collector: Collector) -> None:
    """With the collector stalled and the queue full, exports still succeed; bodies are dropped
    and counted."""
    collector.gate.clear()
    fwd = Forwarder(collector.url, max_queued=2, workers=1)
    await fwd.start()
    try:
        accepted = [fwd.submit(b"x%d" % i, "application/x-protobuf") for i in range(6)]
        await asyncio.sleep(0.05)  # the worker takes one, the queue holds two
        assert accepted[:2] == [True, True]
        assert fwd.results["dropped"] == 4
        collector.gate.set()
        await fwd.drain()
        assert fwd.results["sent"] + fwd.results["dropped"] == 6
    finally:
        await fwd.close()


async def test_collector_down_counts_failures() -> None:
    """A collector that does not answer costs a failed count, nothing else."""
    fwd = Forwarder(f"http://127.0.0.1:{free_port()}/v1/traces", workers=1, timeout_s=2)
    await fwd.start()
    try:
        assert fwd.submit(b"body", "application/x-protobuf")
        await fwd.drain()
        assert fwd.results["failed"] == 1
    finally:
        await fwd.close()


async def test_an_unexpected_fault_does_not_end_the_sender(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault outside the network errors costs one failed body; the same sender goes on."""
    fwd = Forwarder(collector.url, workers=1)
    await fwd.start()
    try:
        assert fwd._session is not None
        real_post = fwd._session.post
        calls = iter([ValueError("odd"), None])

        def post(*args: Any, **kwargs: Any) -> Any:
            fault = next(calls)
            if fault is not None:
                raise fault
            return real_post(*args, **kwargs)

        monkeypatch.setattr(fwd._session, "post", post)
        assert fwd.submit(b"first", "application/x-protobuf")
        assert fwd.submit(b"second", "application/x-protobuf")
        await asyncio.wait_for(fwd.drain(), 10)  # a dead sender would never drain
        assert (fwd.results["failed"], fwd.results["sent"]) == (1, 1)
    finally:
        await fwd.close()


def test_traces_url() -> None:
    """A bare collector address gets OTLP's /v1/traces; a full URL is kept."""
    assert traces_url("http://tempo:4318") == "http://tempo:4318/v1/traces"
    assert traces_url("http://tempo:4318/") == "http://tempo:4318/v1/traces"
    assert traces_url("http://otel/custom/traces") == "http://otel/custom/traces"


def finished(rid: str, *, start_s: float = 10.0, end_s: float = 10.5) -> FinishedRequest:
    return FinishedRequest(
        id=rid,
        model="tiny-llama",
        endpoint="unknown",
        status="ok",
        start_s=start_s,
        end_s=end_s,
        first_token_s=start_s + 0.1,
        prompt_tokens=24,
        completion_tokens=12,
        dynamic_j=30.0,
        idle_j=10.0,
        prefill_j=15.0,
    )


def request_span(rid: str, trace_id: bytes, span_id: bytes) -> RequestSpan:
    return RequestSpan(rid, None, 9.9, 10.0, 10.1, 10.5, 24, 12, trace_id=trace_id, span_id=span_id)


async def test_energy_span_in_the_request_trace(collector: Collector) -> None:
    """Each finished request becomes one llm_energy.request child of its request span, with
    the contract's attributes, sent as OTLP/HTTP protobuf."""
    fwd = Forwarder(collector.url, workers=1)
    await fwd.start()
    spans = EnergySpans(fwd, clock=lambda: 0.0, wall_offset_s=1000.0, grams_per_joule=lambda: 0.5)
    try:
        spans.remember(request_span("r1", b"T" * 16, b"P" * 8))
        spans.finished(finished("r1"))
        spans.finished(finished("never-traced"))
        spans.flush()
        await fwd.drain()
    finally:
        await fwd.close()
    ((body, ctype, coding),) = collector.bodies
    assert (ctype, coding) == ("application/x-protobuf", None)
    msg = ExportTraceServiceRequest.FromString(body)
    resource = {kv.key: kv.value.string_value for kv in msg.resource_spans[0].resource.attributes}
    assert resource["service.name"] == "llm-energy-sidecar"
    (span,) = msg.resource_spans[0].scope_spans[0].spans
    assert span.name == SPAN_NAME
    assert span.kind == Span.SPAN_KIND_INTERNAL
    assert (span.trace_id, span.parent_span_id) == (b"T" * 16, b"P" * 8)
    assert len(span.span_id) == 8
    assert span.span_id != b"P" * 8
    assert span.start_time_unix_nano == 1010 * 10**9
    assert span.end_time_unix_nano == 1010_500_000_000
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["llm_energy.joules"].double_value == 40.0
    assert attrs["llm_energy.dynamic_joules"].double_value == 30.0
    assert attrs["llm_energy.idle_joules"].double_value == 10.0
    assert attrs["llm_energy.prefill_joules"].double_value == 15.0
    assert attrs["llm_energy.decode_joules"].double_value == 25.0
    assert attrs["llm_energy.co2e_grams"].double_value == 20.0
    assert attrs["llm_energy.attribution"].string_value == ATTRIBUTION
    assert spans.results["queued"] == 1
    assert spans.results["no_trace"] == 1


def test_energy_parents_are_bounded() -> None:
    """The memory of request spans keeps at most max_pending, and none past the hold."""
    now = [0.0]
    spans = EnergySpans(
        Forwarder("http://127.0.0.1:1"),
        clock=lambda: now[0],
        wall_offset_s=0.0,
        grams_per_joule=lambda: 0.0,
        hold_s=60.0,
        max_pending=3,
    )
    for i in range(5):
        spans.remember(request_span(f"r{i}", b"T" * 16, b"P" * 8))
    assert list(spans._parents) == ["r2", "r3", "r4"]
    now[0] = 61.0
    spans.remember(request_span("late", b"T" * 16, b"P" * 8))
    assert list(spans._parents) == ["late"]


async def test_service_sends_energy_spans_to_the_forward_target(
    service: tuple[TracesService, list[RequestSpan]], collector: Collector
) -> None:
    """Through the service: the export is forwarded, then the request's energy span follows
    in the same trace."""
    svc, got = service
    trace_id, span_id = bytes(range(16)), bytes(range(8))
    body = export(llm_request("chatcmpl-x", trace_id=trace_id, span_id=span_id)).SerializeToString()
    assert await post(svc, body, {"Content-Type": "application/x-protobuf"}) == 200
    (span,) = got
    svc.finished(finished(span.request_id))
    await svc.stop()  # flushes the energy batch and drains both queues
    await collector.wait_for(2)
    assert collector.bodies[0][0] == body
    energy = ExportTraceServiceRequest.FromString(collector.bodies[1][0])
    (e,) = energy.resource_spans[0].scope_spans[0].spans
    assert (e.trace_id, e.parent_span_id, e.name) == (trace_id, span_id, SPAN_NAME)
