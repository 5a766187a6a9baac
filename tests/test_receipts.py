"""Energy receipts (--energy-receipts): the SSE comment, the JSON member, `final`, fail-open."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from test_proxy import ClientFactory, Rig, ServerFactory, make_rig

import sidecar.tracking.receipts as receipts
from sidecar.power.base import PowerSample
from sidecar.reconcile import MIN_CUT_WINDOW_S, Reconciler
from sidecar.tracking.budget import ParseBudget
from sidecar.tracking.proxy import MAX_PARSED_BODY
from sidecar.tracking.receipts import (
    ATTRIBUTION,
    MAX_HELD_BYTES,
    WAIT_S,
    JsonHold,
    SseHold,
    receipt_hold,
    with_energy,
)

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


# ------------------------------------------------------------- final, and its figure

HIST_SUM = "llm_energy_request_joules_sum"
HIST_COUNT = "llm_energy_request_joules_count"
COMPLETION = {"model": "m1", "prompt": "once upon", "stream": True, "max_tokens": 4}
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", COMPLETION),
    ("/generate_stream", {"inputs": "hi", "parameters": {}}),
    ("/v1/chat/completions", {**CHAT, "stream": False}),
]


async def _receipt_of(rig: Rig, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The receipt of one request (comment or member) and the raw bytes the client got."""
    r = await rig.proxy.post(path, json=body)
    raw = await r.read()
    if r.headers.get("Content-Type", "").startswith("text/event-stream"):
        return _receipt(raw.split(b"\n\n")), raw
    assert int(r.headers["Content-Length"]) == len(raw)
    doc: dict[str, Any] = json.loads(raw)
    return doc["energy"], raw


@pytest.mark.parametrize(("path", "body"), REQUESTS, ids=["chat", "completion", "tgi", "json"])
async def test_receipt_is_final_and_equals_what_the_metrics_booked(
    on: Rig, path: str, body: dict[str, Any]
) -> None:
    """At 50 Hz a receipt is final, and its energy is the request's share of the
    request-energy histogram (1e-9 relative) and the figure its log line gives."""
    model = "default" if path.startswith("/generate") else "m1"
    await _receipt_of(on, path, body)  # the model label exists from here on
    for _ in range(3):
        before = await on.value(HIST_SUM, model=model)
        count = await on.value(HIST_COUNT, model=model)
        with structlog.testing.capture_logs() as logs:
            rec, _ = await _receipt_of(on, path, body)
        assert rec["final"] is True
        assert await on.value(HIST_COUNT, model=model) == count + 1  # booked before it was sent
        booked = await on.value(HIST_SUM, model=model) - before
        assert rec["energy_joules"] == pytest.approx(booked, rel=1e-9, abs=1e-12)
        assert rec["energy_joules"] > 0
        line = [e for e in logs if e["event"] == "request.finished"][-1]
        logged = line["dynamic_j"] + line["idle_j"]
        assert round(rec["dynamic_joules"], 4) + round(rec["idle_joules"], 4) == pytest.approx(
            logged
        )
        assert rec["prefill_joules"] + rec["decode_joules"] == pytest.approx(rec["energy_joules"])


async def test_receipt_that_cannot_wait_is_provisional_and_the_wait_bounded(
    on: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampler whose samples stop: the receipt waits its one bounded wait (0.5 s,
    the timeout it is given), says final: false, and the final figure still reaches
    the metrics once samples come back."""
    timeouts: list[float | None] = []
    real_wait: Callable[..., Awaitable[Any]] = asyncio.wait

    async def wait(fs: Any, **kw: Any) -> Any:
        timeouts.append(kw["timeout"])
        return await real_wait(fs, **kw)

    monkeypatch.setattr(receipts, "_wait", wait)
    await _receipt_of(on, "/v1/chat/completions", CHAT)  # the label m1 exists
    sampler = on.sidecar.sampler
    assert sampler is not None
    count = await on.value(HIST_COUNT, model="m1")
    monkeypatch.setattr(sampler, "ingest", lambda batch: None)  # reads go nowhere
    await asyncio.sleep(0.1)  # samples already on their way are in
    rec, _ = await _receipt_of(on, "/v1/chat/completions", CHAT)
    assert rec["final"] is False
    assert set(rec) == KEYS
    assert timeouts[-1] == WAIT_S == 0.5
    assert await on.value(HIST_COUNT, model="m1") == count  # not final: not booked yet
    monkeypatch.undo()
    for _ in range(200):  # samples flow again: the request's figure becomes final
        if await on.value(HIST_COUNT, model="m1") == count + 1:
            break
        await asyncio.sleep(0.05)
    assert await on.value(HIST_COUNT, model="m1") == count + 1


# ------------------------------------------------------------------ the reconciler's cut


def _samples(times: list[float], watts: float = 100.0) -> list[PowerSample]:
    """One GPU's samples at constant power, its counter 10 % above the sensor's line."""
    return [PowerSample(t, "0", watts, energy_j=1.1 * watts * t) for t in times]


def test_cut_closes_the_window_at_the_first_moved_counter_past_the_time() -> None:
    """Without a cut a 1 s window holds samples; with one, the first sample past the
    cut time (the window at least MIN_CUT_WINDOW_S long) releases them, scaled to the
    counter exactly; a cut is served once."""
    times = [round(0.05 * i, 2) for i in range(13)]  # 0 to 0.6 s
    plain, cut = Reconciler(), Reconciler()
    out_plain = [s for x in _samples(times[:9]) for s in plain.push(x)]
    assert [s.time_s for s in out_plain] == [0.0]  # 0.40 s in: all held
    out: list[PowerSample] = []
    for x in _samples(times):
        if x.time_s == 0.1:
            cut.cut(0.12)
        out.extend(s for s in cut.push(x) if s.time_s > 0)
        if x.time_s == MIN_CUT_WINDOW_S:
            assert [s.time_s for s in out] == [0.05, 0.1, 0.15, MIN_CUT_WINDOW_S]
    assert out[-1].time_s == MIN_CUT_WINDOW_S  # not 0.15: the window spans 0.2 s first
    line = sum((a.power_w + b.power_w) / 2 * (b.time_s - a.time_s) for a, b in zip(
        [PowerSample(0.0, "0", 100.0), *out[:-1]], out, strict=True
    ))  # fmt: skip
    assert line == pytest.approx(1.1 * 100.0 * MIN_CUT_WINDOW_S)
    assert not cut._cuts


def test_cut_waits_for_a_counter_that_moved() -> None:
    """A cut never scales by a counter that has not moved: samples stay held."""
    rec = Reconciler()
    rec.push(PowerSample(0.0, "0", 100.0, energy_j=5.0))
    rec.cut(0.1)
    assert rec.push(PowerSample(0.3, "0", 100.0, energy_j=5.0)) == []
    assert [s.time_s for s in rec.push(PowerSample(0.4, "0", 100.0, energy_j=45.0))] == [0.3, 0.4]


# ------------------------------------------------------------------ the JSON member


def test_with_energy_writes_the_member_into_the_bytes() -> None:
    """The member goes before the closing brace, nothing else changes; `{}` gets no comma."""
    rec = b'{"energy_joules":1.5}'
    assert with_energy(b'{"a": 1}\n', rec) == b'{"a": 1,"energy":{"energy_joules":1.5}}\n'
    assert with_energy(b"{ }", rec) == b'{ "energy":{"energy_joules":1.5}}'
    assert with_energy(b'{"a":{}}', rec) == b'{"a":{},"energy":{"energy_joules":1.5}}'
    for body in (b"[1]", b'{"energy": 2}', b'{"a": 1', b"", b"\xef\xbb\xbf{}", b"7"):
        assert with_energy(body, rec) is None, body


def _upstream(status: int = 200, headers: dict[str, str] | None = None) -> Any:
    hdrs = {"Content-Type": "application/json", "Content-Length": "10", **(headers or {})}
    return SimpleNamespace(status=status, headers={k: v for k, v in hdrs.items() if v})


def test_which_responses_are_held() -> None:
    """A 2xx identity JSON body of known length within the cap and budget is held;
    errors, NDJSON, compressed, unknown or over-cap lengths, a spent budget are not."""
    budget = ParseBudget(100)
    assert MAX_HELD_BYTES == MAX_PARSED_BODY
    resp: Any = None
    held = receipt_hold(True, _upstream(), resp, False, budget)
    assert isinstance(held, JsonHold)
    assert budget.held_bytes == 10
    held.release()
    assert budget.held_bytes == 0
    sse = _upstream(headers={"Content-Type": "text/event-stream", "Content-Length": ""})
    assert isinstance(receipt_hold(True, sse, resp, True, budget), SseHold)
    for up, streamed in (
        (_upstream(), True),
        (_upstream(404), False),
        (_upstream(500), False),
        (_upstream(headers={"Content-Type": "application/x-ndjson"}), False),
        (_upstream(headers={"Content-Encoding": "gzip"}), False),
        (_upstream(headers={"Content-Length": ""}), False),
        (_upstream(headers={"Content-Length": str(MAX_HELD_BYTES + 1)}), False),
        (_upstream(headers={"Content-Length": "101"}), False),  # over the budget
    ):
        assert receipt_hold(True, up, resp, streamed, budget) is None, up.headers
    assert receipt_hold(False, _upstream(), resp, False, budget) is None
    assert budget.held_bytes == 0


async def test_json_body_gains_the_member_and_nothing_else(on: Rig) -> None:
    """A non-streamed chat is the upstream's bytes with `,"energy":{...}` before the last
    brace, its Content-Length adjusted; embeddings and Ollama's JSON answer get it too."""
    for path, body in (
        ("/v1/chat/completions", {**CHAT, "stream": False}),
        ("/v1/embeddings", {"model": "embedder", "input": "text"}),
        ("/api/chat", {"model": "llama3", "messages": [], "stream": False}),
    ):
        async with on.direct.post(path, json=body) as d:
            direct = await d.read()
        rec, raw = await _receipt_of(on, path, body)
        assert set(rec) == KEYS
        member = b'"energy":' + json.dumps(rec, separators=(",", ":")).encode()
        assert raw == direct[:-1] + b"," + member + b"}", path


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/chat/completions", {**CHAT, "stream": False, "gzip": True}),
        ("/v1/chat/completions", {**CHAT, "stream": False, "malformed": "json"}),
        ("/status/503", {"model": "m1"}),
        ("/status/429", {"model": "m1"}),
    ],
    ids=["ndjson", "gzip", "not-json", "5xx", "4xx"],
)
async def test_responses_that_carry_no_receipt_are_byte_identical(
    on: Rig, path: str, body: dict[str, Any]
) -> None:
    """NDJSON, compressed, malformed and error responses go out exactly as sent."""
    async with on.direct.post(path, json=body) as d:
        direct, dh = await d.read(), d.headers
    r = await on.proxy.session.post(on.proxy.make_url(path), json=body, auto_decompress=False)
    assert await r.read() == direct
    assert r.status == d.status
    assert r.headers.get("Content-Length") == dh.get("Content-Length")
    if body.get("gzip"):
        assert b"energy" not in gzip.decompress(direct)


async def test_a_fault_in_the_member_fails_open(on: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault while writing the member: the upstream's body goes out as it was."""

    def broken(body: bytes, receipt: bytes) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(receipts, "with_energy", broken)
    body = {**CHAT, "stream": False}
    async with on.direct.post("/v1/chat/completions", json=body) as d:
        direct = await d.read()
    meter = on.sidecar.meter
    assert meter is not None
    errors = meter.tracking_errors
    r = await on.proxy.post("/v1/chat/completions", json=body)
    assert await r.read() == direct
    assert meter.tracking_errors == errors + 1


async def test_json_member_off_by_default(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    """Without the flag a non-streamed body is the upstream's, byte for byte."""
    async for rig in make_rig(aiohttp_server, aiohttp_client):
        body = {**CHAT, "stream": False}
        async with rig.direct.post("/v1/chat/completions", json=body) as d:
            direct = await d.read()
        r = await rig.proxy.post("/v1/chat/completions", json=body)
        assert await r.read() == direct


async def test_traces_mode_holds_no_end_for_a_figure_it_cannot_have(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --otlp-listen a request's figure comes with the server's span, seconds later:
    no receipt, and no wait at the stream's end."""
    from procs import free_port

    waited: list[object] = []

    async def wait(fs: Any, **kw: Any) -> Any:
        waited.append(kw)
        return set(), set(fs)

    monkeypatch.setattr(receipts, "_wait", wait)
    listen = f"127.0.0.1:{free_port()}"
    async for rig in make_rig(
        aiohttp_server, aiohttp_client, energy_receipts=True, otlp_listen=listen
    ):
        r = await rig.proxy.post("/v1/chat/completions", json=CHAT)
        raw = await r.read()
        assert raw.endswith(b"data: [DONE]\n\n")
        assert b"llm-energy" not in raw
        r = await rig.proxy.post("/v1/chat/completions", json={**CHAT, "stream": False})
        assert "energy" not in await r.json()
    assert waited == []
