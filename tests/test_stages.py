"""Prefill and decode: each request's attributed energy split in two, summing exactly."""

from __future__ import annotations

import pytest

from sidecar.attribute import attribute
from sidecar.ledger import Ledger
from sidecar.trace import PowerRow, RequestRow


def _one(ledger: Ledger) -> tuple[float, float, float]:
    ledger.flush()
    (f,) = ledger.pop_finished()
    return f.energy_j, f.prefill_j, f.decode_j


def test_streamed_request_splits_at_its_first_token() -> None:
    """A lone streamed request: prefill is its energy before the first token, decode after."""
    ledger = Ledger(["0"], idle_watts={"0": 60.0})
    ledger.add_request(
        "a", model="m", start_s=2.0, end_s=6.0, first_token_s=3.0, prompt_tokens=10,
        completion_tokens=30,
    )  # fmt: skip
    ledger.sample("0", 0.0, 100.0)
    ledger.sample("0", 10.0, 100.0)
    energy, prefill, decode = _one(ledger)
    assert energy == pytest.approx(400.0)
    assert prefill == pytest.approx(100.0)
    assert decode == pytest.approx(300.0)


def test_live_first_token_splits_what_was_assigned_before_it() -> None:
    """Live events: energy assigned while waiting for the first token is prefill."""
    ledger = Ledger(["0"], idle_watts={"0": 50.0}, max_wait_s=0.5)
    ledger.start("a", 0.0, model="m", prompt_tokens=100)
    for i in range(11):
        ledger.sample("0", i / 10, 150.0)
    ledger.first_token("a", 1.0)
    for i in range(11, 21):
        ledger.sample("0", i / 10, 150.0)
        ledger.tokens("a", i / 10, 1)
    ledger.finish("a", 2.0, prompt_tokens=100, completion_tokens=10)
    ledger.sample("0", 2.5, 150.0)
    energy, prefill, decode = _one(ledger)
    assert energy == pytest.approx(300.0)
    assert prefill == pytest.approx(150.0)
    assert decode == pytest.approx(150.0)


def test_not_streamed_splits_by_token_work() -> None:
    """No first-token time: prompt and completion tokens split it as the sharing rule weighs them."""
    ledger = Ledger(["0"], idle_watts={"0": 0.0})
    ledger.add_request(
        "a", model="m", start_s=0.0, end_s=3.0, prompt_tokens=100, completion_tokens=50
    )
    ledger.sample("0", 0.0, 100.0)
    ledger.sample("0", 3.0, 100.0)
    energy, prefill, decode = _one(ledger)
    ratio = ledger.prefill_fit.ratio  # the prior, 1: too little data to fit
    assert ratio == 1.0
    assert prefill == pytest.approx(energy * 100 / 150)
    assert prefill + decode == pytest.approx(energy)


def test_embedding_is_all_prefill() -> None:
    """No output tokens: the whole energy is prompt work."""
    ledger = Ledger(["0"], idle_watts={"0": 0.0})
    ledger.add_request(
        "e", model="m", start_s=0.0, end_s=1.0, prompt_tokens=500, completion_tokens=0,
        endpoint="embedding",
    )  # fmt: skip
    ledger.sample("0", 0.0, 100.0)
    ledger.sample("0", 1.0, 100.0)
    energy, prefill, decode = _one(ledger)
    assert prefill == pytest.approx(energy)
    assert decode == pytest.approx(0.0)


def test_attribute_reports_stages_that_sum_to_each_request() -> None:
    """`attribute` gains prefill_joules and decode_joules per request, summing to energy_joules."""
    power = [PowerRow(t / 10, "0", 100.0 + (t % 7), None) for t in range(100)]
    reqs = [
        RequestRow("a", "m", 1.0, 5.0, 2.0, 50, 40, "ok"),
        RequestRow("b", "m", 2.0, 7.0, None, 80, 20, "ok"),
        RequestRow("c", "m", 3.0, 9.0, 3.5, 10, 90, "ok"),
    ]
    out = attribute(power, reqs, idle_watts=[60.0])
    for r in out["requests"]:
        assert r["prefill_joules"] + r["decode_joules"] == pytest.approx(r["energy_joules"])
        assert 0.0 <= r["prefill_joules"] <= r["energy_joules"]
    a = out["requests"][0]
    assert 0.0 < a["prefill_joules"] < a["decode_joules"]
