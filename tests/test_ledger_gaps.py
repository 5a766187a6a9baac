"""Gaps, silent GPUs and the unattributed bucket: nothing lost or created, at every moment."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.ledger import FinishedRequest, Ledger
from sidecar.power.base import PowerSample
from sidecar.reconcile import Reconciler


def _balance(ledger: Ledger, finished: list[FinishedRequest]) -> tuple[float, float]:
    """(measured, accounted): requests handed out + those still open + standby + unattributed."""
    accounted = (
        sum(f.energy_j for f in finished)
        + ledger.open_j()
        + ledger.phase_j["idle_standby"]
        + ledger.unattributed_j
    )
    return ledger.total_j, accounted


class TestGaps:
    def test_without_a_counter_nothing_is_invented_over_a_gap(self) -> None:
        """A 4 s silence at 10 Hz is a gap: no energy is drawn through it, and it counts whole."""
        ledger = Ledger(["0"], idle_watts={"0": 50.0}, sample_period_s=0.1)
        for i in range(11):  # 0.0 .. 1.0 s
            ledger.sample("0", i / 10, 100.0)
        for i in range(50, 61):  # 5.0 .. 6.0 s
            ledger.sample("0", i / 10, 100.0)
        ledger.flush()
        assert ledger.total_j == pytest.approx(200.0)
        assert ledger.gap_s("0") == pytest.approx(4.0)

    def test_with_a_counter_the_gap_is_booked_evenly(self) -> None:
        """Over a gap the counter's increase is spread evenly: a request inside gets its share."""
        ledger = Ledger(["0"], idle_watts={"0": 50.0}, sample_period_s=0.1)
        ledger.add_request("r", model="m", start_s=2.0, end_s=3.0)
        ledger.sample("0", 1.0, 100.0, 1000.0)
        ledger.sample("0", 5.0, 100.0, 1800.0)  # 800 J over 4 s: 200 W on average
        ledger.flush()
        (f,) = ledger.pop_finished()
        assert f.energy_j == pytest.approx(200.0)
        assert f.idle_j == pytest.approx(50.0)
        assert ledger.total_j == pytest.approx(800.0)
        assert ledger.gap_s("0") == pytest.approx(4.0)

    def test_short_silences_are_no_gap(self) -> None:
        """Two sample periods without a reading are drawn through as usual."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0}, sample_period_s=0.1)
        ledger.sample("0", 0.0, 100.0)
        ledger.sample("0", 0.25, 100.0)
        ledger.flush()
        assert ledger.total_j == pytest.approx(25.0)
        assert ledger.gap_s("0") == 0.0

    def test_reconciler_window_does_not_reach_across_a_gap(self) -> None:
        """The first reading after a gap goes out unscaled: the gap's energy is not put into it."""
        rec = Reconciler(gap_after_s=0.3)
        out: list[PowerSample] = []
        for i in range(21):  # 2 s at 10 Hz, counter consistent with 100 W
            out += rec.push(PowerSample(i / 10, "0", 100.0, 10.0 * i))
        out += rec.push(PowerSample(12.0, "0", 100.0, 200.0 + 3000.0))  # busy gap: 300 W
        assert out[-1].time_s == 12.0
        assert out[-1].power_w == 100.0


class TestSilentGpu:
    def test_request_over_a_silent_gpu_is_final_with_its_whole_share(self) -> None:
        """A GPU falls silent mid-request: the request is handed out once, and the GPU's late
        counter energy over it goes to the unattributed bucket, never lost."""
        ledger = Ledger(["0", "1"], idle_watts={"0": 50.0, "1": 50.0}, sample_period_s=0.1)
        finished: list[FinishedRequest] = []
        for i in range(11):
            for g in ("0", "1"):
                ledger.sample(g, i / 10, 100.0, 10.0 * i)
        ledger.start("r", 1.5, model="m")
        for i in range(11, 500):  # GPU 1 is silent from 1 s to 50 s
            ledger.sample("0", i / 10, 100.0, 10.0 * i)
            if i == 30:
                ledger.finish("r", 3.0)
            finished += ledger.pop_finished()
            measured, accounted = _balance(ledger, finished)
            assert accounted == pytest.approx(measured, rel=1e-9, abs=1e-9)
        assert [f.id for f in finished] == ["r"]  # final although GPU 1 never caught up
        whole = finished[0].energy_j
        assert whole == pytest.approx(150.0)  # 1.5 s at 100 W on GPU 0
        ledger.sample("1", 50.0, 100.0, 5000.0)  # back: 4900 J over its 49 s gap
        ledger.flush()
        finished += ledger.pop_finished()
        measured, accounted = _balance(ledger, finished)
        assert accounted == pytest.approx(measured, rel=1e-9)
        assert ledger.unattributed_j == pytest.approx(150.0)  # its 1.5 s of the gap at 100 W
        assert finished[0].energy_j == whole


class TestUnattributed:
    def test_activity_that_is_no_request_goes_to_unattributed(self) -> None:
        """Shares of activity the ledger cannot hand to a request land in the bucket."""
        ledger = Ledger(["0"], idle_watts={"0": 50.0})
        ledger.start("seen", 0.0, model="m")
        ledger.start("unseen", 0.0, model="m", attributable=False)
        ledger.finish("seen", 2.0)
        ledger.finish("unseen", 2.0)
        ledger.sample("0", 0.0, 100.0)
        ledger.sample("0", 2.0, 100.0)
        ledger.flush()
        finished = ledger.pop_finished()
        assert [f.id for f in finished] == ["seen"]
        assert ledger.unattributed_j == pytest.approx(100.0)
        assert finished[0].energy_j + ledger.unattributed_j == pytest.approx(ledger.total_j)

    def test_proxy_mode_leaves_it_empty(self) -> None:
        """Every request heard from: the bucket stays at zero."""
        ledger = Ledger(["0"], idle_watts={"0": 50.0})
        ledger.add_request("a", model="m", start_s=0.0, end_s=1.0)
        ledger.sample("0", 0.0, 100.0)
        ledger.sample("0", 2.0, 100.0)
        ledger.flush()
        assert ledger.unattributed_j == 0.0


@st.composite
def live_runs(draw: st.DrawFn) -> list[tuple[str, ...]]:
    """Time-ordered live events: samples (with silences and counters), starts, ends."""
    events: list[tuple[str, ...]] = []
    t = 0.0
    counter = {"0": 0.0, "1": 0.0}
    open_ids: list[str] = []
    n = 0
    for _ in range(draw(st.integers(5, 60))):
        t += draw(st.sampled_from([0.1, 0.1, 0.1, 0.25, 1.0, 4.0, 15.0]))
        kind = draw(st.sampled_from(["sample", "sample", "sample", "start", "end", "token"]))
        if kind == "start":
            n += 1
            rid = f"r{n}"
            open_ids.append(rid)
            unseen = draw(st.booleans()) and draw(st.booleans())
            events.append(("start", f"{t}", rid, "u" if unseen else "s"))
        elif kind == "end" and open_ids:
            rid = open_ids.pop(draw(st.integers(0, len(open_ids) - 1)))
            events.append(("end", f"{t}", rid))
        elif kind == "token" and open_ids:
            events.append(("token", f"{t}", open_ids[0]))
        for g in ("0", "1"):
            if g == "1" and draw(st.booleans()) and draw(st.booleans()):
                continue  # GPU 1 lags or stays silent
            w = draw(st.floats(0.0, 600.0))
            counter[g] += w * 0.1
            events.append(("sample", f"{t}", g, f"{w}", f"{counter[g]}"))
    return events


@settings(max_examples=60, deadline=None)
@given(live_runs(), st.booleans())
def test_requests_standby_and_unattributed_sum_to_measured_at_all_times(
    events: list[tuple[str, ...]], with_counter: bool
) -> None:
    """After every event: Σ finished + open + standby + unattributed = measured (1e-6 relative),
    and every finished request's stages sum to its energy."""
    ledger = Ledger(["0", "1"], sample_period_s=0.1, silent_after_s=2.0, max_wait_s=1.0)
    finished: list[FinishedRequest] = []
    started: set[str] = set()
    ended: set[str] = set()
    for ev in events:
        t = float(ev[1])
        if ev[0] == "start":
            started.add(ev[2])
            ledger.start(ev[2], t, model="m", prompt_tokens=100, attributable=ev[3] == "s")
        elif ev[0] == "end":
            ended.add(ev[2])
            ledger.finish(ev[2], t, completion_tokens=10)
        elif ev[0] == "token":
            ledger.tokens(ev[2], t, 2)
        else:
            ledger.sample(ev[2], t, float(ev[3]), float(ev[4]) if with_counter else None)
        finished += ledger.pop_finished()
        measured, accounted = _balance(ledger, finished)
        assert accounted == pytest.approx(measured, rel=1e-6, abs=1e-6)
    end_s = float(events[-1][1]) + 0.1
    for rid in sorted(started - ended):
        ledger.finish(rid, end_s)
    ledger.flush()
    finished += ledger.pop_finished()
    measured, accounted = _balance(ledger, finished)
    assert accounted == pytest.approx(measured, rel=1e-6, abs=1e-6)
    assert ledger.open_j() == 0.0
    for f in finished:
        assert -1e-9 <= f.prefill_j <= f.energy_j + 1e-9
        assert f.prefill_j + f.decode_j == pytest.approx(f.energy_j)
