"""Activity sources together: proxy, observer and traces, and the join by the server's id."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.ledger import FinishedRequest
from sidecar.meter import FixedIntensity, Meter, RunningFrom
from sidecar.power.base import GpuInfo, PowerSample
from sidecar.traces.span import RequestSpan
from sidecar.tracking.observer import Observation, ObservationDelta
from sidecar.tracking.protocols import RequestInfo, ResponseTracker

HOLD_S = 60.0


def _meter(
    clock: list[float], running_from: RunningFrom | None, finished: list[FinishedRequest]
) -> Meter:
    return Meter(
        [GpuInfo("0", "GPU-0", "sim")],
        clock=lambda: clock[0],
        idle_watts={"0": 50.0},
        intensity=FixedIntensity(400.0, "xx", "fixed"),
        traces_hold_s=HOLD_S,
        running_from=running_from,
        on_finished=finished.append,
    )


def _run(meter: Meter, clock: list[float], until_s: float, power_w: float = 150.0) -> None:
    """Samples at 10 Hz and a tick each second, up to ``until_s``."""
    while clock[0] < until_s - 1e-9:
        clock[0] = round(clock[0] + 0.1, 6)
        meter.on_samples([PowerSample(clock[0], "0", power_w)])
        if round(clock[0] * 10) % 10 == 0:
            meter.tick()


def _span(rid: str, sched: float, first: float, end: float, model: str = "m") -> RequestSpan:
    return RequestSpan(rid, model, sched - 0.01, sched, first, end, 17, 20)


def test_tracker_exposes_the_response_id() -> None:
    """The proxy learns the server's id from the first chunk (the join key with the span)."""
    info = RequestInfo("chat", "openai", "m", True, 10, False)
    tracker = ResponseTracker(info, "text/event-stream", None, {})
    tracker.feed(b'data: {"id":"chatcmpl-abc","model":"m","choices":[{"index":0,"delta":{}}]}\n\n')
    tracker.feed(b"data: [DONE]\n\n")
    assert tracker.finish().response_id == "chatcmpl-abc"


def test_proxy_and_span_join_into_one_request() -> None:
    """proxy+traces: the span's window and exact tokens, the proxy's endpoint and tenant,
    counted once, final once the span came (the proxy's open count is the running count)."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = _meter(clock, "proxy", done)
    _run(meter, clock, 1.0)
    rid = meter.request_started("chat", "m", 12.0, tenant="team-a")
    assert meter.in_flight() == {"other": 1}  # no response confirmed the name yet
    _run(meter, clock, 3.0)
    meter.first_token(rid)
    _run(meter, clock, 4.0)
    meter.request_finished(rid, "ok", 15, 18, server_id="chatcmpl-1")
    _run(meter, clock, 6.0)
    assert done == []  # the proxy saw one running: its intervals wait for the span
    meter.span_finished(_span("chatcmpl-1", 1.2, 2.0, 3.9))
    _run(meter, clock, 11.0)  # past the grace (the exporter's delay) of its last interval
    [f] = done
    assert f.id == "chatcmpl-1"
    assert f.endpoint == "chat"
    assert f.start_s == pytest.approx(1.2)
    assert f.prompt_tokens == 17
    assert f.completion_tokens == 20
    assert f.energy_j == pytest.approx(2.7 * 150.0, rel=1e-6)
    assert meter.requests == {("m", "chat", "ok"): 1}
    assert meter.tokens == {("m", "prompt"): 17, ("m", "completion"): 20}
    assert meter.tenant_j["team-a"] == pytest.approx(f.energy_j)
    assert meter.join is not None
    assert meter.join.joined == 1


def test_joined_requests_leave_no_tenant_entry_behind() -> None:
    """proxy+traces: a tenant noted under the proxy's own id is dropped once the request
    is final under the server's id (one entry per request kept forever otherwise)."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = _meter(clock, "proxy", done)
    _run(meter, clock, 1.0)
    rid = meter.request_started("chat", "m", 12.0, tenant="team-a")
    _run(meter, clock, 3.0)
    meter.request_finished(rid, "ok", 15, 18, server_id="chatcmpl-1")
    meter.span_finished(_span("chatcmpl-1", 1.2, 2.0, 2.9))
    _run(meter, clock, 11.0)
    assert [f.id for f in done] == ["chatcmpl-1"]
    assert meter.tenant_j["team-a"] == pytest.approx(done[0].energy_j)
    assert meter._tenant_of == {}


def test_proxied_request_without_span_keeps_the_proxy_view() -> None:
    """No span by the end of the hold: the proxy's own window and tokens, placed while
    its intervals are still held; a span arriving after that counts nothing twice."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = _meter(clock, "proxy", done)
    _run(meter, clock, 1.0)
    rid = meter.request_started("completion", "m", 12.0)
    _run(meter, clock, 3.0)
    meter.request_finished(rid, "ok", 12, 8, server_id="cmpl-9")
    _run(meter, clock, HOLD_S + 5.0)
    [f] = done
    assert f.id == "cmpl-9"
    assert f.endpoint == "completion"
    assert f.energy_j == pytest.approx(2.0 * 150.0, rel=1e-6)
    meter.span_finished(_span("cmpl-9", 1.0, 1.5, 3.0))
    _run(meter, clock, HOLD_S + 7.0)
    assert len(done) == 1
    assert meter.requests == {("m", "completion", "ok"): 1}
    assert meter.duplicate_spans == 1


def test_span_alone_counts_as_unknown_endpoint() -> None:
    """A span no proxied request matches is a request of its own, endpoint unknown;
    traces alone report nothing in flight."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = _meter(clock, None, done)
    _run(meter, clock, 4.0)
    meter.span_finished(_span("x", 1.0, 1.5, 3.0))
    assert meter.in_flight() == {}
    meter.flush()
    [f] = done
    assert f.endpoint == "unknown"
    assert meter.requests == {("m", "unknown", "ok"): 1}


def test_observer_with_traces_gives_only_the_running_count() -> None:
    """observer+traces: tokens and requests come from spans only (never twice); in flight
    is the server's running count; the request is final once the count is satisfied."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = _meter(clock, "observer", done)
    for t in range(1, 6):
        _run(meter, clock, float(t))
        running = {"m": 1.0} if t <= 2 else {}  # the gauge at each scrape
        obs = Observation(float(t), "vllm", running=running)
        ended = {"m": 1.0} if t == 3 else {}  # it finished in the third window
        tokens = {"m": 7.0} if t <= 3 else {}
        delta = ObservationDelta(t - 1.0, float(t), tokens, tokens, ended, False)
        meter.observer.on_observation(obs, delta)
        if t == 2:
            assert meter.in_flight() == {"m": 1}
    assert meter.tokens == {}
    assert meter.requests == {}
    assert done == []
    meter.span_finished(_span("chatcmpl-2", 0.5, 1.0, 3.0))
    _run(meter, clock, 12.0)
    [f] = done
    assert meter.tokens == {("m", "prompt"): 17, ("m", "completion"): 20}
    assert meter.requests == {("m", "unknown", "ok"): 1}
    assert f.energy_j == pytest.approx(2.5 * 150.0, rel=1e-6)
    assert f.prefill_j == pytest.approx(0.5 * 150.0, rel=1e-6)
    # Σ requests + standby + unattributed = measured (nothing held any more)
    measured = meter.ledger.gpu_energy_j("0")
    booked = f.energy_j + meter.ledger.phase_j["idle_standby"] + meter.ledger.unattributed_j
    assert booked + meter.ledger.held_j == pytest.approx(measured, rel=1e-6)
    assert meter.ledger.held_j == pytest.approx(7.0 * 150.0)  # after 5 s no count came: held


@st.composite
def mixes(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(0, 6))):
        start = draw(st.integers(1, 30)) / 10
        out.append({
            "id": f"s{i}",
            "start": start,
            "end": start + draw(st.integers(1, 30)) / 10,
            "proxied": draw(st.booleans()),
            "span_at": draw(st.one_of(st.none(), st.integers(0, 120))),  # tenths after its end
            "twice": draw(st.booleans()),
        })  # fmt: skip
    return out


@settings(max_examples=60, deadline=None)
@given(mixes(), st.sampled_from([None, "proxy"]))
def test_proxy_and_traces_conserve_and_count_each_request_once(
    reqs: list[dict[str, Any]], running_from: RunningFrom | None
) -> None:
    """Whatever the spans do (late, twice, never, with or without a proxied twin):
    each request counts once, and Σ requests + standby + unattributed + held = measured."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = Meter(
        [GpuInfo("0", "GPU-0", "sim")],
        clock=lambda: clock[0],
        idle_watts={"0": 50.0},
        intensity=FixedIntensity(400.0, "xx", "fixed"),
        traces_hold_s=8.0,
        running_from=running_from,
        on_finished=done.append,
    )
    rids: dict[str, str] = {}
    for step in range(1, 200):
        clock[0] = step / 10
        meter.on_samples([PowerSample(clock[0], "0", 100.0 + (step % 7) * 20.0)])
        if step % 10 == 0:
            meter.tick()
        for r in reqs:
            if r["proxied"] and round(r["start"] * 10) == step:
                rids[r["id"]] = meter.request_started("chat", "m", 10.0)
            if r["proxied"] and round(r["end"] * 10) == step:
                meter.request_finished(rids[r["id"]], "ok", 10, 5, server_id=r["id"])
            if r["span_at"] is not None and round(r["end"] * 10) + r["span_at"] == step:
                for _ in range(2 if r["twice"] else 1):
                    meter.span_finished(_span(r["id"], r["start"], r["start"] + 0.05, r["end"]))
        ledger = meter.ledger
        booked = sum(f.energy_j for f in done) + ledger.phase_j["idle_standby"]
        booked += ledger.unattributed_j + ledger.held_j
        assert booked == pytest.approx(ledger.gpu_energy_j("0"), rel=1e-6, abs=1e-6)
    meter.flush()
    heard = {r["id"] for r in reqs if r["proxied"] or r["span_at"] is not None}
    assert sorted(f.id for f in done) == sorted(heard)
    assert sum(meter.requests.values()) == len(heard)
    assert meter.ledger.held_j == pytest.approx(0.0, abs=1e-6)
