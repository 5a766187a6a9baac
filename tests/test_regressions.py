"""Regressions found in review: each test pins a bug that was fixed."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from procs import free_port, start_simulated, wait_http
from prometheus_client.parser import text_string_to_metric_families
from upstreams import STATE, create_upstream

from sidecar.app import Sidecar
from sidecar.config import Settings, load_settings
from sidecar.ledger import Ledger
from sidecar.meter import FixedIntensity, Meter
from sidecar.power.base import GpuInfo, PowerSample
from sidecar.reconcile import Reconciler

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


# ------------------------------------------------------------------ helpers
def _meter(clock: list[float], *, hold_s: float = 0.0) -> Meter:
    return Meter(
        [GpuInfo("0", "GPU-0", "sim")],
        clock=lambda: clock[0],
        intensity=FixedIntensity(400.0, "xx", "fixed"),
        hold_s=hold_s,
    )


def _run_samples(meter: Meter, clock: list[float], until_s: float, power_w: float = 100.0) -> None:
    while clock[0] < until_s - 1e-9:
        clock[0] = round(clock[0] + 0.1, 6)
        meter.on_samples([PowerSample(clock[0], "0", power_w)])


async def _metric(client: TestClient[Any, Any], name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


@pytest.fixture
async def proxied(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> AsyncIterator[tuple[Sidecar, TestClient[Any, Any], TestClient[Any, Any], web.Application]]:
    upstream = create_upstream()
    server = await aiohttp_server(upstream)
    sidecar = Sidecar(
        Settings(
            upstream=str(server.make_url("/")),
            power_source="simulated",
            sample_hz=50,
            upstream_read_timeout=10,
        ),
        env={},
    )
    await sidecar.start()
    try:
        proxy = await aiohttp_client(sidecar.proxy_app())
        metrics = await aiohttp_client(sidecar.metrics_app())
        yield sidecar, proxy, metrics, upstream
    finally:
        await sidecar.stop()


# ------------------------------------------------------------------ reconcile
def test_slow_energy_counter_is_not_over_counted() -> None:
    """A counter refreshed every 30 s (dcgm-exporter's default) reconciles to its own increase."""
    rec = Reconciler()
    out: list[PowerSample] = []
    for i in range(901):  # 90 s at 10 Hz, constant 100 W
        t = i * 0.1
        counter_j = 100.0 * 30 * int(t // 30 + 1e-9)  # steps at 0, 30, 60, 90 s
        out += rec.push(PowerSample(t, "0", 100.0, counter_j))
    out += rec.flush()
    integral = sum(
        (a.power_w + b.power_w) / 2.0 * (b.time_s - a.time_s) for a, b in itertools.pairwise(out)
    )
    assert integral == pytest.approx(9000.0, rel=0.02)


# ------------------------------------------------------------------ observer mode
def test_observer_span_restarts_after_one_idle_scrape() -> None:
    """A model active, idle for one scrape, then active again keeps its tokens and activity."""
    clock = [0.0]
    meter = _meter(clock, hold_s=2.5)
    _run_samples(meter, clock, 1.0)
    meter.observed(
        "llama", since_s=0.0, until_s=1.0, running=1, prompt_tokens=10, completion_tokens=5,
        finished=0,
    )  # fmt: skip
    _run_samples(meter, clock, 2.0)
    meter.observed(
        "llama", since_s=1.0, until_s=2.0, running=0, prompt_tokens=0, completion_tokens=0,
        finished=1,
    )  # fmt: skip
    _run_samples(meter, clock, 3.0)
    meter.observed(
        "llama", since_s=2.0, until_s=3.0, running=1, prompt_tokens=10, completion_tokens=5,
        finished=0,
    )  # fmt: skip
    assert meter.tokens[("llama", "completion")] == 10


def test_observer_inflight_gauge_is_the_running_count() -> None:
    """In observer mode the in-flight figure is the server's running count, not one per model."""
    clock = [0.0]
    meter = _meter(clock, hold_s=2.5)
    _run_samples(meter, clock, 1.0)
    meter.observed(
        "llama", since_s=0.0, until_s=1.0, running=8, prompt_tokens=10, completion_tokens=5,
        finished=0,
    )  # fmt: skip
    assert meter.in_flight().get("llama") == 8


# ------------------------------------------------------------------ ledger
def test_gpu_back_from_silence_keeps_in_flight_energy_out_of_standby() -> None:
    """A GPU whose samples resume after a gap still splits its in-flight time into serving phases."""
    ledger = Ledger(["0", "1"], idle_watts={"0": 50.0, "1": 50.0})
    for i in range(11):
        ledger.sample("0", i * 0.1, 100.0)
        ledger.sample("1", i * 0.1, 100.0)
    ledger.start("r", 2.0, model="m")
    ledger.finish("r", 3.0)
    for i in range(11, 300):  # GPU 1 is silent from 1 s to 30 s
        ledger.sample("0", i * 0.1, 100.0)
    ledger.sample("1", 30.0, 100.0)
    ledger.flush()
    # 1 s in flight on 2 GPUs at 100 W against a 50 W baseline: 100 J each phase
    assert ledger.phase_j["idle_serving"] == pytest.approx(100.0)
    assert ledger.phase_j["dynamic"] == pytest.approx(100.0)


# ------------------------------------------------------------------ sampler
async def test_sampler_survives_a_recorder_write_failure(tmp_path: Path) -> None:
    """A failing trace write (disk full) does not stop power sampling, nor make stop() raise."""
    sidecar = Sidecar(
        Settings(
            upstream="http://127.0.0.1:9",
            power_source="simulated",
            sample_hz=50,
            record=tmp_path / "rec",
        ),
        env={},
    )
    await sidecar.start()
    assert sidecar.recorder is not None
    real = sidecar.recorder.power
    calls = [0]

    def flaky(time_s: float, gpu: str, power_w: float, energy_j: float | None) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(28, "No space left on device")
        real(time_s, gpu, power_w, energy_j)

    sidecar.recorder.power = flaky  # type: ignore[method-assign]
    try:
        await asyncio.sleep(0.3)
        reads = sidecar.stats().reads
        await asyncio.sleep(0.5)
        assert sidecar.stats().reads > reads + 5
    finally:
        await sidecar.stop()


# ------------------------------------------------------------------ proxy
async def test_cancelled_stream_counts_the_tokens_it_streamed(
    proxied: tuple[Sidecar, TestClient[Any, Any], TestClient[Any, Any], web.Application],
) -> None:
    """A stream the client abandons still counts its streamed completion tokens."""
    _sidecar, proxy, metrics, upstream = proxied
    body = {
        "model": "slow",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "max_tokens": 1000,
        "delay": 0.02,
    }
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.make_url("/v1/chat/completions"), json=body)
        got = b""
        while got.count(b"data: ") < 10:
            got += await resp.content.readany()
        resp.close()
    for _ in range(100):
        cancelled = await _metric(
            metrics, "llm_energy_requests_total", model="slow", endpoint="chat", status="cancelled"
        )
        if cancelled == 1 and upstream[STATE].get("streams_open") == 0:
            break
        await asyncio.sleep(0.05)
    assert cancelled == 1
    assert await _metric(metrics, "llm_energy_tokens_total", model="slow", kind="completion") >= 10


# ------------------------------------------------------------------ shutdown
async def test_grace_period_zero_does_not_wait_for_streams(aiohttp_server: ServerFactory) -> None:
    """With --grace-period 0, SIGTERM ends the process promptly instead of waiting out streams."""
    upstream = await aiohttp_server(create_upstream())
    port, mport = free_port(), free_port()
    proc = start_simulated(
        str(upstream.make_url("/")),
        port,
        mport,
        "--grace-period",
        "0",
    )
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        body = {
            "model": "slow",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "max_tokens": 60,
            "delay": 0.5,  # a 30 s stream
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r,
        ):
            await r.content.readany()
            proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(proc.wait, 8)
            except subprocess.TimeoutExpired:
                code = None
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ settings
def test_yaml_gpus_as_a_list_of_indices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpus: [0, 1]` in the YAML config selects GPUs 0 and 1, as `--gpus 0,1` does."""
    monkeypatch.delenv("LLM_ENERGY_GPUS", raising=False)
    config = tmp_path / "sidecar.yaml"
    config.write_text("upstream: http://127.0.0.1:8000\ngpus: [0, 1]\n")
    assert load_settings({}, config).gpus == ("0", "1")


# ------------------------------------------------------------------ summary
def test_summary_last_minute_includes_requests_before_the_first_tick() -> None:
    """In the first minute, /summary's last_minute counts every request since start."""
    clock = [0.0]
    meter = _meter(clock)
    clock[0] = 0.1
    rid = meter.request_started("chat", "m", 10.0)
    clock[0] = 0.2
    meter.request_finished(rid, "ok", 10, 5)
    clock[0] = 0.5
    meter.tick()
    clock[0] = 1.0
    doc = meter.summary({})
    assert doc["since_start"]["requests"] == 1
    assert doc["last_minute"]["requests"] == 1


async def test_long_upstream_response_header_passes_through(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    """An upstream reply with a 9 KB header reaches the client, not a 502 'upstream unreachable'."""

    async def big(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Big": "a" * 9000})

    app = web.Application()
    app.router.add_get("/big", big)
    server = await aiohttp_server(app)
    sidecar = Sidecar(
        Settings(upstream=str(server.make_url("/")), power_source="simulated"), env={}
    )
    await sidecar.start()
    try:
        proxy = await aiohttp_client(sidecar.proxy_app())
        r = await proxy.get("/big", max_line_size=16384, max_field_size=16384)
        assert r.status == 200
    finally:
        await sidecar.stop()
