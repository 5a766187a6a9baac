"""The ledger's exact answers on hand-computed cases."""

from __future__ import annotations

import pytest

from sidecar.ledger import BaselineEstimator, Ledger, PrefillFit, estimate_idle_watts


def feed(ledger: Ledger, gpu: str, points: list[tuple[float, float]]) -> None:
    for t, p in points:
        ledger.sample(gpu, t, p)


def finished(ledger: Ledger) -> dict[str, tuple[float, float]]:
    ledger.flush()
    return {f.id: (f.dynamic_j, f.idle_j) for f in ledger.pop_finished()}


class TestHandComputed:
    def test_request_alone_takes_everything_of_its_interval(self) -> None:
        """A lone request gets all dynamic and idle energy while it runs; the rest is standby."""
        ledger = Ledger(["0"], idle_watts={"0": 60.0})
        ledger.add_request("a", model="m", start_s=2.0, end_s=6.0)
        feed(ledger, "0", [(0.0, 100.0), (10.0, 100.0)])
        got = finished(ledger)
        assert got["a"] == pytest.approx((160.0, 240.0))
        assert ledger.phase_j == pytest.approx(
            {"dynamic": 160.0, "idle_serving": 240.0, "idle_standby": 600.0}
        )

    def test_identical_concurrent_requests_share_equally(self) -> None:
        """Two requests with the same times and tokens get the same energy."""
        ledger = Ledger(["0"], idle_watts={"0": 50.0})
        for rid in ("a", "b"):
            ledger.add_request(
                rid,
                model="m",
                start_s=1.0,
                end_s=5.0,
                first_token_s=2.0,
                prompt_tokens=100,
                completion_tokens=40,
            )
        feed(ledger, "0", [(0.0, 150.0), (6.0, 150.0)])
        got = finished(ledger)
        assert got["a"] == pytest.approx(got["b"])
        assert got["a"] == pytest.approx((200.0, 100.0))

    def test_disjoint_requests_keep_their_own_intervals(self) -> None:
        """Requests that never overlap each get only the energy of their own time."""
        ledger = Ledger(["0"], idle_watts={"0": 40.0})
        ledger.add_request("a", model="m", start_s=1.0, end_s=2.0)
        ledger.add_request("b", model="m", start_s=3.0, end_s=5.0)
        feed(ledger, "0", [(0.0, 100.0), (6.0, 100.0)])
        got = finished(ledger)
        assert got["a"] == pytest.approx((60.0, 40.0))
        assert got["b"] == pytest.approx((120.0, 80.0))
        assert ledger.phase_j["idle_standby"] == pytest.approx(300.0)

    def test_power_step_at_request_boundary(self) -> None:
        """A ramp up and down around a request integrates the linear line exactly."""
        ledger = Ledger(["0"], idle_watts={"0": 60.0})
        ledger.add_request("a", model="m", start_s=2.0, end_s=6.0)
        feed(ledger, "0", [(0.0, 60.0), (2.0, 60.0), (4.0, 160.0), (6.0, 160.0), (8.0, 60.0)])
        got = finished(ledger)
        assert got["a"] == pytest.approx((300.0, 240.0))
        assert ledger.phase_j["idle_standby"] == pytest.approx(120.0 + 220.0)

    def test_baseline_crossing_is_cut_exactly(self) -> None:
        """Power falling through the baseline mid-interval splits at the crossing."""
        ledger = Ledger(["0"], idle_watts={"0": 60.0})
        ledger.add_request("a", model="m", start_s=0.0, end_s=4.0)
        feed(ledger, "0", [(0.0, 100.0), (4.0, 20.0)])
        got = finished(ledger)
        assert got["a"] == pytest.approx((40.0, 200.0))

    def test_several_gpus_sum_with_their_own_baselines(self) -> None:
        """Each GPU is split against its own baseline; the request collects from both."""
        ledger = Ledger(["0", "1"], idle_watts={"0": 50.0, "1": 70.0})
        ledger.add_request("a", model="m", start_s=0.0, end_s=2.0)
        feed(ledger, "0", [(0.0, 150.0), (2.0, 150.0)])
        feed(ledger, "1", [(0.0, 100.0), (2.0, 100.0)])
        got = finished(ledger)
        assert got["a"] == pytest.approx((200.0 + 60.0, 100.0 + 140.0))
        assert ledger.gpu_energy_j("0") == pytest.approx(300.0)
        assert ledger.gpu_energy_j("1") == pytest.approx(200.0)
        assert ledger.idle_baseline_w() == pytest.approx(120.0)

    def test_prefill_weight_follows_prompt_length(self) -> None:
        """Before first tokens, dynamic energy splits by prompt tokens over time to first token."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0})
        ledger.add_request(
            "long", model="m", start_s=0.0, end_s=2.0, first_token_s=2.0, prompt_tokens=300
        )
        ledger.add_request(
            "short", model="m", start_s=0.0, end_s=2.0, first_token_s=2.0, prompt_tokens=100
        )
        feed(ledger, "0", [(0.0, 100.0), (2.0, 100.0)])
        got = finished(ledger)
        assert got["long"][0] == pytest.approx(150.0)
        assert got["short"][0] == pytest.approx(50.0)

    def test_uninformed_request_weighs_as_mean_of_others(self) -> None:
        """A request with no token information counts as the mean of the informed ones."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0})
        ledger.add_request(
            "a", model="m", start_s=0.0, end_s=4.0, prompt_tokens=10, completion_tokens=30
        )
        ledger.add_request(
            "b", model="m", start_s=0.0, end_s=4.0, prompt_tokens=30, completion_tokens=10
        )
        ledger.add_request("c", model="m", start_s=0.0, end_s=4.0)
        feed(ledger, "0", [(0.0, 90.0), (4.0, 90.0)])
        got = finished(ledger)
        assert got["c"][0] == pytest.approx(120.0)
        assert got["a"][0] == pytest.approx(120.0)
        assert got["b"][0] == pytest.approx(120.0)

    def test_streamed_tokens_weigh_by_chunk(self) -> None:
        """Live streaming: each chunk's tokens cover the gap since the previous chunk."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0}, max_wait_s=100.0)
        ledger.start("a", 0.0, model="m", prompt_tokens=0)
        ledger.start("b", 0.0, model="m", prompt_tokens=0)
        ledger.sample("0", 0.0, 100.0)
        ledger.first_token("a", 0.0)
        ledger.first_token("b", 0.0)
        ledger.tokens("a", 1.0, 3)
        ledger.tokens("b", 1.0, 1)
        ledger.sample("0", 1.0, 100.0)
        ledger.finish("a", 1.0)
        ledger.finish("b", 1.0)
        ledger.sample("0", 2.0, 100.0)
        got = finished(ledger)
        assert got["a"][0] == pytest.approx(75.0)
        assert got["b"][0] == pytest.approx(25.0)

    def test_interval_waits_for_first_token_then_assigns(self) -> None:
        """An interval with a request still in prefill waits until its first token arrives."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0}, max_wait_s=5.0)
        ledger.start("a", 0.0, model="m", prompt_tokens=100)
        ledger.sample("0", 0.0, 100.0)
        ledger.sample("0", 1.0, 100.0)
        assert ledger.total_j == 0.0
        ledger.first_token("a", 1.5)
        ledger.sample("0", 2.0, 100.0)
        assert ledger.total_j == pytest.approx(100.0)
        ledger.finish("a", 2.0)
        ledger.sample("0", 3.0, 100.0)
        assert [f.id for f in ledger.pop_finished()] == ["a"]

    def test_bounded_wait_assigns_after_timeout(self) -> None:
        """Without a first token, the interval is assigned once the wait bound has passed."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0}, max_wait_s=2.0)
        ledger.start("a", 0.0, model="m", prompt_tokens=100)
        ledger.sample("0", 0.0, 100.0)
        ledger.sample("0", 1.0, 100.0)
        ledger.advance(2.5)
        assert ledger.total_j == 0.0
        ledger.advance(3.1)
        assert ledger.phase_j["dynamic"] == pytest.approx(100.0)

    def test_finished_requests_leave_memory(self) -> None:
        """After finalisation the ledger holds no trace of a request."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0})
        for i in range(100):
            ledger.start(str(i), float(i), model="m")
            ledger.sample("0", float(i), 10.0)
            ledger.finish(str(i), i + 0.5)
        ledger.sample("0", 200.0, 10.0)
        assert len(ledger.pop_finished()) == 100
        assert ledger.in_flight() == {}
        assert not ledger._live
        assert not ledger._starts
        assert not ledger._ended


def basis_of(est: BaselineEstimator) -> str:
    """Read afresh (the basis changes as samples come; a plain attribute would be narrowed)."""
    return est.basis


class TestBaseline:
    def test_median_of_settled_standby(self) -> None:
        """With ten or more settled standby samples the baseline is their median."""
        samples = [("0", float(t), 50.0 + (t % 3)) for t in range(20)]
        assert estimate_idle_watts(samples, []) == {"0": 51.0}

    def test_settle_time_after_requests_is_left_out(self) -> None:
        """Samples within two seconds after a request ends do not count as standby."""
        samples = [("0", t / 10, 300.0 if t < 45 else 60.0) for t in range(200)]
        got = estimate_idle_watts(samples, [(0.0, 4.0)])
        assert got["0"] == 60.0

    def test_few_standby_samples_fall_back_to_fifth_percentile(self) -> None:
        """Fewer than ten standby samples: the 5th percentile of all samples."""
        samples = [("0", float(t), float(100 + t)) for t in range(21)]
        got = estimate_idle_watts(samples, [(0.0, 100.0)])
        assert got["0"] == pytest.approx(101.0)

    def test_live_estimator_starts_from_a_low_reading_not_one_reading(self) -> None:
        """Before any standby: the third-lowest reading, so a lone 0 W reading does not pin it."""
        est = BaselineEstimator(window_s=600.0, recompute_s=0.0)
        est.observe(0.0, 0.0, standby=False)
        assert est.value_w is None  # one reading is no estimate
        for i in range(1, 30):
            est.observe(i * 0.1, 120.0 + i, standby=False)
        assert est.value_w is not None
        assert 120.0 < est.value_w < 125.0
        assert est.basis == "startup"

    def test_live_estimator_uses_what_it_saw_before_the_first_request(self) -> None:
        """A few readings before the first request, then busy: their median, basis startup."""
        est = BaselineEstimator(window_s=600.0, recompute_s=0.0)
        for i in range(5):
            est.observe(i * 0.1, 70.0 + i, standby=True, before_request=True)
        for i in range(5, 300):
            est.observe(i * 0.1, 300.0 + (i % 50), standby=False)
        assert est.value_w == 72.0
        assert est.basis == "startup"

    def test_live_estimator_holds_the_last_standby_median_under_load(self) -> None:
        """When the window holds no standby any more, the last standby median is held."""
        est = BaselineEstimator(window_s=60.0, recompute_s=0.0)
        for i in range(100):
            est.observe(i * 0.1, 70.0 + (i % 3), standby=True)
        assert basis_of(est) == "standby"
        for i in range(100, 2000):  # 190 s always busy: the window slides past all standby
            est.observe(i * 0.1, 300.0 + (i % 50), standby=False)
        assert est.value_w == 71.0
        assert basis_of(est) == "held"
        for i in range(2000, 2020):
            est.observe(i * 0.1, 65.0, standby=True)
        assert est.value_w == 65.0
        assert basis_of(est) == "standby"

    def test_power_before_the_upstream_answered_is_forgotten(self) -> None:
        """Readings before the model server answered (model not loaded) leave the estimate."""
        est = BaselineEstimator(window_s=600.0, recompute_s=0.0)
        for i in range(50):
            est.observe(i * 0.1, 20.0, standby=True, before_request=True)
        est.upstream_ready(5.0)
        for i in range(50, 55):
            est.observe(i * 0.1, 70.0, standby=True, before_request=True)
        assert est.value_w == 70.0

    def test_live_estimator_window_slides(self) -> None:
        """Samples older than the window stop counting."""
        est = BaselineEstimator(window_s=10.0, recompute_s=0.0)
        for i in range(20):
            est.observe(float(i), 100.0, standby=True)
        for i in range(20, 40):
            est.observe(float(i), 60.0, standby=True)
        assert est.value_w == 60.0


class TestPrefillFit:
    def test_fit_recovers_the_relative_cost_of_prompt_tokens(self) -> None:
        """On a batched workload whose prompt tokens cost 1/20 of an output token, the fit finds it."""
        import statistics

        from sidecar.attribute import attribute
        from sidecar.workload import WorkloadSpec, generate

        spec = WorkloadSpec(duration_s=90, rps=3.0, gpus=1, seed=11)
        w = generate(spec)
        power, reqs = w.trace_rows()
        truth = {r.id: r.truth_j for r in w.requests}
        out = attribute(power, reqs, idle_watts=[spec.idle_w])
        ratio = out["prefill_token_weight"]
        assert 0.02 < ratio < 0.15, ratio
        errors = [
            abs(r["dynamic_joules"] - truth[r["id"]]) / truth[r["id"]] for r in out["requests"]
        ]
        assert statistics.median(errors) < 0.08

    def test_prior_holds_until_the_data_can_tell(self) -> None:
        """With only decode work seen, the prompt weight stays at its prior of 1."""
        fit = PrefillFit()
        for _ in range(100):
            fit.observe(0.0, 30.0, 36.0, 1.0)
        assert fit.ratio == 1.0


class TestFrontier:
    def test_earliest_known_time_matches_a_scan_of_the_live_requests(self) -> None:
        """Through random starts, chunks and ends (ids reused), the frontier's answer is
        the least known time over the live requests, as a scan would find it."""
        import random

        from sidecar.ledger.frontier import Frontier
        from sidecar.ledger.requests import INF, Request

        rnd = random.Random(5)
        live: dict[str, Request] = {}
        frontier = Frontier(live)
        t = 0.0
        for _ in range(5_000):
            t += rnd.expovariate(100.0)
            rid = f"r{rnd.randrange(40)}"
            req = live.get(rid)
            if req is None:
                req = live[rid] = Request(rid, "m", "chat", t, 10.0, known_s=t)
                frontier.started(req)
            elif rnd.random() < 0.05:
                req.known_s = INF  # ended, and some while later handed out
                if rnd.random() < 0.5:
                    del live[rid]
            elif req.known_s < INF:
                req.known_s = max(req.known_s, t)
            want = min((r.known_s for r in live.values()), default=INF)
            assert frontier.earliest_s() == want


class TestProxyHold:
    """``--proxy-hold``: intervals wait, so a stream's final usage reaches its prefill."""

    @staticmethod
    def run(
        hold_s: float, *, count_at_first_token: bool, cached: bool = False
    ) -> dict[str, tuple[float, float, float]]:
        """Overlapping streams whose body estimates are a third of their prompts: enough of
        them (16 prompt windows) for the prefill rate to be known, so the prefill queue places
        the counted prompts, and the uncounted ones are spread by the rate. ``cached``: the
        server read half of each prompt from its prefix cache (the count at the first token
        is then of the tokens computed, the usage at the end says which were cached)."""
        ledger = Ledger(["0"], idle_watts={"0": 60.0}, hold_s=hold_s, prompts_at_end=hold_s > 0)
        events: list[tuple[float, int, str, int]] = []  # time, kind, request, tokens
        for i in range(24):
            rid, start, prompt = f"r{i}", 0.3 * i, 300 * (1 + i % 5)
            first = start + 0.2 + prompt / 2000.0
            events += [(start, 0, rid, prompt // 3), (first, 1, rid, prompt)]
            events += [(first + 0.05 * k, 2, rid, 1) for k in range(1, 30)]
            events.append((first + 1.6, 3, rid, prompt))
        events += [(0.02 * k, 4, "", 0) for k in range(501)]  # samples, 50 Hz
        for t, kind, rid, n in sorted(events):
            if kind == 0:
                ledger.start(rid, t, model="m", prompt_tokens=n)
            elif kind == 1:
                counted = n - n // 2 if cached else n
                ledger.first_token(rid, t, prompt_tokens=counted if count_at_first_token else None)
            elif kind == 2:
                ledger.tokens(rid, t, n)
            elif kind == 3:
                ledger.finish(
                    rid, t, prompt_tokens=n, completion_tokens=29,
                    cached_tokens=n // 2 if cached else None,
                )  # fmt: skip
            else:
                ledger.sample("0", t, 150.0 + 80.0 * ((t * 7.0) % 1.0))
        ledger.flush()
        return {f.id: (f.dynamic_j, f.idle_j, f.prefill_j) for f in ledger.pop_finished()}

    def test_usage_at_the_end_places_the_prompt_as_a_count_at_the_first_token(self) -> None:
        """Held, the exact prompt from the stream's last chunk gives what the count in its
        first chunk gives; without the hold the prefill was assigned on the estimate."""
        counted = self.run(30.0, count_at_first_token=True)
        held = self.run(30.0, count_at_first_token=False)
        assert held.keys() == counted.keys() == {f"r{i}" for i in range(24)}
        for rid, figures in counted.items():
            assert held[rid] == pytest.approx(figures, rel=1e-9)
        unheld = self.run(0.0, count_at_first_token=False)
        assert max(abs(unheld[r][2] / counted[r][2] - 1.0) for r in counted) > 0.05


class TestCachedPrompt:
    """Prompt tokens read from the server's prefix cache weigh no prefill work."""

    def test_reply_not_streamed(self) -> None:
        """Two replies alike but for the cache: 300 prompt tokens each, 200 of one's cached,
        so they weigh 300 and 100 (the prior weighs a prompt token as an output token)."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0})
        for rid, cached in (("cold", None), ("warm", 200)):
            ledger.start(rid, 0.0, model="m", prompt_tokens=280)  # the body's estimate
            ledger.finish(rid, 2.0, prompt_tokens=300, completion_tokens=0, cached_tokens=cached)
        feed(ledger, "0", [(0.0, 100.0), (2.0, 100.0)])
        ledger.flush()
        got = {f.id: f for f in ledger.pop_finished()}
        assert got["cold"].dynamic_j == pytest.approx(150.0)
        assert got["warm"].dynamic_j == pytest.approx(50.0)
        assert (got["warm"].prompt_tokens, got["warm"].cached_tokens) == (300, 200)
        assert (got["cold"].prompt_tokens, got["cold"].cached_tokens) == (300, None)

    def test_more_cached_than_the_prompt_is_all_of_it(self) -> None:
        """A cached count above the prompt's is clamped: no prefill work, never negative."""
        ledger = Ledger(["0"], idle_watts={"0": 0.0})
        ledger.start("a", 0.0, model="m", prompt_tokens=50)
        ledger.start("b", 0.0, model="m", prompt_tokens=50)
        ledger.finish("a", 2.0, prompt_tokens=50, completion_tokens=10, cached_tokens=90)
        ledger.finish("b", 2.0, prompt_tokens=50, completion_tokens=10)
        feed(ledger, "0", [(0.0, 100.0), (2.0, 100.0)])
        ledger.flush()
        got = {f.id: f for f in ledger.pop_finished()}
        assert got["a"].cached_tokens == 50
        assert got["a"].dynamic_j == pytest.approx(200.0 * 10 / 70)

    def test_held_stream_places_only_the_computed_prompt(self) -> None:
        """Held, a stream whose usage says half its prompt was cached is booked as one whose
        first chunk counted only the computed half; the prompts' share of their windows, and
        with it the prefill stage, is less than uncached (2.4 % here: the rest of a window
        is the decode of the streams beside them)."""
        counted = TestProxyHold.run(30.0, count_at_first_token=True, cached=True)
        held = TestProxyHold.run(30.0, count_at_first_token=False, cached=True)
        uncached = TestProxyHold.run(30.0, count_at_first_token=False)
        assert held.keys() == counted.keys() == uncached.keys()
        for rid, figures in counted.items():
            assert held[rid] == pytest.approx(figures, rel=1e-9)
        assert sum(v[2] for v in held.values()) < 0.99 * sum(v[2] for v in uncached.values())
