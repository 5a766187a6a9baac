"""The proxy's defaults on real shapes: usage injection and its fallback, tenants, the parse budget."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from test_proxy import Rig, both, make_rig
from upstreams import STATE

from sidecar.app import Sidecar
from sidecar.config import Settings
from sidecar.tracking.budget import ParseBudget

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

STREAM = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "max_tokens": 5,
}


@pytest.fixture
async def rig(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> AsyncIterator[Rig]:
    async for r in make_rig(aiohttp_server, aiohttp_client):
        yield r


async def calibrate(rig: Rig) -> None:
    """Streams until the proxy knows whether the upstream writes `usage: null` unasked."""
    assert rig.sidecar.proxy is not None
    for _ in range(2):
        await both(rig, "POST", "/v1/chat/completions", json=STREAM)
    assert rig.sidecar.proxy.null_usage_unasked is not None


async def test_refused_stream_options_resends_the_original(rig: Rig) -> None:
    """A 4xx naming stream_options: the original body goes, the client sees a normal stream."""
    await calibrate(rig)
    rig.upstream[STATE]["refuse_stream_options"] = True
    direct, proxied, resp = await both(rig, "POST", "/v1/chat/completions", json=STREAM)
    assert resp.status == 200
    assert proxied == direct
    assert rig.upstream[STATE]["refused"] == 1
    assert rig.sidecar.proxy is not None
    assert not rig.sidecar.proxy.injecting
    await both(rig, "POST", "/v1/chat/completions", json=STREAM)
    assert rig.upstream[STATE]["refused"] == 1  # injection stays off for this upstream
    ok = await rig.value("llm_energy_requests_total", model="m", endpoint="chat", status="ok")
    assert ok == 4


async def test_other_4xx_reaches_the_client_as_sent(rig: Rig) -> None:
    """A 4xx about anything else is the client's answer, byte for byte; injection stays on."""
    await calibrate(rig)
    rig.upstream[STATE]["reject_all"] = True
    direct, proxied, resp = await both(rig, "POST", "/v1/chat/completions", json=STREAM)
    assert resp.status == 429
    assert proxied == direct
    assert rig.sidecar.proxy is not None
    assert rig.sidecar.proxy.injecting


async def test_server_writing_null_usage_unasked_stays_exact(rig: Rig) -> None:
    """An SGLang-like upstream (`usage: null` always): once known, injected streams keep them."""
    rig.upstream[STATE]["always_null"] = True
    await calibrate(rig)  # the first stream's nulls went: OpenAI says they come from asking
    assert rig.sidecar.proxy is not None
    assert rig.sidecar.proxy.null_usage_unasked is True
    direct, proxied, _ = await both(rig, "POST", "/v1/chat/completions", json=STREAM)
    assert proxied == direct
    assert b'"usage": null' in proxied
    assert await rig.value("llm_energy_tokens_total", model="m", kind="prompt") == 22


async def test_no_inject_usage_sends_bodies_as_is(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    """--no-inject-usage: no stream_options ever reaches the upstream."""
    async for r in make_rig(aiohttp_server, aiohttp_client, inject_usage=False):
        r.upstream[STATE]["refuse_stream_options"] = True
        for _ in range(3):
            _, _, resp = await both(r, "POST", "/v1/chat/completions", json=STREAM)
            assert resp.status == 200
        assert r.upstream[STATE].get("refused", 0) == 0


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
@pytest.mark.parametrize("stream", [False, True])
async def test_responses_and_messages_through_the_proxy(rig: Rig, path: str, stream: bool) -> None:
    """Real vLLM Responses and Messages bodies pass untouched and count vLLM's own tokens."""
    body = {"model": "tiny-llama", "input": "hi", "stream": stream, "max_tokens": 20}
    direct, proxied, _ = await both(rig, "POST", path, json=body)
    assert proxied == direct
    endpoint = "responses" if path.endswith("responses") else "chat"
    n = await rig.value(
        "llm_energy_requests_total", model="tiny-llama", endpoint=endpoint, status="ok"
    )
    assert n == 1
    assert await rig.value("llm_energy_tokens_total", model="tiny-llama", kind="prompt") == 24
    assert await rig.value("llm_energy_tokens_total", model="tiny-llama", kind="completion") == 20


async def test_small_budget_streams_large_bodies_through(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past the parse budget bodies pass unparsed: exact, counted, logged once, nothing held after."""
    assert rig.sidecar.proxy is not None
    rig.sidecar.proxy.budget = ParseBudget(1000)
    big = {"model": "embedder", "input": "x" * 50_000}
    direct, proxied, _ = await both(rig, "POST", "/v1/embeddings", json=big)
    assert proxied == direct
    upload = bytes(range(256)) * 400
    _, proxied, _ = await both(rig, "POST", "/upload", data=upload)
    assert json.loads(proxied)["sha256"] == hashlib.sha256(upload).hexdigest()
    await both(rig, "POST", "/v1/embeddings", json=big)
    assert rig.sidecar.proxy.budget.held_bytes == 0
    assert rig.sidecar.proxy.budget.refused >= 2
    assert capsys.readouterr().out.count("proxy.parse_budget_full") == 1
    n = await rig.value(
        "llm_energy_requests_total", model="embedder", endpoint="embedding", status="ok"
    )
    assert n == 2


async def test_budget_is_returned_when_the_client_leaves(rig: Rig) -> None:
    """A stream cut by its client gives its reservation back."""
    assert rig.sidecar.proxy is not None
    body = {**STREAM, "max_tokens": 50, "delay": 0.05}
    async with rig.proxy.session.post(rig.proxy.make_url("/v1/chat/completions"), json=body) as r:
        await r.content.readany()
    for _ in range(100):
        if rig.sidecar.proxy.inflight == 0:
            break
        import asyncio

        await asyncio.sleep(0.02)
    assert rig.sidecar.proxy.inflight == 0
    assert rig.sidecar.proxy.budget.held_bytes == 0


class TestTenants:
    """Showback labels from the proxy: header, salted key digest, bounds, no raw key anywhere."""

    async def test_header_and_bounds(
        self, aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
    ) -> None:
        """Valid header values become labels (up to --max-tenants), bad ones `invalid`, none `none`."""
        async for r in make_rig(
            aiohttp_server, aiohttp_client, tenant_header="x-tenant-id", max_tenants=2
        ):
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            for tenant in ("team-a", "team-b", "team-c", "bad value!", None):
                headers = {"x-tenant-id": tenant} if tenant else {}
                resp = await r.proxy.post("/v1/chat/completions", json=chat, headers=headers)
                await resp.read()
            await r.proxy.post("/status/500", json={}, headers={"x-tenant-id": "team-z"})
            assert r.sidecar.meter is not None
            r.sidecar.meter.flush()
            text = await (await r.metrics.get("/metrics")).text()
            tenants = {
                line.split('tenant="', 1)[1].split('"', 1)[0]
                for line in text.splitlines()
                if line.startswith("llm_energy_tenant_joules_total{")
            }
            assert tenants <= {"team-a", "team-b", "other", "invalid", "none"}
            assert {"team-a", "team-b", "invalid", "none"} <= tenants
            assert "team-z" not in text

    async def test_api_key_digest_never_the_key(
        self,
        aiohttp_server: ServerFactory,
        aiohttp_client: ClientFactory,
        capsys: pytest.CaptureFixture[str],
        tmp_path: Path,
    ) -> None:
        """The tenant is sha256(salt + token)[:12]; the raw key is in no metric, log or record."""
        from sidecar import logs

        logs.configure("debug", json=True)
        key = "sk-live-abcdef-0123456789"
        env = {"LLM_ENERGY_TENANT_SALT": "pepper"}
        rec = tmp_path / "rec"
        async for r in make_rig(
            aiohttp_server, aiohttp_client, env=env, tenant_from_api_key=True, record=rec
        ):
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            resp = await r.proxy.post(
                "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"}
            )
            await resp.read()
            assert r.sidecar.meter is not None
            r.sidecar.meter.flush()
            text = await (await r.metrics.get("/metrics")).text()
            summary = await (await r.metrics.get("/summary")).text()
            digest = hashlib.sha256(b"pepper" + key.encode()).hexdigest()[:12]
            assert f'tenant="{digest}"' in text
        records = "".join(f.read_text() for f in rec.iterdir() if f.is_file())
        captured = capsys.readouterr()
        everything = text + summary + captured.out + captured.err + records
        assert len((rec / "requests.csv").read_text().splitlines()) >= 2  # the request is recorded
        assert key not in everything
        assert "abcdef-0123456789" not in everything

    def test_salt_is_required(self) -> None:
        """--tenant-from-api-key without LLM_ENERGY_TENANT_SALT is a one-line start-up error."""
        settings = Settings(
            upstream="http://127.0.0.1:9", power_source="simulated", tenant_from_api_key=True
        )
        with pytest.raises(ValueError, match=r"^--tenant-from-api-key: .*LLM_ENERGY_TENANT_SALT"):
            Sidecar(settings, env={})
