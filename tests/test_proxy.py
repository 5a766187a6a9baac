"""The proxy against stand-in vLLM, TGI and Ollama servers: bytes, counts and failures."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from upstreams import STATE, create_upstream

from sidecar.app import Sidecar
from sidecar.config import Settings

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


class Rig:
    def __init__(
        self,
        sidecar: Sidecar,
        proxy: TestClient[Any, Any],
        direct: TestClient[Any, Any],
        metrics: TestClient[Any, Any],
        upstream: web.Application,
    ) -> None:
        self.sidecar, self.proxy, self.direct, self.metrics, self.upstream = (
            sidecar,
            proxy,
            direct,
            metrics,
            upstream,
        )

    async def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = await (await self.metrics.get("/metrics")).text()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    async def value(self, name: str, **labels: str) -> float:
        return (await self.samples()).get((name, tuple(sorted(labels.items()))), 0.0)


async def make_rig(
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    env: dict[str, str] | None = None,
    **extra: Any,
) -> AsyncIterator[Rig]:
    upstream = create_upstream()
    server = await aiohttp_server(upstream)
    # LLM_ENERGY_TEST_DATA_PLANE=aiohttp|relay: the same tests on either data plane (default: the
    # setting's default); the relay is served by sidecar/relay, aiohttp's by proxy_app()
    default = str(Settings.model_fields["data_plane"].default)
    plane = extra.pop("data_plane", None) or os.environ.get("LLM_ENERGY_TEST_DATA_PLANE", default)
    settings = Settings(
        upstream=str(server.make_url("/")),
        power_source="simulated",
        sample_hz=50,
        upstream_read_timeout=10,
        **{"data_plane": plane, **extra},
    )
    sidecar = Sidecar(settings, env=env or {})
    await sidecar.start()
    try:
        if plane == "relay":
            from test_relay_client import relay_client

            proxy: Any = await relay_client(sidecar)
        else:
            proxy = await aiohttp_client(sidecar.proxy_app())
        metrics = await aiohttp_client(sidecar.metrics_app())
        direct_client: Any = aiohttp.ClientSession(
            base_url=str(server.make_url("/")), auto_decompress=False
        )
        try:
            yield Rig(sidecar, proxy, direct_client, metrics, upstream)
        finally:
            await direct_client.close()
            if plane == "relay":
                await proxy.close()
    finally:
        await sidecar.stop()


@pytest.fixture
async def rig(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> AsyncIterator[Rig]:
    async for r in make_rig(aiohttp_server, aiohttp_client):
        yield r


async def both(
    rig: Rig, method: str, path: str, **kw: Any
) -> tuple[bytes, bytes, aiohttp.ClientResponse]:
    async with rig.direct.request(method, path, **kw) as d:
        direct = await d.read()
    r = await rig.proxy.session.request(
        method, rig.proxy.make_url(path), auto_decompress=False, **kw
    )
    proxied = await r.read()
    return direct, proxied, r


CASES = [
    (
        "/v1/chat/completions",
        {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    ),
    (
        "/v1/chat/completions",
        {
            "model": "m1",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 7,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "model": "m1",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 4,
        },
    ),
    ("/v1/completions", {"model": "m2", "prompt": "once upon", "stream": True, "max_tokens": 3}),
    ("/v1/embeddings", {"model": "embedder", "input": "text"}),
    ("/generate", {"inputs": "hello", "parameters": {"details": True}}),
    ("/generate_stream", {"inputs": "hello"}),
    ("/api/generate", {"model": "llama3", "prompt": "why"}),
    ("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "why"}]}),
    (
        "/api/chat",
        {"model": "llama3", "messages": [{"role": "user", "content": "why"}], "stream": False},
    ),
]


@pytest.mark.parametrize(("path", "body"), CASES)
async def test_pass_through_is_byte_identical(rig: Rig, path: str, body: dict[str, Any]) -> None:
    """Every API shape reaches the client exactly as the server sent it, streaming included."""
    direct, proxied, resp = await both(rig, "POST", path, json=body)
    assert resp.status == 200
    assert proxied == direct


async def test_usage_is_counted_per_api(rig: Rig) -> None:
    """Token counts come from usage, TGI details/headers and Ollama's counters."""
    for path, body in CASES:
        await both(rig, "POST", path, json=body)
    await asyncio.sleep(0.3)
    assert await rig.value("llm_energy_tokens_total", model="m1", kind="completion") == 5 + 4 + 7
    assert await rig.value("llm_energy_tokens_total", model="llama3", kind="prompt") == 12 * 3
    assert await rig.value("llm_energy_tokens_total", model="embedder", kind="prompt") == 5
    assert (
        await rig.value("llm_energy_requests_total", model="m1", endpoint="chat", status="ok") == 3
    )
    assert (
        await rig.value(
            "llm_energy_requests_total", model="default", endpoint="generate", status="ok"
        )
        == 2
    )


async def test_large_upload_streams_through(rig: Rig) -> None:
    """An 8 MiB body arrives whole and unchanged."""
    payload = os.urandom(8 << 20)
    r = await rig.proxy.post(
        "/upload", data=payload, headers={"Content-Type": "application/octet-stream"}
    )
    assert await r.json() == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}


async def test_hundred_concurrent_streams(rig: Rig) -> None:
    """100 streams at once all arrive intact and are all counted."""
    body = {
        "model": "c",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "max_tokens": 20,
        "stream_options": {"include_usage": True},
        "delay": 0.005,
    }
    async with rig.direct.post("/v1/chat/completions", json=body) as d:
        expected = await d.read()

    async def one() -> bytes:
        r = await rig.proxy.post("/v1/chat/completions", json=body)
        return await r.read()

    results = await asyncio.gather(*(one() for _ in range(100)))
    assert all(r == expected for r in results)
    assert (
        await rig.value("llm_energy_requests_total", model="c", endpoint="chat", status="ok") == 100
    )
    assert await rig.value("llm_energy_tokens_total", model="c", kind="completion") == 2000


async def test_client_leaving_releases_upstream(rig: Rig) -> None:
    """A client gone mid-stream closes the upstream call promptly and counts `cancelled`."""
    body = {
        "model": "slow",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "max_tokens": 1000,
        "delay": 0.05,
    }
    session = aiohttp.ClientSession()
    resp = await session.post(rig.proxy.make_url("/v1/chat/completions"), json=body)
    await resp.content.readany()
    resp.close()
    await session.close()
    state = rig.upstream[STATE]
    for _ in range(60):
        if state.get("streams_open") == 0:
            break
        await asyncio.sleep(0.05)
    assert state.get("streams_open") == 0
    for _ in range(40):
        if (
            await rig.value(
                "llm_energy_requests_total", model="slow", endpoint="chat", status="cancelled"
            )
            == 1
        ):
            break
        await asyncio.sleep(0.05)
    assert (
        await rig.value(
            "llm_energy_requests_total", model="slow", endpoint="chat", status="cancelled"
        )
        == 1
    )


async def test_gzip_body_arrives_byte_identical(rig: Rig) -> None:
    """A compressed upstream body reaches the client as sent, with its Content-Encoding."""
    body = {"model": "z", "messages": [], "gzip": True}
    direct, proxied, resp = await both(rig, "POST", "/v1/chat/completions", json=body)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert proxied == direct
    assert proxied[:2] == b"\x1f\x8b"


async def test_upstream_down_gives_502(aiohttp_client: ClientFactory) -> None:
    """No upstream: a JSON 502, counted as an error (an unconfirmed model name counts as other)."""
    settings = Settings(
        upstream="http://127.0.0.1:9", power_source="simulated", upstream_connect_timeout=1
    )
    sidecar = Sidecar(settings, env={})
    await sidecar.start()
    try:
        proxy = await aiohttp_client(sidecar.proxy_app())
        r = await proxy.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "upstream_unavailable"
        metrics = await aiohttp_client(sidecar.metrics_app())
        ready = await metrics.get("/readyz")
        assert ready.status == 503
        assert (await metrics.get("/healthz")).status == 200
        text = await (await metrics.get("/metrics")).text()
        assert 'llm_energy_requests_total{endpoint="chat",model="other",status="error"} 1.0' in text
    finally:
        await sidecar.stop()


@pytest.mark.parametrize("code", [400, 404, 500, 503])
async def test_upstream_errors_are_counted(rig: Rig, code: int) -> None:
    """4xx and 5xx from the server pass through and count as `error` (an unknown POST here)."""
    direct, proxied, resp = await both(rig, "POST", f"/status/{code}", json={})
    assert resp.status == code
    assert proxied == direct
    assert (
        await rig.value(
            "llm_energy_requests_total", model="default", endpoint="unknown", status="error"
        )
        == 1
    )


@pytest.mark.parametrize("kind", ["json", "sse"])
async def test_malformed_bodies_pass_untouched(rig: Rig, kind: str) -> None:
    """Malformed JSON or SSE from the server reaches the client unchanged and is still counted."""
    body = {"model": "bad", "malformed": kind, "stream": kind == "sse"}
    direct, proxied, _resp = await both(rig, "POST", "/v1/chat/completions", json=body)
    assert proxied == direct
    assert (
        await rig.value("llm_energy_requests_total", model="bad", endpoint="chat", status="ok") == 1
    )


async def test_malformed_request_passes_through(rig: Rig) -> None:
    """A request body that is not JSON is forwarded as is and counted."""
    direct, proxied, resp = await both(
        rig,
        "POST",
        "/v1/chat/completions",
        data=b"{oops",
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert proxied == direct
    assert (
        await rig.value(
            "llm_energy_requests_total", model="default", endpoint="chat", status="error"
        )
        == 1
    )


async def test_no_prompt_or_credentials_leak(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    """Prompt text and Authorization values appear in no log line and no metric."""
    from sidecar import logs

    logs.configure("debug", json=True)
    secret_prompt = "zebra-ultraviolet-prompt-4711"
    token = "Bearer sk-top-secret-9876"
    body = {"model": "m1", "messages": [{"role": "user", "content": secret_prompt}], "stream": True}
    r = await rig.proxy.post("/v1/chat/completions", json=body, headers={"Authorization": token})
    await r.read()
    assert rig.upstream[STATE]["auth"] == token  # forwarded to the server, of course
    await rig.proxy.post(
        "/status/500", json={"prompt": secret_prompt}, headers={"Authorization": token}
    )
    text = await (await rig.metrics.get("/metrics")).text()
    summary = await (await rig.metrics.get("/summary")).text()
    captured = capsys.readouterr()
    everything = text + summary + captured.out + captured.err
    assert secret_prompt not in everything
    assert "sk-top-secret" not in everything


async def test_attribution_fault_leaves_requests_unharmed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger that raises on every event never breaks the user's request; faults are counted."""
    meter = rig.sidecar.meter
    assert meter is not None

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("injected attribution fault")

    monkeypatch.setattr(meter.ledger, "start", boom)
    monkeypatch.setattr(meter.ledger, "tokens", boom)
    monkeypatch.setattr(meter.ledger, "finish", boom)
    body = {
        "model": "m1",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 7,
    }
    direct, proxied, resp = await both(rig, "POST", "/v1/chat/completions", json=body)
    assert resp.status == 200
    assert proxied == direct
    assert await rig.value("llm_energy_tracking_errors_total") >= 1


async def test_non_inference_paths_hold_no_energy(rig: Rig) -> None:
    """Health, model lists and the server's /metrics are proxied and counted as `other`."""
    r = await rig.proxy.get("/health")
    assert await r.text() == "ok"
    r = await rig.proxy.get("/metrics")
    assert "up 1" in await r.text()
    assert (
        await rig.value("llm_energy_requests_total", model="default", endpoint="other", status="ok")
        == 2
    )
    assert rig.sidecar.meter is not None
    assert rig.sidecar.meter.in_flight() == {}


async def test_inject_usage_counts_exactly_and_hides_the_chunk(rig: Rig) -> None:
    """By default the sidecar gets exact usage and the client the stream it asked for.

    This stand-in writes `"usage": null` only when asked (OpenAI's way); the
    first injected stream cannot tell that from SGLang's (always), so the next
    stream goes as is to find out, and injection goes on.
    """
    body = {
        "model": "inj",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 9,
    }
    assert rig.sidecar.proxy is not None
    assert rig.sidecar.proxy.injecting
    for _ in range(3):
        direct, proxied, _resp = await both(rig, "POST", "/v1/chat/completions", json=body)
        assert proxied == direct
        assert b'"usage"' not in proxied
    assert rig.sidecar.proxy.null_usage_unasked is False
    assert await rig.value("llm_energy_tokens_total", model="inj", kind="completion") == 27
    assert await rig.value("llm_energy_tokens_total", model="inj", kind="prompt") == 22


async def test_inject_usage_exact_from_the_first_vllm_stream(rig: Rig) -> None:
    """A vLLM-like upstream (no `usage: null` even when asked): exact bytes and tokens at once."""
    rig.upstream[STATE]["never_null"] = True
    body = {"model": "v", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    for _ in range(2):
        direct, proxied, _resp = await both(rig, "POST", "/v1/chat/completions", json=body)
        assert proxied == direct
    assert rig.sidecar.proxy is not None
    assert rig.sidecar.proxy.null_usage_unasked is False
    assert await rig.value("llm_energy_tokens_total", model="v", kind="prompt") == 22


async def test_summary_schema(rig: Rig) -> None:
    """/summary carries the contract's keys for both windows."""
    for path, body in CASES[:3]:
        await both(rig, "POST", path, json=body)
    doc = await (await rig.metrics.get("/summary")).json()
    for window in ("last_minute", "since_start"):
        w = doc[window]
        for key in (
            "energy_joules",
            "requests",
            "completion_tokens",
            "idle_share",
            "joules_per_request_attributed",
            "joules_per_request_all_in",
            "joules_per_output_token",
            "grams_per_request",
            "sci_grams_per_request",
        ):
            assert key in w
        assert set(w["energy_joules"]) == {"total", "dynamic", "idle_serving", "idle_standby"}
    assert doc["since_start"]["requests"] == 3
    for key in ("power_watts", "idle_baseline_watts", "carbon_intensity"):
        assert key in doc
    assert "source" in doc["carbon_intensity"]
    json.dumps(doc)


@pytest.mark.parametrize(("period_s", "hand_overs"), [(3600.0, 2), (0.0, 6)])
async def test_stream_tokens_reach_the_ledger_once_a_period(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, period_s: float, hand_overs: int
) -> None:
    """Streamed tokens go to the ledger batched per period (first at once, rest at the end)."""
    meter, proxy = rig.sidecar.meter, rig.sidecar.proxy
    assert meter is not None
    assert proxy is not None
    monkeypatch.setattr(proxy, "_token_period_s", period_s)
    calls: list[int] = []
    tokens = meter.ledger.tokens

    def record(rid: str, t: float, count: int = 1) -> None:
        calls.append(count)
        tokens(rid, t, count)

    monkeypatch.setattr(meter.ledger, "tokens", record)
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    direct, proxied, resp = await both(
        rig, "POST", "/v1/chat/completions", json={**body, "max_tokens": 6, "delay": 0.01}
    )
    assert resp.status == 200
    assert proxied == direct
    assert calls
    assert sum(calls) == 6
    assert len(calls) == hand_overs
    assert await rig.value("llm_energy_tokens_total", model="b", kind="completion") == 6


async def test_a_chunk_goes_out_before_the_meter_hears_of_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first token's chunk is written before the meter is told, with the time it arrived."""
    meter, proxy = rig.sidecar.meter, rig.sidecar.proxy
    assert meter is not None
    assert proxy is not None
    events: list[tuple[str, float | None]] = []
    base, clock = proxy.response_class, proxy._clock

    class Logged(base):  # type: ignore[misc, valid-type]
        async def write(self, data: bytes | bytearray | memoryview) -> None:
            events.append(("write", clock()))
            await super().write(data)

    first_token = meter.first_token

    def told(rid: str, time_s: float | None = None, prompt_tokens: int | None = None) -> None:
        events.append(("first_token", time_s))
        first_token(rid, time_s, prompt_tokens)

    monkeypatch.setattr(proxy, "response_class", Logged)
    monkeypatch.setattr(meter, "first_token", told)
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    direct, proxied, resp = await both(
        rig, "POST", "/v1/chat/completions", json={**body, "max_tokens": 3, "delay": 0.01}
    )
    assert resp.status == 200
    assert proxied == direct
    kinds = [k for k, _ in events]
    assert kinds.count("first_token") == 1
    at = kinds.index("first_token")
    assert kinds[:at] == ["write"]  # told right after its chunk was written, not before
    arrived, written = events[at][1], events[at - 1][1]
    assert arrived is not None
    assert written is not None
    assert arrived <= written  # the time is the chunk's arrival, not the hand-over's


async def test_first_token_brings_the_prompt_count_the_stream_reported(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream whose first chunk reports the prompt (Messages' message_start) hands the ledger
    that exact count with the first token; one that does not, none."""
    meter = rig.sidecar.meter
    assert meter is not None
    got: list[int | None] = []
    first_token = meter.ledger.first_token

    def record(rid: str, t: float, *, prompt_tokens: int | None = None) -> None:
        got.append(prompt_tokens)
        first_token(rid, t, prompt_tokens=prompt_tokens)

    monkeypatch.setattr(meter.ledger, "first_token", record)
    msg = {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user"}]}
    direct, proxied, resp = await both(rig, "POST", "/v1/messages", json=msg)
    assert resp.status == 200
    assert proxied == direct
    start = json.loads(direct.split(b"data: ", 2)[1].split(b"\n", 1)[0])
    assert start["type"] == "message_start"
    assert got == [start["message"]["usage"]["input_tokens"]]
    chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    paced = {**chat, "max_tokens": 3, "delay": 0.01}  # the usage chunk comes 30 ms after the first
    _, proxied, resp = await both(rig, "POST", "/v1/chat/completions", json=paced)
    assert resp.status == 200
    assert got[1:] == [None]
