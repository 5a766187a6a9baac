"""The meter's request events: tenants, model labels, ids, observer spans, stage figures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sidecar.ledger import FinishedRequest
from sidecar.meter import FixedIntensity, Meter
from sidecar.metrics import BuildInfo, SidecarCollector, make_registry
from sidecar.power.base import GpuInfo, PowerSample
from sidecar.sampler import SamplerStats
from sidecar.trace import TraceRecorder, read_requests


def _meter(clock: list[float], **kwargs: object) -> Meter:
    return Meter(
        [GpuInfo("0", "GPU-0", "sim")],
        clock=lambda: clock[0],
        idle_watts={"0": 50.0},
        intensity=FixedIntensity(400.0, "xx", "fixed"),
        **kwargs,  # type: ignore[arg-type]
    )


def _samples(meter: Meter, clock: list[float], until_s: float, power_w: float = 150.0) -> None:
    while clock[0] < until_s - 1e-9:
        clock[0] = round(clock[0] + 0.1, 6)
        meter.on_samples([PowerSample(clock[0], "0", power_w)])


def _scrape(meter: Meter) -> str:
    collector = SidecarCollector(meter, SamplerStats, BuildInfo("simulated", "proxy"))
    return generate_latest(make_registry(collector)).decode()


class TestTenants:
    def test_tenant_energy_sums_to_attributed_energy_of_finished_requests(self) -> None:
        """Each finished request's energy and grams go to its tenant; no tenant counts as none."""
        clock = [0.0]
        meter = _meter(clock)
        _samples(meter, clock, 1.0)
        a = meter.request_started("chat", "m", 10.0, tenant="team-a")
        b = meter.request_started("chat", "m", 10.0, tenant="team-b")
        c = meter.request_started("chat", "m", 10.0)
        _samples(meter, clock, 3.0)
        for rid in (a, b, c):
            meter.request_finished(rid, "ok", 10, 5)
        _samples(meter, clock, 4.0)
        meter.flush()
        total = sum(h.total for h in meter.request_j.values())
        assert set(meter.tenant_j) == {"team-a", "team-b", "none"}
        assert sum(meter.tenant_j.values()) == pytest.approx(total)
        assert meter.tenant_j["team-a"] == pytest.approx(total / 3)
        grams = sum(meter.tenant_g.values())
        assert grams == pytest.approx(total / 3.6e6 * 400.0)
        text = _scrape(meter)
        assert 'llm_energy_tenant_joules_total{tenant="team-a"}' in text
        assert 'llm_energy_tenant_emissions_grams_total{tenant="none"}' in text

    def test_label_given_at_finish_replaces_the_start_one(self) -> None:
        """The caller may downgrade a tenant label when the response fails."""
        clock = [0.0]
        meter = _meter(clock)
        rid = meter.request_started("chat", "m", 10.0, tenant="new-team")
        _samples(meter, clock, 1.0)
        meter.request_finished(rid, "error", tenant="other")
        meter.flush()
        assert set(meter.tenant_j) == {"other"}

    def test_no_tenant_series_without_tenants(self) -> None:
        """Tenant series are present only when tenants are on."""
        clock = [0.0]
        meter = _meter(clock)
        rid = meter.request_started("chat", "m", 10.0)
        _samples(meter, clock, 1.0)
        meter.request_finished(rid, "ok", 10, 5)
        meter.flush()
        assert meter.tenant_j == {}
        assert "llm_energy_tenant_joules" not in _scrape(meter)


class TestModelLabels:
    def test_failed_requests_do_not_register_model_names(self) -> None:
        """Errors naming unknown models count under other and leave the label budget alone."""
        clock = [0.0]
        meter = _meter(clock, max_models=3)
        for i in range(10):
            rid = meter.request_started("chat", f"typo-{i}", 10.0)
            meter.request_finished(rid, "error")
        ok = meter.request_started("chat", "llama", 10.0)
        meter.request_finished(ok, "ok", 10, 5)
        assert meter.requests[("other", "chat", "error")] == 10
        assert meter.requests[("llama", "chat", "ok")] == 1
        assert meter.models.known("llama")
        assert not meter.models.known("typo-0")

    def test_the_response_model_name_is_preferred(self) -> None:
        """The response's model name becomes the label, and the request's energy goes to it."""
        clock = [0.0]
        meter = _meter(clock)
        _samples(meter, clock, 1.0)
        rid = meter.request_started("chat", "alias", 10.0)
        _samples(meter, clock, 2.0)
        meter.model_learned(rid, "llama-3-8b")
        meter.request_finished(rid, "ok", 10, 5)
        _samples(meter, clock, 3.0)
        assert set(meter.request_j) == {"llama-3-8b"}
        models = {m for m, _ in meter.ledger.model_j}
        assert models == {"llama-3-8b"}
        assert not meter.models.known("alias")

    def test_unconfirmed_names_count_in_flight_as_other(self) -> None:
        """In flight, a name no response confirmed yet shows as other (bounded labels)."""
        clock = [0.0]
        meter = _meter(clock)
        meter.request_started("chat", "brand-new", 10.0)
        assert meter.in_flight() == {"other": 1}


def test_request_ids_are_unique_across_restarts() -> None:
    """Two meters (two starts) never hand out the same request id."""
    clock = [0.0]
    one, two = _meter(clock), _meter(clock)
    first = {one.request_started("chat", "m", 1.0) for _ in range(3)}
    second = {two.request_started("chat", "m", 1.0) for _ in range(3)}
    assert len(first | second) == 6


class TestObserverSpans:
    def _observe(self, meter: Meter, since: float, until: float, running: float) -> None:
        meter.observed(
            "llama", since_s=since, until_s=until, running=running, prompt_tokens=10,
            completion_tokens=5, finished=0,
        )  # fmt: skip

    def test_proxy_taking_over_ends_the_observer_span(self) -> None:
        """With proxy and observer both on, the observer's span ends once the proxy sees traffic."""
        clock = [0.0]
        meter = _meter(clock, hold_s=2.5)
        _samples(meter, clock, 1.0)
        self._observe(meter, 0.0, 1.0, running=3)
        assert meter.in_flight() == {"llama": 3}
        rid = meter.request_started("chat", "llama", 10.0)
        meter.request_finished(rid, "ok", 10, 5)
        _samples(meter, clock, 2.0)
        self._observe(meter, 1.0, 2.0, running=3)  # ignored: the proxy sees every request
        assert meter.in_flight() == {}
        _samples(meter, clock, 10.0)
        assert meter.ledger.in_flight() == {}

    def test_silent_observer_span_ends_where_last_seen(self) -> None:
        """An observer that stops reporting leaves no phantom request in flight."""
        clock = [0.0]
        meter = _meter(clock, hold_s=2.5)
        _samples(meter, clock, 1.0)
        self._observe(meter, 0.0, 1.0, running=2)
        for _ in range(40):
            _samples(meter, clock, clock[0] + 1.0)
            meter.tick()
        assert meter.in_flight() == {}
        assert meter.ledger.in_flight() == {}


def test_summary_has_stage_figures_and_the_baseline_basis() -> None:
    """/summary reports prompt tokens, J per prompt token (prefill), J per output token (decode)."""
    clock = [0.0]
    meter = _meter(clock)
    _samples(meter, clock, 1.0)
    rid = meter.request_started("chat", "m", 100.0)
    _samples(meter, clock, 2.0)
    meter.first_token(rid)
    _samples(meter, clock, 4.0)
    meter.tokens_streamed(rid, 20)
    meter.request_finished(rid, "ok", 100, 20)
    _samples(meter, clock, 6.0)
    doc = meter.summary({"0": 150.0})
    assert doc["idle_baseline_basis"] == "configured"
    w = doc["since_start"]
    assert w["prompt_tokens"] == 100
    # alone at 150 W: 1 s before its first token, 2 s after
    assert w["prefill_joules_per_prompt_token"] == pytest.approx(150.0 / 100)
    assert w["decode_joules_per_output_token"] == pytest.approx(300.0 / 20)
    text = _scrape(meter)
    assert 'llm_energy_model_stage_joules_total{model="m",stage="prefill"} 150.0' in text
    assert 'llm_energy_idle_baseline_info{basis="configured"} 1.0' in text


def test_recordings_appended_across_restarts_attribute_cleanly(tmp_path: Path) -> None:
    """Two starts appending to one --record directory give ids that never collide."""
    for start in range(2):
        clock = [100.0 * start]
        recorder = TraceRecorder(tmp_path, wall_offset_s=0.0)
        meter = _meter(clock, on_finished=recorder.request)
        for _ in range(3):
            rid = meter.request_started("chat", "m", 10.0)
            _samples(meter, clock, clock[0] + 1.0)
            meter.request_finished(rid, "ok", 10, 5)
        meter.flush()
        recorder.close()
    rows = read_requests(tmp_path / "requests.csv")  # rejects an id seen twice
    assert len({r.id for r in rows}) == 6


def test_recording_keeps_cached_tokens_and_attribute_weighs_them_so(tmp_path: Path) -> None:
    """A reply 200 of whose 300 prompt tokens came from the prefix cache, beside one with
    none cached: the recording keeps the count (an extra column), and `attribute` over it
    gives each what the live ledger gave it."""
    from sidecar.attribute import attribute
    from sidecar.trace import read_power

    clock = [0.0]
    recorder = TraceRecorder(tmp_path, wall_offset_s=0.0)
    finished: list[FinishedRequest] = []

    def keep(f: FinishedRequest) -> None:
        finished.append(f)
        recorder.request(f)

    def samples(until_s: float) -> None:  # _samples, each also recorded
        while clock[0] < until_s - 1e-9:
            clock[0] = round(clock[0] + 0.1, 6)
            meter.on_samples([PowerSample(clock[0], "0", 150.0)])
            recorder.power(clock[0], "0", 150.0, None)

    meter = _meter(clock, on_finished=keep)
    samples(0.5)
    cold = meter.request_started("chat", "m", 280.0)
    warm = meter.request_started("chat", "m", 280.0)
    samples(2.5)
    meter.request_finished(cold, "ok", 300, 0)
    meter.request_finished(warm, "ok", 300, 0, cached_tokens=200)
    samples(4.0)
    meter.flush()
    recorder.close()
    live = {f.id: f.dynamic_j for f in finished}
    assert live[warm] == pytest.approx(live[cold] / 3)
    rows = {r.id: r for r in read_requests(tmp_path / "requests.csv")}
    assert (rows[warm].cached_tokens, rows[cold].cached_tokens) == (200, None)
    doc = attribute(read_power(tmp_path / "power.csv"), list(rows.values()), idle_watts=[50.0])
    offline = {r["id"]: r["dynamic_joules"] for r in doc["requests"]}
    assert offline[warm] == pytest.approx(live[warm], rel=1e-6)
    assert offline[cold] == pytest.approx(live[cold], rel=1e-6)


def test_a_recording_begun_without_the_cached_column_keeps_its_columns(tmp_path: Path) -> None:
    """Appending to a requests.csv an earlier version began: rows match its header."""
    (tmp_path / "requests.csv").write_text(
        "id,model,start_s,end_s,first_token_s,prompt_tokens,completion_tokens,status\n"
        "old-1,m,1.0,2.0,,10,5,ok\n"
    )
    clock = [10.0]
    recorder = TraceRecorder(tmp_path, wall_offset_s=0.0)
    meter = _meter(clock, on_finished=recorder.request)
    rid = meter.request_started("chat", "m", 10.0)
    _samples(meter, clock, 11.0)
    meter.request_finished(rid, "ok", 10, 5, cached_tokens=8)
    meter.flush()
    recorder.close()
    rows = read_requests(tmp_path / "requests.csv")  # more cells than columns would fail
    assert [r.id for r in rows] == ["old-1", rid]
    assert rows[1].cached_tokens is None


def test_silent_gpu_request_reaches_histogram_whole_and_energy_balances() -> None:
    """A GPU silent past the wait: the request still reaches the histogram, and its later
    readings never change it; histogram + standby + unattributed = measured."""
    clock = [0.0]
    meter = Meter(
        [GpuInfo("0", "GPU-0", "sim"), GpuInfo("1", "GPU-1", "sim")],
        clock=lambda: clock[0],
        idle_watts={"0": 50.0, "1": 50.0},
        intensity=FixedIntensity(400.0, "xx", "fixed"),
        sample_period_s=0.1,
    )

    def both(t: float, gpus: tuple[str, ...]) -> None:
        meter.on_samples([PowerSample(t, g, 100.0, 100.0 * t) for g in gpus])

    for i in range(11):
        both(i / 10, ("0", "1"))
    clock[0] = 1.0
    rid = meter.request_started("chat", "m", 10.0)
    for i in range(11, 600):  # GPU 1 falls silent at 1 s
        clock[0] = i / 10
        if i == 20:
            meter.request_finished(rid, "ok", 10, 5)
        both(clock[0], ("0",))
        meter.tick()
    hist = meter.request_j["m"]
    assert sum(hist.counts) == 1
    before = hist.total
    clock[0] = 60.0
    both(60.0, ("0", "1"))  # GPU 1 is back: its 59 s gap is booked from its counter
    meter.flush()
    assert hist.total == before
    ledger = meter.ledger
    accounted = hist.total + ledger.phase_j["idle_standby"] + ledger.unattributed_j
    assert accounted == pytest.approx(ledger.total_j, rel=1e-9)
    assert ledger.unattributed_j == pytest.approx(100.0)  # GPU 1 over the request's 1 s


async def test_a_backlog_of_held_intervals_is_worked_off_a_turn_at_a_time() -> None:
    """A reply not streamed holds the intervals it spans until it ends (its work is unknown
    until then); on the loop (:meth:`Meter.slice_work`) they then go an interval a turn,
    not all in the sample's call, and end as the meter without slices books them."""
    figures = []
    for sliced in (False, True):
        clock = [0.0]
        meter = _meter(clock)
        if sliced:
            meter.slice_work()
        _samples(meter, clock, 1.0)
        rid = meter.request_started("chat", "m", 10.0)
        _samples(meter, clock, 3.0)
        meter.request_finished(rid, "ok", 10, 50)
        before = meter.ledger.gpu_energy_j("0")
        _samples(meter, clock, 3.1)  # one sample frees the 2 s the reply held
        if sliced:
            assert meter.ledger.backlog
            assert meter.ledger.gpu_energy_j("0") - before < 20.0  # an interval, not 2 s
            for _ in range(40):
                await asyncio.sleep(0)
            assert not meter.ledger.backlog
        _samples(meter, clock, 4.0)
        meter.flush()
        figures.append(
            (meter.ledger.gpu_energy_j("0"), sum(h.total for h in meter.request_j.values()))
        )
    (gpu_a, req_a), (gpu_b, req_b) = figures
    assert gpu_b == pytest.approx(gpu_a, rel=1e-12)
    assert req_b == pytest.approx(req_a, rel=1e-9)
    assert req_a > 0.0


async def test_a_pause_in_the_hand_over_assigns_the_unfinished_row() -> None:
    """With the app's rows (:meth:`Meter.slice_work`), samples that end mid-row wait for more;
    on the loop turn after the sampler's hand-over pauses, what is left goes, so the figures
    reach the last sample handed over (``/summary`` lagged up to 1.3 % in a recorded run)."""
    clock = [0.0]
    meter = _meter(clock, sample_period_s=0.01)
    meter.slice_work()  # rows of 0.1 s
    for k in range(1, 16):  # 0.14 s of intervals at 100 W: a row and a half
        meter.on_samples([PowerSample(round(k * 0.01, 6), "0", 100.0)])
    assert meter.ledger.gpu_energy_j("0") == pytest.approx(10.0)  # the first row only
    for _ in range(3):
        await asyncio.sleep(0)
    assert meter.ledger.gpu_energy_j("0") == pytest.approx(14.0)
