"""Energy receipts (--energy-receipts): the SSE comment, its place, and fail-open."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_proxy import ClientFactory, Rig, ServerFactory, make_rig

from sidecar.tracking.receipts import ATTRIBUTION, WAIT_S, SseHold

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
KEYS = {
    "energy_joules", "dynamic_joules", "idle_joules", "prefill_joules", "decode_joules",
    "co2e_grams", "duration_seconds", "attribution", "final",
}  # fmt: skip


@pytest.fixture
async def on(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> AsyncIterator[Rig]:
    async for r in make_rig(aiohttp_server, aiohttp_client, energy_receipts=True):
        yield r


def _receipt(events: list[bytes]) -> dict[str, Any]:
    notes = [e for e in events if e.startswith(b": llm-energy ")]
    assert len(notes) == 1
    body: dict[str, Any] = json.loads(notes[0][len(b": llm-energy ") :])
    return body


async def test_receipt_is_the_event_just_before_done(on: Rig) -> None:
    """A streamed chat gets one receipt comment, the event right before data: [DONE]."""
    r = await on.proxy.post("/v1/chat/completions", json=CHAT)
    events = (await r.read()).split(b"\n\n")
    assert events[-1] == b""
    assert events[-2] == b"data: [DONE]"
    assert events[-3].startswith(b": llm-energy ")
    body = _receipt(events)
    assert set(body) == KEYS
    assert body["attribution"] == ATTRIBUTION
    assert body["energy_joules"] == pytest.approx(body["dynamic_joules"] + body["idle_joules"])
    assert body["energy_joules"] >= 0
    assert isinstance(body["final"], bool)


async def test_receipt_is_last_in_a_stream_without_done(on: Rig) -> None:
    """A TGI stream (no [DONE]) ends with the receipt comment."""
    r = await on.proxy.post("/generate_stream", json={"inputs": "hi", "parameters": {}})
    events = (await r.read()).split(b"\n\n")
    assert events[-1] == b""
    assert events[-2].startswith(b": llm-energy ")
    assert set(_receipt(events)) == KEYS


async def test_off_by_default(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory) -> None:
    """Without the flag the stream carries no receipt."""
    async for rig in make_rig(aiohttp_server, aiohttp_client):
        r = await rig.proxy.post("/v1/chat/completions", json=CHAT)
        assert b"llm-energy" not in await r.read()


async def test_openai_client_parses_a_stream_with_receipts(on: Rig) -> None:
    """The official openai client reads a streamed chat with the receipt comment in it."""
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=str(on.proxy.make_url("/v1")), api_key="x")
    stream = await client.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text


def test_hold_keeps_back_a_split_done_event() -> None:
    """[DONE] split across chunks is held back whole; other bytes pass at once."""
    hold = SseHold()
    out = hold.feed(b'data: {"a":1}\n\ndata: [DO') + hold.feed(b"NE]\n") + hold.feed(b"\n")
    assert out == b'data: {"a":1}\n\n'
    assert hold.held() == b"data: [DONE]\n\n"
    assert hold.at_line_start


def test_hold_passes_ordinary_events() -> None:
    """A stream without [DONE] holds nothing back once an event is complete."""
    hold = SseHold()
    assert hold.feed(b"data: x\n\n") == b"data: x\n\n"
    assert hold.held() == b""


def test_wait_is_bounded_by_construction() -> None:
    """The receipt's wait is one bounded asyncio.wait of at most 0.5 s."""
    assert WAIT_S <= 0.5
