"""Energy receipts through a real vLLM: the official client works unchanged, the figures agree.

The sidecar (a real process, simulated GPU, default 10 Hz) runs with ``--energy-receipts``
in front of the session's vLLM. For each shape the official ``openai`` client gets the same
text as from vLLM directly (greedy decoding), the raw bytes end with the receipt comment
(then ``data: [DONE]`` where vLLM sends one) or carry the ``energy`` member, and a final
receipt's energy equals what the request added to ``llm_energy_request_joules_sum``.
Run with ``-rP`` to see how many receipts were final.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Generator
from typing import Any

import aiohttp
import openai
import pytest
from procs import free_port, start_simulated
from vllm_counts import SETTLE_TIMEOUT_S, Sidecar, run_sidecar, scrape, total
from vllm_server import VllmServer

pytestmark = pytest.mark.vllm

MODEL = "tiny-llama"
MAX_TOKENS = 24
PROMPT = "café naïve über 東京: how many watts does a prefill of this prompt take"
NOTE = b": llm-energy "
KEYS = {
    "energy_joules", "dynamic_joules", "idle_joules", "prefill_joules", "decode_joules",
    "co2e_grams", "duration_seconds", "attribution", "final",
}  # fmt: skip
HIST_SUM, HIST_COUNT = "llm_energy_request_joules_sum", "llm_energy_request_joules_count"
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": PROMPT}]},
    "/v1/completions": {"prompt": PROMPT},
    "/v1/responses": {"input": PROMPT},
}


@pytest.fixture(scope="module")
def proxy(vllm: VllmServer) -> Generator[Sidecar, None, None]:
    """The sidecar in proxy mode with receipts on, in front of the session's vLLM."""
    port, mport = free_port(), free_port()
    sidecar = run_sidecar(start_simulated(vllm.url, port, mport, "--energy-receipts"), port, mport)
    yield sidecar
    sidecar.stop()


@pytest.fixture
async def warm(proxy: Sidecar) -> Sidecar:
    """The proxy after one request, so the model's label exists before a test reads it."""
    await raw_post(proxy.url, "/v1/chat/completions", stream=False)
    return proxy


def body_of(path: str, *, stream: bool) -> dict[str, Any]:
    limit = "max_output_tokens" if path.endswith("responses") else "max_tokens"
    return {"model": MODEL, "temperature": 0.0, limit: MAX_TOKENS, "stream": stream, **BODIES[path]}


async def raw_post(base: str, path: str, *, stream: bool) -> bytes:
    async with (
        aiohttp.ClientSession() as s,
        s.post(base + path, json=body_of(path, stream=stream)) as r,
    ):
        raw = await r.read()
        assert r.status == 200, raw[:300]
        if not stream:
            assert int(r.headers["Content-Length"]) == len(raw)
    return raw


async def booked(sidecar: Sidecar) -> tuple[float, float]:
    """The request-energy histogram's (count, sum) for the model now."""
    text = await scrape(sidecar.metrics_url)
    return total(text, HIST_COUNT, model=MODEL), total(text, HIST_SUM, model=MODEL)


async def quiet(sidecar: Sidecar) -> tuple[float, float]:
    """:func:`booked` once every finished request's figure is in (a provisional receipt's
    request is booked after it went out), so a delta from here is one request's."""
    for _ in range(int(SETTLE_TIMEOUT_S * 10)):
        text = await scrape(sidecar.metrics_url)
        finished = total(text, "llm_energy_requests_total", model=MODEL)
        if total(text, HIST_COUNT, model=MODEL) == finished:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the metrics never booked every finished request")
    return await booked(sidecar)


def sse_receipt(raw: bytes, *, done: bool) -> dict[str, Any]:
    """The receipt of a raw SSE body, checked to be its last event (before ``[DONE]``)."""
    tail = b"data: [DONE]\n\n" if done else b""
    assert raw.endswith(tail)
    events = raw[: len(raw) - len(tail)].split(b"\n\n")
    assert events[-1] == b""
    assert events[-2].startswith(NOTE)
    assert sum(e.startswith(NOTE) for e in events) == 1
    doc: dict[str, Any] = json.loads(events[-2][len(NOTE) :])
    return doc


async def check_figure(
    sidecar: Sidecar, receipt: dict[str, Any], before: tuple[float, float]
) -> None:
    """A final receipt is exactly what the metrics booked for its request (booked before
    the receipt went out); a provisional one is booked later."""
    assert set(receipt) == KEYS
    assert receipt["attribution"] == "llm-energy-sidecar/v1"
    assert receipt["energy_joules"] > 0
    if receipt["final"]:
        count, joules = await booked(sidecar)
    else:
        count, joules = await quiet(sidecar)
    assert count == before[0] + 1
    exact = receipt["energy_joules"] == pytest.approx(joules - before[1], rel=1e-9)
    assert exact or not receipt["final"]
    print("receipt final:", receipt["final"], "J:", receipt["energy_joules"], joules - before[1])


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="test-key", max_retries=0)


async def chat_text(base: str, *, stream: bool) -> str:
    async with client(base) as c:
        kw: dict[str, Any] = {"model": MODEL, "temperature": 0.0, "max_tokens": MAX_TOKENS}
        messages: Any = BODIES["/v1/chat/completions"]["messages"]
        if not stream:
            done = await c.chat.completions.create(messages=messages, **kw)
            return done.choices[0].message.content or ""
        chunks = await c.chat.completions.create(messages=messages, stream=True, **kw)
        return "".join([ch.choices[0].delta.content or "" async for ch in chunks if ch.choices])


async def completion_text(base: str) -> str:
    async with client(base) as c:
        chunks = await c.completions.create(
            model=MODEL, prompt=PROMPT, temperature=0.0, max_tokens=MAX_TOKENS, stream=True
        )
        return "".join([ch.choices[0].text async for ch in chunks if ch.choices])


async def responses_events(base: str) -> tuple[list[str], str]:
    async with client(base) as c:
        stream = await c.responses.create(
            model=MODEL, input=PROMPT, temperature=0.0, max_output_tokens=MAX_TOKENS, stream=True
        )
        events = [e async for e in stream]
    text = "".join(
        getattr(e, "delta", "") for e in events if e.type == "response.output_text.delta"
    )
    kinds = [e.type for e in events]  # deltas merge by timing: their number varies
    return [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]], text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_streams_end_with_the_receipt_and_the_client_reads_them(
    warm: Sidecar, vllm: VllmServer, path: str
) -> None:
    """Streamed chat and completions: the openai client gets vLLM's own text; the raw
    stream's last event before [DONE] is the receipt, equal to the metrics' share."""
    read = (lambda b: chat_text(b, stream=True)) if "chat" in path else completion_text
    assert await read(warm.url) == await read(vllm.url)
    direct = await raw_post(vllm.url, path, stream=True)
    assert direct.endswith(b"data: [DONE]\n\n")
    assert NOTE not in direct
    before = await quiet(warm)
    raw = await raw_post(warm.url, path, stream=True)
    await check_figure(warm, sse_receipt(raw, done=True), before)


async def test_responses_stream_ends_with_the_receipt(warm: Sidecar, vllm: VllmServer) -> None:
    """/v1/responses streamed: the client's events and text are vLLM's; the receipt is the
    last event (before [DONE] only if vLLM sends one) and equals the metrics' share."""
    assert await responses_events(warm.url) == await responses_events(vllm.url)
    direct = await raw_post(vllm.url, "/v1/responses", stream=True)
    before = await quiet(warm)
    raw = await raw_post(warm.url, "/v1/responses", stream=True)
    receipt = sse_receipt(raw, done=direct.endswith(b"data: [DONE]\n\n"))
    await check_figure(warm, receipt, before)


async def test_non_streamed_chat_carries_the_energy_member(warm: Sidecar, vllm: VllmServer) -> None:
    """Non-streamed chat: the client's choices are vLLM's; the JSON is vLLM's members plus
    ``energy``, its length adjusted, equal to the metrics' share."""
    assert await chat_text(warm.url, stream=False) == await chat_text(vllm.url, stream=False)
    direct = json.loads(await raw_post(vllm.url, "/v1/chat/completions", stream=False))
    before = await quiet(warm)
    proxied = json.loads(await raw_post(warm.url, "/v1/chat/completions", stream=False))
    assert "energy" not in direct
    assert list(proxied) == [*direct, "energy"]
    assert proxied["choices"] == direct["choices"]
    await check_figure(warm, proxied["energy"], before)
