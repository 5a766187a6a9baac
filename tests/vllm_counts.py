"""Measuring through the sidecar beside a real vLLM: its process, both sides' counters.

Helpers of tests/test_real_vllm.py. Counts are read from ``/metrics`` pages, the sidecar's and
vLLM's, so a delta compares what each side booked over the same requests.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from vllm_server import VllmServer, http_status

SETTLE_TIMEOUT_S = 30.0


@dataclass
class Sidecar:
    """A sidecar process with its stderr drained (its log lines must not fill the pipe)."""

    proc: subprocess.Popen[str]
    url: str
    metrics_url: str
    log: deque[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _drain(proc: subprocess.Popen[str], log: deque[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        log.append(line)


def run_sidecar(proc: subprocess.Popen[str], port: int, mport: int) -> Sidecar:
    """Waits (synchronously: session fixtures have no loop) for ``/healthz``."""
    log: deque[str] = deque(maxlen=2000)
    threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
    sidecar = Sidecar(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics", log)
    deadline = time.monotonic() + 30
    while http_status(f"http://127.0.0.1:{mport}/healthz") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            sidecar.stop()
            raise RuntimeError("sidecar did not start:\n" + "".join(log)[-3000:])
        time.sleep(0.1)
    return sidecar


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, url
        return await r.text()


def total(text: str, sample: str, **labels: str) -> float:
    """Sum of the samples named ``sample`` whose labels include ``labels``."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


@dataclass(frozen=True)
class Counts:
    """What the sidecar and vLLM had booked at one moment."""

    ours_prompt: float
    ours_completion: float
    ours_requests: float  # llm_energy_request_joules_count: finished inference requests
    ours_by_endpoint: dict[str, float]
    vllm_prompt: float
    vllm_completion: float
    vllm_finished: float

    def minus(self, before: Counts) -> Counts:
        endpoints = self.ours_by_endpoint.keys() | before.ours_by_endpoint.keys()
        return Counts(
            self.ours_prompt - before.ours_prompt,
            self.ours_completion - before.ours_completion,
            self.ours_requests - before.ours_requests,
            {
                e: self.ours_by_endpoint.get(e, 0.0) - before.ours_by_endpoint.get(e, 0.0)
                for e in endpoints
            },
            self.vllm_prompt - before.vllm_prompt,
            self.vllm_completion - before.vllm_completion,
            self.vllm_finished - before.vllm_finished,
        )


async def counts(sidecar: Sidecar, vllm: VllmServer) -> Counts:
    ours, theirs = await asyncio.gather(scrape(sidecar.metrics_url), scrape(vllm.metrics_url))
    endpoints = {
        s.labels["endpoint"]
        for f in text_string_to_metric_families(ours)
        for s in f.samples
        if s.name == "llm_energy_requests_total"
    }
    return Counts(
        total(ours, "llm_energy_tokens_total", kind="prompt"),
        total(ours, "llm_energy_tokens_total", kind="completion"),
        total(ours, "llm_energy_request_joules_count"),
        {e: total(ours, "llm_energy_requests_total", endpoint=e) for e in endpoints},
        total(theirs, "vllm:prompt_tokens_total"),
        total(theirs, "vllm:generation_tokens_total"),
        total(theirs, "vllm:request_success_total"),
    )


def exactly(n: int) -> Callable[[Counts], bool]:
    """:func:`settled`'s test where the sidecar must book vLLM's own counts exactly."""
    return lambda d: (
        d.ours_requests >= n
        and d.ours_prompt == d.vllm_prompt
        and d.ours_completion == d.vllm_completion
    )


async def settled(
    sidecar: Sidecar, vllm: VllmServer, before: Counts, n: int, ready: Callable[[Counts], bool]
) -> Counts:
    """The deltas once vLLM finished ``n`` requests and ``ready`` holds (or the time is up:
    the caller's assertions then show what was missing)."""
    deadline = asyncio.get_running_loop().time() + SETTLE_TIMEOUT_S
    while True:
        delta = (await counts(sidecar, vllm)).minus(before)
        if (delta.vllm_finished >= n and ready(delta)) or (
            asyncio.get_running_loop().time() > deadline
        ):
            return delta
        await asyncio.sleep(0.25)


async def steady(sidecar: Sidecar, vllm: VllmServer) -> Counts:
    """Counts once two reads 1.5 s apart agree: every scrape of past work is in."""
    previous = await counts(sidecar, vllm)
    for _ in range(20):
        await asyncio.sleep(1.5)
        now = await counts(sidecar, vllm)
        if now == previous:
            break
        previous = now
    return now


def within_1_percent(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= 0.01 * theirs
