"""Traces mode in the ledger: requests reported whole, late, twice or never (sidecar.ledger.held)."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.ledger import FinishedRequest, Ledger
from sidecar.ledger.held import CLAIM_S, HeldRequest, HeldSlots
from sidecar.ledger.pieces import Books

REL = 1e-6


def _ledger(
    gpus: int = 1,
    *,
    hold_s: float = 60.0,
    counted: bool = False,
    idle: float = 100.0,
    live: bool | None = None,
    grace_s: float = 0.0,
    claim_s: float = CLAIM_S,
) -> Ledger:
    ledger = Ledger(
        [str(g) for g in range(gpus)],
        idle_watts={str(g): idle for g in range(gpus)},
        late_hold_s=hold_s,
        counted=counted,
        live_phases=counted if live is None else live,
        slot_s=0.25,
        grace_s=grace_s,
    )
    assert ledger.held is not None
    ledger.held.claim_s = claim_s
    return ledger


def _measured(ledger: Ledger) -> float:
    return sum(ledger.gpu_energy_j(g) for g in ledger.gpus)


def _books(ledger: Ledger, finished: list[FinishedRequest]) -> float:
    """Σ requests + standby + unattributed + held: what must equal the measured energy."""
    return (
        sum(f.energy_j for f in finished)
        + ledger.phase_j["idle_standby"]
        + ledger.unattributed_j
        + ledger.held_j
    )


def _samples(ledger: Ledger, t0: float, t1: float, watts: float, *, dt: float = 0.1) -> None:
    n = round((t1 - t0) / dt)
    for i in range(n + 1):
        for g in ledger.gpus:
            ledger.sample(g, t0 + i * dt, watts)


def test_alone_request_takes_its_intervals_when_the_span_arrives_late() -> None:
    """A request heard of 5 s after its end takes all serving energy of its window; the
    rest of the time is standby; nothing is final before the span comes."""
    ledger = _ledger()
    _samples(ledger, 0.0, 10.0, 300.0)  # flat 300 W, baseline 100 W
    assert ledger.pop_finished() == []
    assert ledger.place(
        "chatcmpl-1", model="m", start_s=2.0, first_token_s=3.0, end_s=5.0,
        prompt_tokens=10, completion_tokens=20,
    )  # fmt: skip
    _samples(ledger, 10.1, 70.0, 100.0)  # the hold ends
    [f] = ledger.pop_finished()
    assert f.id == "chatcmpl-1"
    assert f.energy_j == pytest.approx(3.0 * 300.0, rel=REL)
    assert f.idle_j == pytest.approx(3.0 * 100.0, rel=REL)
    assert f.prefill_j == pytest.approx(300.0, rel=REL)  # scheduled..first token
    assert f.decode_j == pytest.approx(600.0, rel=REL)
    assert f.prompt_tokens == 10
    assert f.completion_tokens == 20


def test_duplicate_span_counts_once() -> None:
    """A retried export places the request once."""
    ledger = _ledger()
    _samples(ledger, 0.0, 5.0, 200.0)
    args = {"model": "m", "start_s": 1.0, "first_token_s": 1.5, "end_s": 3.0,
            "prompt_tokens": 5, "completion_tokens": 5}  # fmt: skip
    assert ledger.place("a", **args)  # type: ignore[arg-type]
    assert not ledger.place("a", **args)  # type: ignore[arg-type]
    ledger.flush()
    [f] = ledger.pop_finished()
    assert f.energy_j == pytest.approx(2.0 * 200.0, rel=REL)


def test_span_after_the_hold_gets_nothing_and_the_energy_is_unattributed() -> None:
    """With a running count, energy of a request never heard from within the hold is
    unattributed; its span arriving afterwards is counted with no energy."""
    ledger = _ledger(hold_s=5.0, counted=True)
    _samples(ledger, 0.0, 4.0, 250.0)
    ledger.running(0.0, 4.0, 1)
    _samples(ledger, 4.1, 12.0, 100.0)
    ledger.running(4.0, 12.0, 0)
    assert ledger.unattributed_j == pytest.approx(4.0 * 250.0, rel=1e-3)
    assert ledger.place(
        "late", model="m", start_s=0.0, first_token_s=1.0, end_s=4.0,
        prompt_tokens=1, completion_tokens=1,
    )  # fmt: skip
    [f] = ledger.pop_finished()
    assert f.energy_j == 0.0
    assert f.missed_s > 0.0


def test_counted_slots_settle_once_everyone_reported_not_at_the_hold() -> None:
    """With the server's count, a request is final once its span came and its slots are
    past the claim, not when its co-runners report: the one the count says ran all
    through beside it weighs as it does meanwhile, and its span takes what was kept for
    it; nothing waits for the hold."""
    ledger = _ledger(hold_s=600.0, counted=True, claim_s=2.0)
    runs = [(1.0, 5.0), (1.0, 5.0)]
    _scrape_each_second(ledger, 5.5, runs)
    kw = {"model": "m", "start_s": 1.0, "first_token_s": 2.0, "end_s": 5.0,
          "prompt_tokens": 10, "completion_tokens": 30}  # fmt: skip
    ledger.place("a", **kw)  # type: ignore[arg-type]
    _scrape_each_second(ledger, 12.0, runs)
    [a] = ledger.pop_finished()  # b ran too (the count said 2): it weighs as a does
    assert a.energy_j == pytest.approx(0.5 * 4.0 * 300.0, rel=REL)
    ledger.place("b", **kw)  # type: ignore[arg-type]
    [b] = ledger.pop_finished()
    assert b.energy_j == pytest.approx(a.energy_j, rel=REL)
    assert b.prefill_j == pytest.approx(a.prefill_j, rel=REL)
    # outside [1, 5] the counts are 0 (both reported) and neither ran there: standby
    assert ledger.held_j == pytest.approx(0.0, abs=1e-9)
    assert ledger.unattributed_j == pytest.approx(0.0, abs=1e-9)
    standby = _measured(ledger) - a.energy_j - b.energy_j
    assert ledger.phase_j["idle_standby"] == pytest.approx(standby, rel=REL)


def test_missing_request_takes_its_share_to_unattributed() -> None:
    """The count said two ran, one reported by the end of the hold: the other's equal
    share (it weighs as the mean of those placed) is unattributed."""
    ledger = _ledger(hold_s=10.0, counted=True)
    _samples(ledger, 0.0, 4.0, 300.0)
    ledger.running(0.0, 4.0, 2)
    ledger.place("a", model="m", start_s=0.0, first_token_s=1.0, end_s=4.0,
                 prompt_tokens=10, completion_tokens=30)  # fmt: skip
    _samples(ledger, 4.1, 20.0, 100.0)
    ledger.running(4.0, 20.0, 0)
    [a] = ledger.pop_finished()
    assert a.energy_j == pytest.approx(0.5 * 4.0 * 300.0, rel=REL)
    assert ledger.unattributed_j == pytest.approx(0.5 * 4.0 * 300.0, rel=REL)


def test_phases_are_live_with_the_count_and_at_the_hold_without() -> None:
    """Where the count shows a request ran all through (running at both scrapes), serving
    energy reaches the phase counters before any span; without one it waits for the
    hold (it is held, not lost)."""
    counted, blind = _ledger(counted=True, hold_s=30.0), _ledger(hold_s=30.0)
    for ledger in (counted, blind):
        _samples(ledger, 0.0, 3.0, 300.0)
        if ledger is counted:
            ledger.running(0.0, 3.0, 1, through=1)
        _samples(ledger, 3.1, 4.0, 300.0)
        if ledger is counted:
            ledger.running(3.0, 4.0, 1, through=1)
    assert counted.phase_j["dynamic"] == pytest.approx(4.0 * 200.0, rel=REL)
    assert blind.phase_j["dynamic"] == 0.0
    assert blind.held_j == pytest.approx(_measured(blind), rel=REL)
    blind.flush()
    # never heard from and no count: nothing is known to have run
    assert blind.phase_j["idle_standby"] == pytest.approx(_measured(blind), rel=REL)


def test_held_slots_are_bounded_by_the_hold_not_by_gpus_or_sample_rate() -> None:
    """Memory: one slot per 0.25 s of hold, whatever the GPUs and the sample rate."""
    ledger = _ledger(gpus=8, hold_s=30.0, counted=True)
    t = 0.0
    while t < 120.0:
        for g in ledger.gpus:
            ledger.sample(g, t, 250.0)
        if round(t * 10) % 10 == 0:
            ledger.running(t - 1.0, t, 3)
        t += 0.1
    assert ledger.held is not None
    assert len(ledger.held) <= 30.0 / 0.25 + 8


def test_memory_per_held_slot() -> None:
    """A held slot costs well under a kilobyte (the brief's compact-record bound)."""
    books = Books()
    held = HeldSlots(books, slot_s=0.25, hold_s=1e9, counted=True)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(4000):
        held.add_interval(i * 0.25, 300.0, (i + 1) * 0.25, 300.0, 100.0)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(held) == 4000
    assert used / 4000 < 400


# --------------------------------------------------------------- properties
@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    gpus = draw(st.integers(1, 3))
    steps = draw(st.integers(20, 120))
    watts = draw(st.lists(st.floats(0.0, 700.0), min_size=steps, max_size=steps))
    reqs = []
    horizon = steps * 0.1
    for i in range(draw(st.integers(0, 8))):
        start = draw(st.floats(0.0, horizon))
        end = draw(st.floats(start, horizon + 0.5))
        ft = draw(st.floats(start, end))
        reqs.append({
            "id": f"r{i}",
            "start_s": start, "first_token_s": ft, "end_s": end,
            "prompt_tokens": draw(st.one_of(st.none(), st.integers(0, 2000))),
            "completion_tokens": draw(st.one_of(st.none(), st.integers(0, 300))),
            # when the span arrives (sample step), or never; and whether it is retried
            "arrives": draw(st.one_of(st.none(), st.integers(0, steps + 40))),
            "twice": draw(st.booleans()),
        })  # fmt: skip
    return {
        "gpus": gpus,
        "watts": watts,
        "reqs": reqs,
        "counted": draw(st.booleans()),
        "live": draw(st.booleans()),  # the count is the server's (observer), or the proxy's
        "grace_s": draw(st.sampled_from([0.0, 0.5, 6.0])),
        "claim_s": draw(st.sampled_from([0.0, 0.5, 30.0])),
        # scrapes that never came (the observer missed one, or started late)
        "dropped": draw(st.sets(st.integers(0, 20), max_size=6)),
        "hold_s": draw(st.sampled_from([0.5, 2.0, 30.0])),
        "idle": draw(st.floats(0.0, 400.0)),
        # the step model in force (J per prompt token, output token, context, step)
        "coef": draw(st.one_of(st.none(), st.tuples(*[st.floats(0.0, 1.0)] * 4))),
    }


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_conservation_whatever_arrives_late_twice_or_never(sc: dict[str, Any]) -> None:
    """At every step Σ requests + standby + unattributed + held = measured (the step model
    in force or not); after the flush nothing is held and the phases sum to the measured
    energy; each request is handed out at most once."""
    ledger = _ledger(
        int(sc["gpus"]),
        hold_s=float(sc["hold_s"]),
        counted=bool(sc["counted"]),
        live=bool(sc["live"]),
        grace_s=float(sc["grace_s"]),
        idle=float(sc["idle"]),
        claim_s=float(sc["claim_s"]),
    )
    ledger._books.step_model.coef = sc["coef"]
    watts: list[float] = sc["watts"]
    reqs: list[dict[str, Any]] = sc["reqs"]
    finished: list[FinishedRequest] = []
    steps = len(watts)
    for step in range(steps + 41):
        t = step * 0.1
        w = watts[min(step, steps - 1)]
        for g in ledger.gpus:
            ledger.sample(g, t, w)
        if sc["counted"] and step % 10 == 9 and step // 10 not in sc["dropped"]:
            t0 = t - 1.0
            n = sum(1 for r in reqs if r["start_s"] < t and r["end_s"] > t0)
            through = sum(1 for r in reqs if r["start_s"] <= t0 and r["end_s"] >= t)
            ledger.running(t0, t, n, through)
        for r in reqs:
            if r["arrives"] == step:
                for _ in range(2 if r["twice"] else 1):
                    ledger.place(
                        str(r["id"]), model="m",
                        start_s=r["start_s"], first_token_s=r["first_token_s"],
                        end_s=r["end_s"], prompt_tokens=r["prompt_tokens"],
                        completion_tokens=r["completion_tokens"],
                    )  # fmt: skip
        finished.extend(ledger.pop_finished())
        measured = _measured(ledger)
        assert math.isclose(_books(ledger, finished), measured, rel_tol=REL, abs_tol=1e-6)
    ledger.flush()
    finished.extend(ledger.pop_finished())
    measured = _measured(ledger)
    assert ledger.held_j == pytest.approx(0.0, abs=1e-6)
    assert math.isclose(_books(ledger, finished), measured, rel_tol=REL, abs_tol=1e-6)
    assert math.isclose(ledger.total_j, measured, rel_tol=REL, abs_tol=1e-6)
    ids = [f.id for f in finished]
    assert len(ids) == len(set(ids))
    assert set(ids) == {str(r["id"]) for r in reqs if r["arrives"] is not None}
    for f in finished:
        assert f.energy_j >= -1e-9
        assert -1e-9 <= f.prefill_j <= f.energy_j + 1e-9


def test_a_count_that_is_not_the_servers_books_phases_when_slots_settle() -> None:
    """The proxy's count (it sees requests queued): intervals settle once it is satisfied,
    but the phases wait for the settlement, so queued time with nothing running is standby."""
    ledger = _ledger(hold_s=600.0, counted=True, live=False)
    _samples(ledger, 0.0, 4.0, 300.0)
    ledger.running(0.0, 4.0, 1)
    assert ledger.phase_j["dynamic"] == 0.0  # not live: nothing booked yet
    ledger.place(
        "q", model="m", start_s=2.0, first_token_s=2.5, end_s=3.0,
        prompt_tokens=5, completion_tokens=5, heard_s=(1.0, 3.5),
    )  # fmt: skip
    ledger.running(4.0, 5.0, 0)
    _samples(ledger, 4.1, 5.0, 100.0)
    [f] = ledger.pop_finished()  # final at once, not at the hold
    assert f.energy_j == pytest.approx(1.0 * 300.0, rel=REL)
    assert ledger.unattributed_j == pytest.approx(0.0, abs=1e-9)
    # [0, 4) except the 1 s it ran: standby (the 1 s before it was heard of is held to the hold)
    assert ledger.phase_j["idle_standby"] + ledger.held_j == pytest.approx(
        _measured(ledger) - f.energy_j, rel=REL
    )


def test_a_short_request_between_two_scrapes_waits_for_its_span() -> None:
    """A 70 ms request the running gauge never saw (0 at both scrapes) still gets its
    share when its span comes within the exporter's delay (the grace)."""
    ledger = _ledger(hold_s=900.0, counted=True, idle=80.0, grace_s=6.0)
    for second in range(1, 9):
        _samples(ledger, second - 1.0 + 0.1 * (second > 1), float(second), 100.0)
        ledger.running(second - 1.0, float(second), 0)
    ledger.place(
        "r1", model="m", start_s=3.2, first_token_s=3.23, end_s=3.27,
        prompt_tokens=10, completion_tokens=5,
    )  # fmt: skip
    _samples(ledger, 8.1, 12.0, 100.0)
    [f] = ledger.pop_finished()
    assert f.energy_j == pytest.approx(0.07 * 100.0, rel=1e-6)
    assert f.dynamic_j == pytest.approx(0.07 * 20.0, rel=1e-6)


def test_a_finished_count_keeps_slots_open_past_the_grace() -> None:
    """A window whose count says one request ran (it finished inside the window) waits
    for that request's report even after the grace."""
    ledger = _ledger(hold_s=900.0, counted=True, grace_s=1.0)
    _samples(ledger, 0.0, 2.0, 200.0)
    ledger.running(0.0, 2.0, 1)  # running at the end 0, one finished in the window
    _samples(ledger, 2.1, 20.0, 100.0)
    ledger.running(2.0, 20.0, 0)
    assert ledger.held_j > 0.0
    ledger.place(
        "late", model="m", start_s=0.5, first_token_s=0.6, end_s=1.5,
        prompt_tokens=10, completion_tokens=5,
    )  # fmt: skip
    _samples(ledger, 20.1, 21.0, 100.0)
    [f] = ledger.pop_finished()
    assert f.energy_j == pytest.approx(1.0 * 200.0, rel=1e-6)
    assert ledger.held_j == pytest.approx(1.0 * 100.0, rel=1e-6)  # the last second: its grace


def test_busy_readings_do_not_become_the_baseline_without_counts() -> None:
    """Traces alone: spans come late, so once requests are heard of, live readings are
    not taken as standby: the estimated baseline stays at what the idle start showed."""
    ledger = Ledger(["0"], late_hold_s=60.0)
    _samples(ledger, 0.0, 20.0, 60.0)  # idle, before any traffic
    before = ledger.idle_baseline_w()
    ledger.place(
        "a", model="m", start_s=19.0, first_token_s=19.5, end_s=20.0,
        prompt_tokens=1, completion_tokens=1,
    )  # fmt: skip
    _samples(ledger, 20.1, 60.0, 300.0)  # busy; its spans are still to come
    assert before == pytest.approx(60.0)
    assert ledger.idle_baseline_w() == pytest.approx(60.0)


class _CountingSlots(dict[int, Any]):
    """A slot table that counts look-ups, to see how much work a call does."""

    gets = 0

    def get(self, key: Any, default: Any = None) -> Any:
        self.gets += 1
        return super().get(key, default)


def test_a_span_with_a_wild_start_before_any_sample_costs_no_walk_over_its_window() -> None:
    """A span timed decades back (a broken exporter clock) placed before the first sample
    does not walk its whole window slot by slot (that would stall the event loop)."""
    slots = _CountingSlots()
    held = HeldSlots(Books(), slot_s=0.1, hold_s=60.0, _slots=slots)
    request = HeldRequest.whole(
        "r1", "m", start_s=-1e5, first_token_s=0.0, end_s=1.0, prompt_tokens=1,
        completion_tokens=1,
    )  # fmt: skip
    assert held.place(request)
    assert slots.gets < 1000


# ------------------------------------------------- claims: final soon after the span
def _scrape_each_second(ledger: Ledger, until_s: float, runs: list[tuple[float, float]]) -> None:
    """Samples at 10 Hz (300 W, baseline 100 W) and the server's count each second."""
    assert ledger.held is not None
    t = ledger.held._now_s if ledger.held._now_s > 0 else 0.0
    while t < until_s - 1e-9:
        t = round(t + 0.1, 6)
        for g in ledger.gpus:
            ledger.sample(g, t, 300.0)
        if round(t * 10) % 10 == 0:
            t0 = t - 1.0
            ran = sum(1 for a, b in runs if a < t and b > t0)
            through = sum(1 for a, b in runs if a <= t0 and b >= t)
            ledger.running(t0, t, ran, through)


def test_a_short_request_beside_a_long_generation_is_final_at_the_claim() -> None:
    """A short request that ran beside a 100 s generation is final ``claim_s`` after its
    end, not when the long one reports: it takes its share with the long one weighing as
    a stand-in; the long one's span later takes what was kept, and where the count says
    it ran alone, all of it."""
    ledger = _ledger(hold_s=900.0, counted=True, grace_s=6.0, claim_s=10.0)
    runs = [(0.0, 100.0), (20.25, 20.75)]
    _scrape_each_second(ledger, 22.0, runs)
    ledger.place(
        "short", model="m", start_s=20.25, first_token_s=20.5, end_s=20.75,
        prompt_tokens=10, completion_tokens=10,
    )  # fmt: skip
    _scrape_each_second(ledger, 37.0, runs)  # 21 + 10 s claim + a scrape
    [short] = ledger.pop_finished()
    assert short.id == "short"
    assert short.energy_j == pytest.approx(0.5 * 0.5 * 300.0, rel=REL)  # two ran: half
    _scrape_each_second(ledger, 104.0, runs)
    ledger.place(
        "long", model="m", start_s=0.0, first_token_s=0.5, end_s=100.0,
        prompt_tokens=10, completion_tokens=2000,
    )  # fmt: skip
    _scrape_each_second(ledger, 120.0, runs)
    [long] = ledger.pop_finished()
    assert long.energy_j == pytest.approx(99.9 * 300.0 - short.energy_j, rel=REL)
    assert long.energy_j >= 0.0
    assert ledger.unattributed_j == pytest.approx(0.0, abs=1e-6)
    assert _books(ledger, [short, long]) == pytest.approx(_measured(ledger), rel=REL)


def test_a_co_runner_never_heard_from_leaves_its_kept_share_unattributed() -> None:
    """Claimed with one co-runner still to report that never does: the placed request
    keeps its half, the kept half is unattributed when the hold ends; a retried export
    of the placed one changes nothing."""
    ledger = _ledger(hold_s=40.0, counted=True, grace_s=1.0, claim_s=2.0)
    runs = [(0.0, 4.0), (0.0, 4.0)]
    _scrape_each_second(ledger, 5.0, runs)  # samples from 0.1 s: 3.9 s at 300 W by 4 s
    kw = {"model": "m", "start_s": 0.0, "first_token_s": 0.0, "end_s": 4.0,
          "prompt_tokens": 5, "completion_tokens": 5}  # fmt: skip
    assert ledger.place("a", **kw)  # type: ignore[arg-type]
    _scrape_each_second(ledger, 10.0, runs)
    [a] = ledger.pop_finished()
    assert a.energy_j == pytest.approx(0.5 * 3.9 * 300.0, rel=REL)
    assert not ledger.place("a", **kw)  # type: ignore[arg-type]
    _scrape_each_second(ledger, 50.0, runs)
    assert ledger.pop_finished() == []
    assert ledger.unattributed_j == pytest.approx(0.5 * 3.9 * 300.0, rel=REL)


def test_without_a_count_nothing_is_claimed_before_the_hold() -> None:
    """Traces alone: no count says who ran beside a request, so its slots wait for the
    hold (an early split could give a later span's share to those heard first)."""
    ledger = _ledger(hold_s=60.0, counted=False, grace_s=0.0, claim_s=0.0)
    _samples(ledger, 0.0, 5.0, 300.0)
    ledger.place(
        "a", model="m", start_s=1.0, first_token_s=1.5, end_s=2.0,
        prompt_tokens=5, completion_tokens=5,
    )  # fmt: skip
    _samples(ledger, 5.1, 50.0, 300.0)
    assert ledger.pop_finished() == []
    _samples(ledger, 50.1, 70.0, 300.0)
    [a] = ledger.pop_finished()
    assert a.energy_j == pytest.approx(1.0 * 300.0, rel=REL)


def test_a_reused_request_id_is_a_second_request_not_a_retry() -> None:
    """Two requests under one id (a client's reused ``X-Request-Id``) at different times
    are both placed; a retried export of either (same id, same start) counts once."""
    ledger = _ledger(hold_s=60.0)
    _samples(ledger, 0.0, 10.0, 300.0)
    first = {"model": "m", "start_s": 1.0, "first_token_s": 1.5, "end_s": 3.0,
             "prompt_tokens": 5, "completion_tokens": 5}  # fmt: skip
    second = {**first, "start_s": 5.0, "first_token_s": 5.5, "end_s": 6.0}
    assert ledger.place("req-1", **first)  # type: ignore[arg-type]
    assert ledger.place("req-1", **second)  # type: ignore[arg-type]
    assert not ledger.place("req-1", **first)  # type: ignore[arg-type]
    ledger.flush()
    got = sorted((f.start_s, f.energy_j) for f in ledger.pop_finished())
    assert [start for start, _ in got] == [1.0, 5.0]
    assert [joules for _, joules in got] == pytest.approx([2.0 * 300.0, 1.0 * 300.0])


def test_counts_at_epoch_seconds_wait_only_for_their_own_window() -> None:
    """At epoch seconds a count's window ends on a slot's start exactly (below the float
    resolution of a fixed epsilon): that slot belongs to the next window only, so counts
    that came before the samples leave no slot waiting on, or taken for, a neighbour's
    count, and each request takes the serving energy of its window (none unattributed)."""
    t0 = 1_700_000_000.0
    ledger = _ledger(hold_s=600.0, counted=True, grace_s=6.0, claim_s=30.0)
    for i in range(8):  # the scrapes come before the (reconciled, later) samples
        ran = 2 if i == 3 else 1 if i < 6 else 0
        ledger.running(t0 + i, t0 + i + 1, ran, 1 if i in (1, 4) else 0)
    _samples(ledger, t0, t0 + 8.0, 300.0)
    kw = {"model": "m", "prompt_tokens": 5, "completion_tokens": 5}
    ledger.place("a", start_s=t0 + 0.25, first_token_s=t0 + 0.5, end_s=t0 + 2.75, **kw)  # type: ignore[arg-type]
    ledger.place("b", start_s=t0 + 3.25, first_token_s=t0 + 3.5, end_s=t0 + 5.75, **kw)  # type: ignore[arg-type]
    ledger.place("c", start_s=t0 + 3.5, first_token_s=t0 + 3.5, end_s=t0 + 3.75, **kw)  # type: ignore[arg-type]
    _samples(ledger, t0 + 8.1, t0 + 16.0, 100.0)  # all spans came within the grace
    ledger.running(t0 + 8, t0 + 16, 0)
    got = {f.id: f.energy_j for f in ledger.pop_finished()}
    assert got["a"] == pytest.approx(2.5 * 300.0, rel=REL)
    assert got["b"] + got["c"] == pytest.approx(2.5 * 300.0, rel=REL)  # c ran beside b
    assert ledger.unattributed_j == pytest.approx(0.0, abs=1e-6)


def test_a_co_runner_that_began_after_a_slot_keeps_no_share_of_it() -> None:
    """At the claim a co-runner still to report is still running: where it was not running
    at its window's start it began within the window, so slots early in the window are
    not kept for it (no span would take that share): the short request that ran alone
    there takes all of it, and nothing ends unattributed once both reported."""
    ledger = _ledger(hold_s=900.0, counted=True, grace_s=1.0, claim_s=3.0)
    runs = [(1.0, 1.25), (1.75, 60.0)]
    _scrape_each_second(ledger, 3.0, runs)  # its span comes before the claim
    kw = {"model": "m", "prompt_tokens": 5, "completion_tokens": 5}
    ledger.place("short", start_s=1.0, first_token_s=1.1, end_s=1.25, **kw)  # type: ignore[arg-type]
    _scrape_each_second(ledger, 10.0, runs)
    [short] = ledger.pop_finished()
    assert short.energy_j == pytest.approx(0.25 * 300.0, rel=REL)
    _scrape_each_second(ledger, 66.0, runs)
    ledger.place("long", start_s=1.75, first_token_s=2.0, end_s=60.0, **kw)  # type: ignore[arg-type]
    _scrape_each_second(ledger, 70.0, runs)
    [long] = ledger.pop_finished()
    assert long.energy_j == pytest.approx(58.25 * 300.0, rel=REL)
    assert ledger.unattributed_j == pytest.approx(0.0, abs=1e-6)
    assert _books(ledger, [short, long]) == pytest.approx(_measured(ledger), rel=REL)


def test_power_rising_within_a_slot_goes_to_the_part_where_it_was_drawn() -> None:
    """Power ramping from the baseline to 500 W over one slot: the request in its second
    half takes the dynamic energy drawn there (three times the first half's), not half
    of the slot's; the two still add up to the slot."""
    ledger = _ledger(hold_s=1.0)
    for g in ledger.gpus:
        ledger.sample(g, 0.0, 100.0)
        ledger.sample(g, 0.25, 500.0)  # one slot of 0.25 s: dynamic 1600 W/s * t
    kw = {"model": "m", "prompt_tokens": 5, "completion_tokens": 5}
    ledger.place("a", start_s=0.0, first_token_s=0.0625, end_s=0.125, **kw)  # type: ignore[arg-type]
    ledger.place("b", start_s=0.125, first_token_s=0.1875, end_s=0.25, **kw)  # type: ignore[arg-type]
    _samples(ledger, 0.25, 3.0, 100.0)
    got = {f.id: f for f in ledger.pop_finished()}
    assert got["a"].dynamic_j == pytest.approx(800.0 * 0.125**2, rel=REL)
    assert got["b"].dynamic_j == pytest.approx(800.0 * (0.25**2 - 0.125**2), rel=REL)
    assert got["a"].idle_j == pytest.approx(got["b"].idle_j, rel=REL)
    assert _books(ledger, list(got.values())) == pytest.approx(_measured(ledger), rel=REL)


def test_a_slot_dynamic_energy_follows_the_step_models_work_within_it() -> None:
    """Flat power over one slot, a 1,000-token prompt in its first half beside a decode:
    where the step model is in force the slot's dynamic energy goes to its pieces by
    their predicted work, as the live path reshapes an interval between readings (not
    half to each half), its total kept."""
    ledger = _ledger(hold_s=1.0)
    ledger._books.step_model.coef = (0.01, 0.001, 0.0, 0.0)  # J per prompt / output token
    for g in ledger.gpus:
        ledger.sample(g, 0.0, 300.0)
        ledger.sample(g, 0.25, 300.0)  # one slot: 50 J above the 100 W baseline
    ledger.place(
        "prompt", model="m", start_s=0.0, first_token_s=0.125, end_s=0.25,
        prompt_tokens=1000, completion_tokens=1,
    )  # fmt: skip
    ledger.place(
        "decode", model="m", start_s=0.0, first_token_s=0.0, end_s=0.25,
        prompt_tokens=0, completion_tokens=100,
    )  # fmt: skip
    _samples(ledger, 0.25, 3.0, 100.0)
    got = {f.id: f for f in ledger.pop_finished()}
    first, second = 0.01 * 1000 + 0.001 * 50, 0.001 * (1 + 50)  # each half's predicted J
    want = 50.0 * (0.01 * 1000 + 0.001 * 1) / (first + second)
    assert got["prompt"].dynamic_j == pytest.approx(want, rel=REL)
    assert got["prompt"].dynamic_j + got["decode"].dynamic_j == pytest.approx(50.0, rel=REL)
    assert _books(ledger, list(got.values())) == pytest.approx(_measured(ledger), rel=REL)
