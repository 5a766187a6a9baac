"""Start-up before the power source knows the pod's GPUs: wait, serve un-metered, attach."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fake_pynvml import FakeGpu, FakeNvml
from procs import free_port, start_sidecar, wait_http
from prometheus_client.parser import text_string_to_metric_families
from test_power_dcgm import Exporter, node
from upstreams import create_upstream

from sidecar.app import Sidecar
from sidecar.config import Settings
from sidecar.power.nvml import NvmlSource

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def scrape(
    metrics: TestClient[Any, Any],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await (await metrics.get("/metrics")).text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_dcgm_not_yet_mapped_serves_unmetered_then_attaches(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    """Until dcgm-exporter maps the pod the proxy serves, un-metered and counted; then it meters."""
    exporter = Exporter(gpus=[g for g in node() if g.pod != "vllm-0"])  # the kubelet is late
    server = await aiohttp_server(exporter.app())
    upstream = await aiohttp_server(create_upstream())
    settings = Settings(
        upstream=str(upstream.make_url("/")),
        power_source=f"dcgm:{server.make_url('/metrics')}",
        upstream_read_timeout=10,
    )
    sidecar = Sidecar(settings, env={"POD_NAME": "vllm-0", "POD_NAMESPACE": "llm"})
    await sidecar.start()  # does not raise: the pod is not mapped yet
    try:
        assert sidecar.meter is None
        proxy = await aiohttp_client(sidecar.proxy_app())
        metrics = await aiohttp_client(sidecar.metrics_app())
        async with proxy.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            await r.read()
        got = await scrape(metrics)
        assert got[("llm_energy_power_source_waiting", ())] == 1.0
        assert got[("llm_energy_unmetered_requests_total", ())] == 1.0
        assert (
            got[("llm_energy_sampler_errors_total", (("gpu", ""), ("reason", "not_mapped")))] >= 1
        )
        assert (await (await metrics.get("/summary")).json())[
            "status"
        ] == "waiting_for_power_source"
        assert (await metrics.get("/readyz")).status == 200  # readiness is the upstream's

        exporter.gpus = node()  # the pod is mapped now
        await until(lambda: _attached(sidecar))
        async with proxy.post("/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            await r.read()
        got = await scrape(metrics)
        assert got[("llm_energy_power_source_waiting", ())] == 0.0
        assert got[("llm_energy_unmetered_requests_total", ())] == 1.0
        info = {k[1] for k in got if k[0] == "llm_energy_gpu_info"}
        assert {dict(labels)["gpu"] for labels in info} == {"1", "2"}
        assert (
            got[("llm_energy_sampler_errors_total", (("gpu", ""), ("reason", "not_mapped")))] >= 1
        )
        summary = await (await metrics.get("/summary")).json()
        assert [g["gpu"] for g in summary["gpus"]] == ["1", "2"]
        assert sidecar.meter is not None
        assert sum(n for (_, e, _), n in sidecar.meter.requests.items() if e == "chat") == 1
    finally:
        await sidecar.stop()


async def _attached(sidecar: Sidecar) -> bool:
    return sidecar.meter is not None


async def test_observer_only_waits_too(aiohttp_server: ServerFactory) -> None:
    """Without a proxy the wait is the same: no exit, the GPUs attach when mapped."""
    exporter = Exporter(gpus=[])
    server = await aiohttp_server(exporter.app())
    settings = Settings(
        observe="http://127.0.0.1:9/metrics",
        power_source=f"dcgm:{server.make_url('/metrics')}",
    )
    sidecar = Sidecar(settings, env={"POD_NAME": "vllm-0", "POD_NAMESPACE": "llm"})
    await sidecar.start()
    try:
        assert sidecar.proxy is None
        assert sidecar.meter is None
        exporter.gpus = node()
        await until(lambda: _attached(sidecar))
        assert [g.gpu for g in sidecar.gpus] == ["1", "2"]
    finally:
        await sidecar.stop()


async def test_run_with_an_unreachable_exporter_serves_and_says_why(
    aiohttp_server: ServerFactory,
) -> None:
    """`run --power-source dcgm:URL` with no exporter yet does not exit: it proxies and reports."""
    upstream = await aiohttp_server(create_upstream())
    port, mport, dead = free_port(), free_port(), free_port()
    proc = start_sidecar(
        "--upstream",
        str(upstream.make_url("/")),
        "--power-source",
        f"dcgm:http://127.0.0.1:{dead}/metrics",
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{mport}",
        env={"POD_NAME": "vllm-0", "POD_NAMESPACE": "llm"},
    )
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            async with session.get(f"http://127.0.0.1:{mport}/metrics") as r:
                text = await r.text()
        assert "llm_energy_power_source_waiting 1.0" in text
        assert 'llm_energy_sampler_errors_total{gpu="",reason="not_mapped"}' in text
        assert "process_resident_memory_bytes" in text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert "sidecar.power_source_waiting" in proc.stdout.read() + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_discovery_retries_until_the_model_runs_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A native sidecar starts before the model: discovery waits, then meters the model's GPU."""
    import sidecar.app as app_module

    gpus = [FakeGpu(f"GPU-{i:08x}-0000-1111-2222-333344445555") for i in range(3)]
    gpus[0].pids = [999]  # another tenant's process
    nvml = FakeNvml(gpus)
    monkeypatch.setattr(
        app_module,
        "build_source",
        lambda *a, **k: NvmlSource(
            None, nvml=nvml, env={"NVIDIA_VISIBLE_DEVICES": "all"}, model_pids=lambda: {4242}
        ),
    )
    sidecar = Sidecar(Settings.without_env(observe="http://127.0.0.1:9/metrics"), env={})
    await sidecar.start()
    try:
        assert sidecar.meter is None
        gpus[2].pids = [4242]  # the model's process is on GPU 2 now
        await until(lambda: _attached(sidecar))
        assert [g.uuid for g in sidecar.gpus] == [gpus[2].uuid]
    finally:
        await sidecar.stop()
