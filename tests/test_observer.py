"""Observer mode: recognising model servers by their metrics and turning scrapes into deltas."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import aiohttp
import pytest
import structlog
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpServer

from sidecar.tracking.observer import (
    Observation,
    ObservationDelta,
    Observer,
    compute_delta,
    detect_server,
    parse_exposition,
)


def vllm_page(prompt: float = 1200.0, generation: float = 3400.0, running: float = 2.0) -> str:
    """vLLM V1's exposition (prometheus_client): two engines, two finish reasons, histograms."""
    return f"""\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} {running}
vllm:num_requests_running{{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 5.0
vllm:num_requests_waiting{{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 0.42
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} {prompt}
vllm:prompt_tokens_total{{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 100.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 1.7171717e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} {generation}
vllm:generation_tokens_total{{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 600.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 10.0
vllm:request_success_total{{engine="0",finished_reason="length",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 3.0
vllm:request_success_total{{engine="0",finished_reason="abort",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 1.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 0.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 14.0
vllm:time_to_first_token_seconds_count{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 14.0
vllm:time_to_first_token_seconds_sum{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 2.5
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{engine="0",le="1.0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 3.0
vllm:iteration_tokens_total_bucket{{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 90.0
vllm:iteration_tokens_total_count{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 90.0
vllm:iteration_tokens_total_sum{{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"}} 4600.0
"""


SGLANG_PAGE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="Qwen/Qwen2.5-7B",pp_rank="0",tp_rank="0"} 3.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="Qwen/Qwen2.5-7B",pp_rank="0",tp_rank="0"} 0.0
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{engine_type="unified",model_name="Qwen/Qwen2.5-7B",pp_rank="0",tp_rank="0"} 85.3
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{engine_type="unified",model_name="Qwen/Qwen2.5-7B",pp_rank="0",tp_rank="0"} 8128.0
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{engine_type="unified",model_name="Qwen/Qwen2.5-7B",pp_rank="0",tp_rank="0"} 7557.0
# HELP sglang:num_requests_total Number of requests processed.
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{engine_type="unified",model_name="Qwen/Qwen2.5-7B",pp_rank="0",tp_rank="0"} 83.0
"""

# TGI's Rust exporter (metrics-exporter-prometheus): TYPE lines, no HELP, counters without _total.
TGI_PAGE = """\
# TYPE tgi_request_count counter
tgi_request_count 12
# TYPE tgi_request_success counter
tgi_request_success 11
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 4
# TYPE tgi_queue_size gauge
tgi_queue_size 1
# TYPE tgi_request_input_length histogram
tgi_request_input_length_bucket{le="1"} 0
tgi_request_input_length_bucket{le="64"} 7
tgi_request_input_length_bucket{le="+Inf"} 11
tgi_request_input_length_sum 640
tgi_request_input_length_count 11
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_bucket{le="1"} 0
tgi_request_generated_tokens_bucket{le="+Inf"} 11
tgi_request_generated_tokens_sum 2200
tgi_request_generated_tokens_count 11
# TYPE tgi_batch_forward_duration histogram
tgi_batch_forward_duration_bucket{method="decode",le="+Inf"} 400
tgi_batch_forward_duration_sum{method="decode"} 8.5
tgi_batch_forward_duration_count{method="decode"} 400
"""

LLAMACPP_PAGE = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 321
# HELP llamacpp:prompt_seconds_total Prompt process time
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 1.5
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 654
# HELP llamacpp:tokens_predicted_seconds_total Predict process time
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 9.5
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 214
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.12
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""

# The same server answering in OpenMetrics: counter families are named without `_total`.
OPENMETRICS_PAGE = """\
# HELP llamacpp:tokens_predicted Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted counter
llamacpp:tokens_predicted_total 654.0
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1.0
# EOF
"""

PROCESS_ONLY_PAGE = """\
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 4.2
"""

VLLM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class TestDetect:
    """Servers recognised from their metric names."""

    @pytest.mark.parametrize(
        ("text", "kind"),
        [
            (vllm_page(), "vllm"),
            (SGLANG_PAGE, "sglang"),
            (TGI_PAGE, "tgi"),
            (LLAMACPP_PAGE, "llamacpp"),
            (PROCESS_ONLY_PAGE, "unknown"),
            ("", "unknown"),
        ],
    )
    def test_detects(self, text: str, kind: str) -> None:
        """Each server's key series identify it; a page without them is unknown."""
        assert detect_server(text_string_to_metric_families(text)) == kind

    def test_untyped_counters(self) -> None:
        """Counters exposed without TYPE lines (raw ``_total`` samples) are still recognised."""
        text = "llamacpp:tokens_predicted_total 5\nllamacpp:requests_processing 0\n"
        assert detect_server(text_string_to_metric_families(text)) == "llamacpp"
        obs = parse_exposition(text, time_s=0.0, default_model="m")
        assert obs.generation_tokens == {"m": 5.0}


class TestParse:
    """Observations read from realistic exposition pages."""

    def test_vllm_sums_engines_and_reasons(self) -> None:
        """vLLM series are summed over engines and finish reasons, per ``model_name``."""
        obs = parse_exposition(vllm_page(), time_s=7.0, default_model="default")
        assert obs == Observation(
            7.0,
            "vllm",
            running={VLLM_MODEL: 3.0},
            prompt_tokens={VLLM_MODEL: 1300.0},
            generation_tokens={VLLM_MODEL: 4000.0},
            requests={VLLM_MODEL: 14.0},
        )

    def test_vllm_two_models(self) -> None:
        """Two served models stay apart."""
        second = [
            line.replace(VLLM_MODEL, "other-model")
            for line in vllm_page(generation=1.0).splitlines()
            if line.startswith("vllm:")
        ]
        text = vllm_page() + "\n".join(second) + "\n"
        obs = parse_exposition(text, time_s=0.0, default_model="default")
        assert obs.generation_tokens == {VLLM_MODEL: 4000.0, "other-model": 601.0}

    def test_sglang(self) -> None:
        """SGLang's running gauge, token counters and request counter."""
        obs = parse_exposition(SGLANG_PAGE, time_s=1.0, default_model="default")
        assert obs == Observation(
            1.0,
            "sglang",
            running={"Qwen/Qwen2.5-7B": 3.0},
            prompt_tokens={"Qwen/Qwen2.5-7B": 8128.0},
            generation_tokens={"Qwen/Qwen2.5-7B": 7557.0},
            requests={"Qwen/Qwen2.5-7B": 83.0},
        )

    def test_tgi_histogram_sums(self) -> None:
        """TGI has no labels and no token counters: histogram sums under the default model."""
        obs = parse_exposition(TGI_PAGE, time_s=1.0, default_model="bigcode/starcoder")
        m = "bigcode/starcoder"
        assert obs == Observation(
            1.0,
            "tgi",
            running={m: 4.0},
            prompt_tokens={m: 640.0},
            generation_tokens={m: 2200.0},
            requests={m: 11.0},
        )

    def test_llamacpp(self) -> None:
        """llama.cpp: no labels and no request counter."""
        obs = parse_exposition(LLAMACPP_PAGE, time_s=1.0, default_model="gguf")
        assert obs == Observation(
            1.0,
            "llamacpp",
            running={"gguf": 1.0},
            prompt_tokens={"gguf": 321.0},
            generation_tokens={"gguf": 654.0},
            requests={},
        )

    def test_unknown_is_empty(self) -> None:
        """A page from no known server gives an empty observation."""
        assert parse_exposition(PROCESS_ONLY_PAGE, time_s=2.0, default_model="m") == Observation(
            2.0, "unknown"
        )

    def test_nan_skipped(self) -> None:
        """Non-finite values are left out rather than poisoning sums."""
        text = "llamacpp:requests_processing NaN\nllamacpp:tokens_predicted_total 3\n"
        obs = parse_exposition(text, time_s=0.0, default_model="m")
        assert (obs.running, obs.generation_tokens) == ({}, {"m": 3.0})

    @pytest.mark.parametrize(
        "text",
        [
            'vllm:num_requests_running{model_name="a" 1\n',
            "vllm:prompt_tokens_total notanumber\n",
            "tgi_batch_current_size abc\n",
        ],
    )
    def test_malformed_raises_value_error(self, text: str) -> None:
        """A malformed line in a series it reads raises ``ValueError`` (a failed scrape)."""
        with pytest.raises(ValueError, match=r".+"):
            parse_exposition(text, time_s=0.0, default_model="m")

    def test_junk_in_other_series_is_ignored(self) -> None:
        """Malformed lines in series the observer does not read cannot lose a scrape."""
        text = 'a b c d\nweird{x="1" 2\n' + LLAMACPP_PAGE
        obs = parse_exposition(text, time_s=0.0, default_model="m")
        assert obs.generation_tokens == {"m": 654.0}


def obs(
    t: float, prompt: dict[str, float], gen: dict[str, float], req: dict[str, float]
) -> Observation:
    return Observation(t, "vllm", {}, prompt, gen, req)


class TestDelta:
    """Counter increments between two scrapes."""

    def test_increments(self) -> None:
        """Increments are per model, with the interval's bounds."""
        d = compute_delta(
            obs(1.0, {"a": 10, "b": 5}, {"a": 100}, {"a": 1}),
            obs(2.5, {"a": 15, "b": 5}, {"a": 130}, {"a": 2}),
        )
        assert d == ObservationDelta(
            1.0, 2.5, {"a": 5.0, "b": 0.0}, {"a": 30.0}, {"a": 1.0}, reset=False
        )
        assert d.duration_s == 1.5

    def test_counter_reset(self) -> None:
        """A counter that went down means a restart: the increment is the new value."""
        d = compute_delta(
            obs(1.0, {"a": 1000}, {"a": 5000}, {"a": 50}),
            obs(2.0, {"a": 20}, {"a": 5100}, {"a": 1}),
        )
        assert d.reset
        assert (d.prompt_tokens, d.generation_tokens, d.requests) == (
            {"a": 20.0},
            {"a": 100.0},
            {"a": 1.0},
        )

    def test_new_model_counts_from_zero(self) -> None:
        """A series that appears between scrapes counts from zero; one that vanishes is dropped."""
        d = compute_delta(obs(1.0, {"a": 10}, {}, {}), obs(2.0, {"b": 7}, {}, {}))
        assert d.prompt_tokens == {"b": 7.0}
        assert not d.reset


@dataclass
class FakeServer:
    """A model server's ``/metrics`` whose page and status the test changes."""

    page: str = field(default_factory=vllm_page)
    status: int = 200
    delay_s: float = 0.0
    content_type: str = "text/plain"
    hits: int = 0

    def app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            self.hits += 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.status != 200:
                return web.Response(status=self.status, text="engine dead")
            return web.Response(text=self.page, content_type=self.content_type, charset="utf-8")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app


@dataclass
class Served:
    fake: FakeServer
    url: str


@pytest.fixture
async def served(aiohttp_server: AiohttpServer) -> Served:
    fake = FakeServer()
    server = await aiohttp_server(fake.app())
    return Served(fake, str(server.make_url("/metrics")))


class Recorder:
    """An ``on_observation`` consumer that keeps its calls and signals after ``wanted`` of them."""

    def __init__(self, wanted: int = 0) -> None:
        self.calls: list[tuple[Observation, ObservationDelta | None]] = []
        self.wanted = wanted
        self.enough = asyncio.Event()

    def __call__(self, observation: Observation, delta: ObservationDelta | None) -> None:
        self.calls.append((observation, delta))
        if len(self.calls) >= self.wanted:
            self.enough.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TestObserver:
    """Scraping a live server: detection, deltas, failures."""

    async def test_scrapes_and_reports_deltas(self, served: Served) -> None:
        """The first scrape has no delta; the next carries the counters' increments."""
        ticks = iter([10.0, 10.2, 11.0, 11.2])
        rec = Recorder()
        observer = Observer(
            served.url, default_model="d", clock=lambda: next(ticks), on_observation=rec
        )
        try:
            first = await observer.scrape_once()
            served.fake.page = vllm_page(prompt=1250.0, generation=3500.0, running=0.0)
            second = await observer.scrape_once()
        finally:
            await observer.close()
        assert first is not None
        assert second is not None
        assert observer.kind == "vllm"
        assert observer.last == second
        assert (first.time_s, second.time_s) == (10.1, 11.1)
        assert rec.calls[0] == (first, None)
        delta = rec.calls[1][1]
        assert delta is not None
        assert delta.generation_tokens == {VLLM_MODEL: 100.0}
        assert delta.prompt_tokens == {VLLM_MODEL: 50.0}
        assert second.running == {VLLM_MODEL: 1.0}
        assert observer.errors == 0

    async def test_restart_is_a_reset(self, served: Served) -> None:
        """After the server restarts its counters are lower: the delta is flagged reset."""
        rec = Recorder()
        async with aiohttp.ClientSession() as session:
            observer = Observer(served.url, default_model="d", session=session, on_observation=rec)
            await observer.scrape_once()
            served.fake.page = vllm_page(prompt=30.0, generation=40.0)
            await observer.scrape_once()
        delta = rec.calls[1][1]
        assert delta is not None
        assert delta.reset
        assert delta.generation_tokens == {VLLM_MODEL: 640.0}  # 40 + engine 1's 600

    async def test_failures_counted_and_logged(self, served: Served) -> None:
        """A bad status or an unparseable page is counted, logged once as a warning, never raised."""
        rec = Recorder()
        observer = Observer(served.url, default_model="d", on_observation=rec)
        served.fake.status = 500
        with structlog.testing.capture_logs() as logs:
            assert await observer.scrape_once() is None
            served.fake.status = 200
            served.fake.page = 'vllm:num_requests_running{model_name="x" 1\n'
            assert await observer.scrape_once() is None
            served.fake.page = vllm_page()
            assert await observer.scrape_once() is not None
        await observer.close()
        assert observer.errors == 2
        assert len(rec.calls) == 1
        failed = [e for e in logs if e["event"] == "observer.scrape_failed"]
        assert [e["log_level"] for e in failed] == ["warning", "debug"]
        assert failed[0]["url"] == served.url
        assert any(e["event"] == "observer.scrape_recovered" for e in logs)

    async def test_unreachable_counted(self) -> None:
        """A server that is not listening is a counted failure."""
        observer = Observer(f"http://127.0.0.1:{free_port()}/metrics", default_model="d")
        assert await observer.scrape_once() is None
        await observer.close()
        assert observer.errors == 1
        assert observer.last is None

    async def test_timeout_below_interval(self, served: Served) -> None:
        """A scrape slower than the timeout (below the interval) fails instead of piling up."""
        served.fake.delay_s = 0.5
        observer = Observer(served.url, default_model="d", interval_s=0.2)
        assert observer.timeout_s < observer.interval_s
        assert await observer.scrape_once() is None
        await observer.close()
        assert observer.errors == 1

    async def test_callback_fault_does_not_stop(self, served: Served) -> None:
        """A failing consumer is logged and counted; the observation is still kept."""

        def boom(observation: Observation, delta: ObservationDelta | None) -> None:
            raise RuntimeError("ledger bug")

        observer = Observer(served.url, default_model="d", on_observation=boom)
        with structlog.testing.capture_logs() as logs:
            assert await observer.scrape_once() is not None
        await observer.close()
        assert observer.callback_errors == 1
        assert observer.last is not None
        assert any(e["event"] == "observer.callback_failed" for e in logs)

    async def test_kind_change_has_no_delta(self, served: Served) -> None:
        """No delta is computed across a change of server kind, nor from an unknown page."""
        rec = Recorder()
        observer = Observer(served.url, default_model="d", on_observation=rec)
        for page in (vllm_page(), PROCESS_ONLY_PAGE, TGI_PAGE, TGI_PAGE):
            served.fake.page = page
            await observer.scrape_once()
        await observer.close()
        assert [d is None for _, d in rec.calls] == [True, True, True, False]
        assert observer.kind == "tgi"

    async def test_openmetrics_page(self, served: Served) -> None:
        """An OpenMetrics answer is parsed with the OpenMetrics parser."""
        served.fake.page = OPENMETRICS_PAGE
        served.fake.content_type = "application/openmetrics-text"
        observer = Observer(served.url, default_model="gguf")
        got = await observer.scrape_once()
        await observer.close()
        assert got is not None
        assert got.generation_tokens == {"gguf": 654.0}

    async def test_run_loops_until_cancelled(self, served: Served) -> None:
        """``run`` scrapes at the interval, survives failures, and closes its session."""
        rec = Recorder(wanted=3)
        observer = Observer(served.url, default_model="d", interval_s=0.05, on_observation=rec)
        served.fake.status = 503
        task = asyncio.create_task(observer.run())
        await asyncio.sleep(0.12)
        served.fake.status = 200
        await asyncio.wait_for(rec.enough.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert observer.errors >= 1
        assert rec.calls[1][1] is not None
        assert observer._own_session is None

    def test_rejects_bad_interval(self) -> None:
        """A non-positive interval is refused at construction."""
        with pytest.raises(ValueError, match="interval_s"):
            Observer("http://x/metrics", default_model="d", interval_s=0)
