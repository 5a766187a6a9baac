"""The proxy+traces join when a server id comes back for another request (sidecar.sources.join)."""

from __future__ import annotations

import pytest
from test_sources import HOLD_S, _meter, _run, _span

from sidecar.ledger import FinishedRequest
from sidecar.meter import Meter


def _proxied(
    meter: Meter, clock: list[float], sid: str, start: float, end: float, endpoint: str
) -> None:
    _run(meter, clock, start)
    rid = meter.request_started(endpoint, "m", 12.0)  # type: ignore[arg-type]
    _run(meter, clock, end)
    meter.request_finished(rid, "ok", 15, 18, server_id=sid)


def test_a_reused_server_id_joins_each_span_with_its_own_request() -> None:
    """Two proxied requests under one server id (a client's reused X-Request-Id), back
    to back, both waiting when their spans come: each span joins its own request (the
    proxy's window holds the span's), both are final, each counted once."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = _meter(clock, "proxy", done)
    _proxied(meter, clock, "req-7", 1.0, 3.0, "chat")
    _proxied(meter, clock, "req-7", 3.1, 6.0, "completion")
    meter.span_finished(_span("req-7", 1.2, 1.5, 2.9))
    meter.span_finished(_span("req-7", 3.3, 3.6, 5.9))
    _run(meter, clock, 15.0)
    got = sorted((f.start_s, f.endpoint, f.energy_j) for f in done)
    assert [e for _, e, _ in got] == ["chat", "completion"]
    assert [s for s, _, _ in got] == pytest.approx([1.2, 3.3])
    assert [j for _, _, j in got] == pytest.approx([1.7 * 150.0, 2.6 * 150.0], rel=1e-6)
    assert meter.requests == {("m", "chat", "ok"): 1, ("m", "completion", "ok"): 1}
    assert meter.join is not None
    assert meter.join.joined == 2
    assert meter.duplicate_spans == 0


def test_a_span_placed_alone_does_not_swallow_a_later_request_under_its_id() -> None:
    """A span no proxied request waited for is placed alone; a proxied request that
    later reuses its id (another window) is a request of its own, not its other half."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = _meter(clock, "proxy", done)
    _run(meter, clock, 3.0)
    meter.span_finished(_span("req-9", 1.0, 1.5, 2.5))
    _proxied(meter, clock, "req-9", 4.0, 6.0, "chat")
    meter.span_finished(_span("req-9", 4.2, 4.5, 5.9))
    _run(meter, clock, 15.0)
    assert sorted(f.endpoint for f in done) == ["chat", "unknown"]
    assert meter.requests == {("m", "unknown", "ok"): 1, ("m", "chat", "ok"): 1}


def test_the_other_half_of_a_request_still_counts_once() -> None:
    """The span after its proxied request was placed on its own (the hold ran out), and
    a retried export after a join, add nothing: one request each."""
    clock = [0.0]
    done: list[FinishedRequest] = []
    meter = _meter(clock, "proxy", done)
    _proxied(meter, clock, "cmpl-1", 1.0, 3.0, "completion")
    _run(meter, clock, HOLD_S + 5.0)  # no span in time: the proxy's own view is placed
    meter.span_finished(_span("cmpl-1", 1.2, 1.5, 2.9))
    _proxied(meter, clock, "cmpl-2", HOLD_S + 6.0, HOLD_S + 8.0, "chat")
    twice = _span("cmpl-2", HOLD_S + 6.2, HOLD_S + 6.5, HOLD_S + 7.9)
    meter.span_finished(twice)
    meter.span_finished(twice)
    _run(meter, clock, HOLD_S + 20.0)
    assert sorted(f.id for f in done) == ["cmpl-1", "cmpl-2"]
    assert meter.requests == {("m", "completion", "ok"): 1, ("m", "chat", "ok"): 1}
    assert meter.duplicate_spans == 2
