"""`llm-energy-sidecar run` as a real process: serves, records, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from procs import ROOT, free_port, start_simulated, wait_http
from prometheus_client.parser import text_string_to_metric_families
from upstreams import create_upstream

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


async def test_sigterm_drains_streams_and_records(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """SIGTERM lets an in-flight stream finish, flushes the recorder and exits 0."""
    upstream = await aiohttp_server(create_upstream())
    port, mport = free_port(), free_port()
    rec = tmp_path / "rec"
    proc = start_simulated(
        str(upstream.make_url("/")),
        port,
        mport,
        "--sample-hz",
        "20",
        "--record",
        str(rec),
        "--grace-period",
        "20",
        "--model",
        "fallback-model",
    )
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        async with aiohttp.ClientSession() as session:
            quick = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            for _ in range(3):
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=quick
                ) as r:
                    assert r.status == 200
            async with session.get(f"http://127.0.0.1:{mport}/readyz") as r:
                assert r.status == 200
            body = {
                "model": "slow",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
                "max_tokens": 40,
                "delay": 0.05,
                "stream_options": {"include_usage": True},
            }
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                first = await r.content.readany()
                proc.send_signal(signal.SIGTERM)
                rest = await r.read()
            stream = first + rest
            assert stream.endswith(b"data: [DONE]\n\n")
            assert stream.count(b"data: ") == 40 + 2
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    power = (rec / "power.csv").read_text().splitlines()
    requests = (rec / "requests.csv").read_text().splitlines()
    assert power[0] == "time_s,gpu,power_w,energy_j"
    assert len(power) > 10
    assert len(requests) == 1 + 4
    assert any(",served-model," in line for line in requests)  # named by the response
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "sidecar",
            "attribute",
            "--power",
            str(rec / "power.csv"),
            "--requests",
            str(rec / "requests.csv"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    doc = json.loads(out.stdout)
    assert len(doc["requests"]) == 4
    e = doc["energy_joules"]
    assert sum(r["energy_joules"] for r in doc["requests"]) + e["idle_standby"] == __import__(
        "pytest"
    ).approx(e["total"], rel=1e-6)


async def test_metrics_has_every_contract_family(aiohttp_server: ServerFactory) -> None:
    """A running sidecar exposes every metric family the contract names."""
    upstream = await aiohttp_server(create_upstream())
    port, mport = free_port(), free_port()
    proc = start_simulated(
        str(upstream.make_url("/")),
        port,
        mport,
        "--emissions-budget",
        "500",
        "--region",
        "FR",
        "--pue",
        "1.2",
        "--tenant-header",  # the tenant families exist with showback on
        "x-tenant-id",
    )
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                assert r.status == 200
            await asyncio.sleep(1.5)
            async with session.get(f"http://127.0.0.1:{mport}/metrics") as r:
                text = await r.text()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    names = {f.name for f in text_string_to_metric_families(text)}
    contract = ROOT.parent / "shared" / "CONTRACT.md"
    expected = {
        "llm_energy_gpu_power_watts",
        "llm_energy_gpu_energy_joules",
        "llm_energy_joules",
        "llm_energy_idle_baseline_watts",
        "llm_energy_inflight_requests",
        "llm_energy_requests",
        "llm_energy_request_joules",
        "llm_energy_model_joules",
        "llm_energy_model_emissions_grams",
        "llm_energy_tokens",
        "llm_energy_emissions_grams",
        "llm_energy_carbon_intensity_grams_per_kwh",
        "llm_energy_pue",
        "llm_energy_emissions_budget_grams_per_day",
        "llm_energy_sampler_samples",
        "llm_energy_sampler_errors",
        "llm_energy_build_info",
    }
    assert expected <= names, expected - names
    if contract.exists():
        import re

        named = {
            m.removesuffix("_total")
            for m in re.findall(r"`(llm_energy_[a-z_]+)`", contract.read_text())
        }
        assert named <= names, named - names
    assert 'llm_energy_carbon_intensity_grams_per_kwh{region="FR",source="static"}' in text
    assert "llm_energy_pue 1.2" in text
    assert 'mode="proxy"' in text
