"""Helpers for tests that start real processes: free ports, waiting for readiness."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m sidecar run ...` with a clean LLM_ENERGY_* environment and JSON logs."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ENERGY_")}
    clean.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean,
        cwd=ROOT,
    )


def start_simulated(
    upstream: str, port: int, metrics_port: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """A sidecar on a simulated GPU in front of ``upstream``, listening on 127.0.0.1 only."""
    return start_sidecar(
        "--upstream",
        upstream,
        "--power-source",
        "simulated",
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        *extra,
        env=env,
    )


async def wait_http(
    url: str, timeout_s: float = 20.0, proc: subprocess.Popen[str] | None = None
) -> None:
    """Poll until ``url`` answers (any status), the process died, or time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"process exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
                )
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    await r.read()
                    return
            except (TimeoutError, aiohttp.ClientError):
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s} s")
            await asyncio.sleep(0.1)
