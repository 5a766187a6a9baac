"""The OTLP/HTTP receiver: answers, refusals, size cap, duplicates, overload, fail-open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from otlp_build import export, gz, llm_request, otlp_json

from sidecar.traces.receiver import RUNNER_KWARGS, Receiver
from sidecar.traces.span import RequestSpan

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[TestServer], Awaitable[Client]]
ServerFactory = Callable[..., Awaitable[TestServer]]
Serve = Callable[[Receiver], Awaitable[Client]]
PB = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
def serve(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> Serve:
    """A client of ``receiver.app()`` run as the service runs it (gzip bodies not inflated)."""

    async def go(receiver: Receiver) -> Client:
        return await aiohttp_client(await aiohttp_server(receiver.app(), **RUNNER_KWARGS))

    return go


def make(**kw: object) -> tuple[Receiver, list[RequestSpan]]:
    got: list[RequestSpan] = []
    receiver = Receiver(got.append, to_monotonic_s=lambda s: s, **kw)  # type: ignore[arg-type]
    return receiver, got


async def test_protobuf_export_accepted(serve: Serve) -> None:
    """A protobuf export gets OTLP's empty success response and its request spans go on."""
    receiver, got = make()
    client = await serve(receiver)
    body = export(llm_request("a"), llm_request("b")).SerializeToString()
    r = await client.post("/v1/traces", data=body, headers=PB)
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/x-protobuf"
    reply = ExportTraceServiceResponse.FromString(await r.read())
    assert not reply.HasField("partial_success")
    assert [s.request_id for s in got] == ["a", "b"]
    assert receiver.spans["accepted"] == 2
    assert receiver.exports["ok"] == 1


async def test_json_gzip_export_accepted(serve: Serve) -> None:
    """A gzip OTLP/JSON export is answered in JSON."""
    receiver, got = make()
    client = await serve(receiver)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    r = await client.post(
        "/v1/traces", data=gz(otlp_json(export(llm_request("j")))), headers=headers
    )
    assert r.status == 200
    assert await r.json() == {}
    assert [s.request_id for s in got] == ["j"]


async def test_invalid_span_is_partial_success(serve: Serve) -> None:
    """A request span with impossible numbers is rejected alone, as OTLP's partial success."""
    receiver, got = make()
    client = await serve(receiver)
    bad = llm_request("bad", extra={"gen_ai.latency.time_in_model_decode": -1.0})
    r = await client.post(
        "/v1/traces", data=export(bad, llm_request("good")).SerializeToString(), headers=PB
    )
    assert r.status == 200
    reply = ExportTraceServiceResponse.FromString(await r.read())
    assert reply.partial_success.rejected_spans == 1
    assert "time_in_model_decode" in reply.partial_success.error_message
    assert [s.request_id for s in got] == ["good"]


@pytest.mark.parametrize(
    ("data", "headers", "status"),
    [
        (b"\xff\xff\xff", PB, 400),
        (b"{", {"Content-Type": "application/json"}, 400),
        (b"", {"Content-Type": "text/plain"}, 415),
        (b"x", {**PB, "Content-Encoding": "zstd"}, 415),
    ],
    ids=["protobuf", "json", "content-type", "encoding"],
)
async def test_refused(serve: Serve, data: bytes, headers: dict[str, str], status: int) -> None:
    """A body that is not an export is refused with a 4xx (never retried by the exporter)."""
    receiver, got = make()
    client = await serve(receiver)
    r = await client.post("/v1/traces", data=data, headers=headers)
    assert r.status == status
    assert got == []


async def test_50_mb_body_refused_without_holding_it(serve: Serve) -> None:
    """A 50 MB body, streamed without a length, gets 413 once the cap is passed."""
    receiver, got = make(max_body_bytes=1 << 20)
    client = await serve(receiver)

    async def body() -> AsyncIterator[bytes]:
        chunk = b"\0" * (1 << 20)
        for _ in range(50):
            yield chunk

    r = await client.post("/v1/traces", data=body(), headers=PB)
    assert r.status == 413
    assert receiver.exports["too_large"] == 1
    assert got == []


async def test_declared_length_over_cap_refused_before_reading(serve: Serve) -> None:
    """A Content-Length over the cap is refused at once."""
    receiver, _ = make(max_body_bytes=1000)
    client = await serve(receiver)
    r = await client.post("/v1/traces", data=b"\0" * 5000, headers=PB)
    assert r.status == 413


async def test_duplicate_export_counts_once(serve: Serve) -> None:
    """A retried export (same span ids) passes each request on once."""
    receiver, got = make()
    client = await serve(receiver)
    body = export(llm_request("a"), llm_request("b")).SerializeToString()
    for _ in range(2):
        r = await client.post("/v1/traces", data=body, headers=PB)
        assert r.status == 200
    assert [s.request_id for s in got] == ["a", "b"]
    assert receiver.spans["duplicate"] == 2


async def test_overload_answers_503_with_retry_after(serve: Serve) -> None:
    """Past the bodies in progress allowed, an export gets 503 and Retry-After at once."""
    receiver, _ = make(max_pending=1)
    client = await serve(receiver)
    gate = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield export(llm_request("slow")).SerializeToString()[:5]
        await gate.wait()

    first = asyncio.create_task(client.post("/v1/traces", data=slow_body(), headers=PB))
    for _ in range(200):  # until the first body is being read
        if receiver._pending:
            break
        await asyncio.sleep(0.01)
    r = await client.post(
        "/v1/traces", data=export(llm_request("x")).SerializeToString(), headers=PB
    )
    assert r.status == 503
    assert r.headers["Retry-After"] == "1"
    gate.set()
    (await first).close()
    assert receiver.exports["overloaded"] == 1


async def test_accounting_fault_fails_open(serve: Serve) -> None:
    """If the accounting raises on a span, the export still succeeds; the fault is counted."""

    def boom(span: RequestSpan) -> None:
        raise RuntimeError("ledger bug")

    receiver = Receiver(boom, to_monotonic_s=lambda s: s)
    client = await serve(receiver)
    r = await client.post("/v1/traces", data=export(llm_request()).SerializeToString(), headers=PB)
    assert r.status == 200
    assert receiver.spans["failed"] == 1


async def test_large_body_decodes_off_loop(serve: Serve) -> None:
    """An export of thousands of spans (past the in-loop size) is decoded whole."""
    receiver, got = make()
    client = await serve(receiver)
    spans = [llm_request(f"r{i}") for i in range(3000)]
    body = export(*spans).SerializeToString()
    assert len(body) > 256 * 1024
    r = await client.post("/v1/traces", data=body, headers=PB)
    assert r.status == 200
    assert len(got) == 3000
