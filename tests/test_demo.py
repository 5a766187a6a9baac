"""`llm-energy-sidecar demo` runs the whole product, serves /metrics while it runs, exits 0."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
from demo_proc import start_demo
from procs import free_port


async def test_demo_runs_serves_metrics_and_summarises() -> None:
    """A short demo prints live lines and a final summary, and /metrics answers meanwhile."""
    port, mport = free_port(), free_port()
    # The demo reads no environment: a stray upstream must not reach it.
    env = {"LLM_ENERGY_UPSTREAM": "http://must-be-ignored.invalid"}
    proc = start_demo(port, mport, "--duration", "4", "--rps", "6", env=env)
    text = ""
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(60):
                await asyncio.sleep(0.2)
                try:
                    async with session.get(f"http://127.0.0.1:{mport}/metrics") as r:
                        text = await r.text()
                    if "llm_energy_requests_total{" in text:
                        break
                except aiohttp.ClientError:
                    continue
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert 'llm_energy_build_info{mode="proxy",power_source="simulated"' in text
    assert "J/req" in out
    assert "summary" in out
    for label in (
        "GPU energy",
        "idle share",
        "energy per request",
        "energy per output token",
        "gCO2e per request",
        "SCI per 1,000 output tokens",
    ):
        assert label in out
    assert "Traceback" not in err


async def test_demo_stops_cleanly_on_ctrl_c() -> None:
    """SIGINT ends the demo early with its summary and exit status 0."""
    port, mport = free_port(), free_port()
    proc = start_demo(port, mport, "--duration", "60")
    try:
        await asyncio.sleep(3.0)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "summary" in out
    assert "Traceback" not in err
