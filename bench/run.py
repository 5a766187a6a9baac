"""Every benchmark of the sidecar, side by side with its peers: ``python bench/run.py [--quick]``.

Prints a readable table, then, as its last line, one JSON object of figures
(keys and units in bench/README.md). Progress goes to stderr. ``--quick``
runs every benchmark briefly (under 3 minutes on 2 cores); the full run
measures longer and adds the BLOOM-like replay (``--bloom`` adds it to a
quick run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the repo root, on the path
    sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    accuracy,
    bloom,
    ledger_bench,
    otlp_bench,
    proxy_bench,
    scrape_bench,
    serving_accuracy,
)
from bench.common import machine, median, nginx_binary, python  # noqa: E402
from sidecar import logs  # noqa: E402


@dataclass(frozen=True, slots=True)
class Plan:
    mode: str
    proxy: proxy_bench.ProxyPlan
    sampler_s: float
    sampler_reps: int
    ledger_s: float
    accuracy_s: float
    bloom_hours: int | None
    bloom_sensitivity_hours: int


def plan_for(args: argparse.Namespace) -> Plan:
    if args.uvloop and not _has_uvloop():
        log("--uvloop: uvloop is not installed here (pip install uvloop); left out")
    if args.quick:
        uv = args.uvloop and _has_uvloop()
        proxy = proxy_bench.ProxyPlan(
            streams=1200,
            plain=1600,
            reps=2,
            concurrency=32,
            latency_rounds=2,
            latency_concurrency=100,
            latency_delay_s=0.03,
            latency_per_worker=2,
            latency_burst_rounds=2,
            rss_requests=8_000,
            rss_warmup=5_000,
            uvloop=uv,
            bare=True,
            relay=_has_httptools(),
        )
        bloom_hours = args.bloom_hours if args.bloom else None
        return Plan("quick", proxy, 8.0, 1, 10.0, 180.0, bloom_hours, 2)
    uv = _has_uvloop() and not args.no_uvloop
    proxy = proxy_bench.ProxyPlan(
        streams=5000,
        plain=5000,
        reps=3,
        concurrency=32,
        latency_rounds=8,
        latency_concurrency=100,
        latency_delay_s=0.03,
        latency_per_worker=4,
        latency_burst_rounds=8,
        rss_requests=100_000,
        rss_warmup=20_000,
        uvloop=uv,
        bare=True,
        relay=_has_httptools(),
        ceiling_steps=(100, 200, 300, 400, 550, 700, 900),
    )
    return Plan("full", proxy, 15.0, 3, 60.0, 900.0, args.bloom_hours, 2)


def _has_httptools() -> bool:
    try:
        import httptools  # noqa: F401  (the relay candidate's parser, a bench extra)
    except ImportError:
        return False
    return True


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401  (an experiment only, not a dependency)
    except ImportError:
        return False
    return True


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def sampler_figures(plan: Plan) -> dict[str, float]:
    """Sampler alone, and sampler feeding a ledger, over 8 fake GPUs at 10 Hz (own processes)."""
    out: dict[str, list[float]] = {"alone": [], "ledger": []}
    kinds = ("alone",) if plan.mode == "quick" else ("alone", "ledger")
    for _ in range(plan.sampler_reps):
        for kind in kinds:
            cmd = [python(), "-m", "bench.sampler_bench", "8", "10", str(plan.sampler_s)]
            if kind == "ledger":
                cmd.append("ledger")
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            out[kind].append(float(json.loads(done.stdout.splitlines()[-1])["cpu_percent"]))
    fig = {"sampler_cpu_percent_8gpu_10hz": median(out["alone"])}
    if out["ledger"]:
        fig["sampler_ledger_cpu_percent_8gpu_10hz"] = median(out["ledger"])
    return fig


def collect(plan: Plan) -> dict[str, Any]:
    fig: dict[str, Any] = {}
    t_start = time.monotonic()

    if nginx_binary() is None:
        log("nginx is not installed: the proxy figures are left out (apt-get install nginx)")
    else:
        log("proxy benchmarks: stand-in upstream, nginx, the sidecar process, load generator")
        p = proxy_bench.run(plan.proxy, log)
        s, q, lat, rss = p["stream"], p["plain"], p["latency"], p["rss"]
        fig["proxy_cpu_us_per_stream"] = s["proxy"]["cpu_us_per_request"]
        fig["nginx_cpu_us_per_stream"] = s["nginx"]["cpu_us_per_request"]
        fig["proxy_cpu_ratio_stream"] = _ratio(
            fig["proxy_cpu_us_per_stream"], fig["nginx_cpu_us_per_stream"]
        )
        fig["proxy_cpu_us_per_request"] = q["proxy"]["cpu_us_per_request"]
        fig["nginx_cpu_us_per_request"] = q["nginx"]["cpu_us_per_request"]
        fig["proxy_cpu_ratio_request"] = _ratio(
            fig["proxy_cpu_us_per_request"], fig["nginx_cpu_us_per_request"]
        )
        fig["proxy_added_p50_ms"] = lat["proxy"]["added_p50_ms"]
        fig["nginx_added_p50_ms"] = lat["nginx"]["added_p50_ms"]
        fig["proxy_added_p50_ms_burst"] = lat["proxy"]["burst_added_p50_ms"]
        fig["nginx_added_p50_ms_burst"] = lat["nginx"]["burst_added_p50_ms"]
        fig["direct_p50_ms"] = lat["direct"]["p50_ms"]
        fig["direct_p50_ms_burst"] = lat["direct"]["burst_p50_ms"]
        for name in ("bare_aiohttp", "bare_aiohttp_uvloop", "proxy_uvloop", "bare_httptools"):
            if name in s:
                fig[f"{name}_cpu_us_per_stream"] = s[name]["cpu_us_per_request"]
                fig[f"{name}_cpu_us_per_request"] = q[name]["cpu_us_per_request"]
                fig[f"{name}_added_p50_ms"] = lat[name]["added_p50_ms"]
                fig[f"{name}_added_p50_ms_burst"] = lat[name]["burst_added_p50_ms"]
        fig["proxy_streams_per_s"] = s["proxy"]["requests_per_s"]
        fig["nginx_streams_per_s"] = s["nginx"]["requests_per_s"]
        fig["sidecar_idle_cpu_percent"] = p["sidecar_idle_cpu_percent"]
        fig["memory_data_plane"] = p.get("memory_data_plane", "aiohttp")  # idle CPU and RSS
        fig["rss_growth_mb_per_100k_requests"] = rss["growth_mb_per_100k"]
        fig["rss_slope_mb_per_100k_requests"] = rss["slope_mb_per_100k"]
        fig["rss_requests"] = int(rss["requests"])
        fig["rss_after_mb"] = rss["rss_after_mb"]
        if "relay" in s:  # the sidecar on --data-plane relay, beside aiohttp's ("proxy")
            fig["relay_cpu_us_per_stream"] = s["relay"]["cpu_us_per_request"]
            fig["relay_cpu_us_per_request"] = q["relay"]["cpu_us_per_request"]
            fig["relay_cpu_ratio_stream"] = _ratio(
                fig["relay_cpu_us_per_stream"], fig["nginx_cpu_us_per_stream"]
            )
            fig["relay_cpu_ratio_request"] = _ratio(
                fig["relay_cpu_us_per_request"], fig["nginx_cpu_us_per_request"]
            )
            fig["relay_added_p50_ms"] = lat["relay"]["added_p50_ms"]
            fig["relay_added_p50_ms_burst"] = lat["relay"]["burst_added_p50_ms"]
            fig["relay_streams_per_s"] = s["relay"]["requests_per_s"]
        if p.get("relay_ceiling"):
            fig["relay_max_chunks_per_s_one_core"] = p["relay_ceiling"]["max_chunks_per_s"]
            fig["relay_max_chunks_bounded"] = bool(p["relay_ceiling"]["bounded"])
        c, fl = p["ceiling"], p["inflight_rss"]
        fig["proxy_max_chunks_per_s_one_core"] = c["max_chunks_per_s"]
        fig["proxy_max_chunks_bounded"] = bool(c["bounded"])
        fig["proxy_ceiling_steps"] = {k: v for k, v in c.items() if "_at_" in k}
        fig["rss_mb_1000_streams_in_flight"] = fl["rss_peak_mb"]
        fig["rss_mb_before_1000_streams"] = fl["rss_before_mb"]

    log(f"sampler, 8 fake GPUs at 10 Hz, {plan.sampler_reps} x {plan.sampler_s:g} s")
    fig.update(sampler_figures(plan))

    log(f"ledger, 100 requests in flight, {plan.ledger_s:g} simulated s")
    lr = ledger_bench.run(plan.ledger_s)
    fig["ledger_samples_per_second"] = lr.samples_per_s
    fig["ledger_token_events_per_second"] = lr.events_per_s
    fig["ledger_realtime_factor"] = lr.realtime_factor
    log("ledger, 8 GPUs at 100 Hz, 256 streams in flight at 30 tokens/s")
    busy_s = min(plan.ledger_s, 3.0)
    busy = ledger_bench.run(busy_s, hz=100.0, in_flight=256, tokens_per_s=30.0)
    fig["ledger_realtime_factor_8gpu_100hz_256"] = busy.realtime_factor
    fig["ledger_longest_call_ms_8gpu_100hz_256"] = busy.longest_call_ms
    fig["ledger_p99_call_ms_8gpu_100hz_256"] = busy.p99_call_ms
    aligned = ledger_bench.run(busy_s, hz=100.0, in_flight=256, tokens_per_s=30.0, stagger_s=0.0)
    fig["ledger_realtime_factor_8gpu_100hz_256_aligned"] = aligned.realtime_factor

    log(f"attribution accuracy, batched workload of {plan.accuracy_s:g} s")
    acc = accuracy.run(plan.accuracy_s)
    fig["attribution_median_error_percent"] = acc.live_error_percent
    fig["naive_equal_split_error_percent"] = acc.equal_split_error_percent
    fig["naive_token_share_error_percent"] = acc.token_share_error_percent
    fig["naive_output_token_share_error_percent"] = acc.output_token_share_error_percent
    fig["attribution_p90_error_percent"] = acc.live_error_p90_percent
    fig["attribution_dynamic_total_ratio"] = acc.live_total_ratio
    fig["attribution_known_idle_error_percent"] = acc.live_known_idle_error_percent
    fig["attribution_trace_error_percent"] = acc.trace_error_percent
    fig["attribution_proposed_error_percent"] = acc.proposed_error_percent
    fig["attribution_fitted_prompt_weight"] = acc.fitted_prompt_weight
    fig["attribution_requests"] = acc.requests
    fig["attribution_batch_p10_median_p90"] = [
        acc.concurrency_p10,
        acc.concurrency_median,
        acc.concurrency_p90,
    ]
    fig["attribution_conservation_error"] = acc.live_conservation_error
    log(f"serving accuracy: continuous batching on the Azure LLM trace 2023, {plan.accuracy_s:g} s")
    fig.update(serving_accuracy.all_figures(plan.accuracy_s))
    log("traces mode: delay from a request's end to its final figure (long generations)")
    fig.update(otlp_bench.final_delay())

    log("one /metrics scrape with 1,000 requests in flight")
    sc = scrape_bench.run()
    fig["scrape_ms_1000_inflight"] = sc["scrape_ms_median"]
    fig["scrape_ms_1000_inflight_max"] = sc["scrape_ms_max"]

    if plan.bloom_hours:
        log(f"BLOOM-like replay: {plan.bloom_hours} h, 16 GPUs at 1 Hz, through attribute")
        b = bloom.run(plan.bloom_hours)
        bd = b.as_dict()
        fig["bloom_wh_per_request_all_in"] = b.wh_per_request_all_in
        fig["bloom_wh_per_request_seed"] = bloom.SEED_WH_PER_REQUEST
        fig["bloom_idle_share"] = b.idle_share
        fig["bloom_idle_share_truth"] = b.idle_share_truth
        log(f"BLOOM-like slice at 1 Hz and 10 Hz ({plan.bloom_sensitivity_hours} h, flat rate)")
        bd["sampling"] = bloom.sampling_sensitivity(plan.bloom_sensitivity_hours)
        fig["bloom"] = bd
    fig["bench_seconds"] = round(time.monotonic() - t_start, 1)
    return fig


SERVING_VIEWS = ("proxy", "proxy_held", "traces", "traces_live")
"""The serving bench's views with goals and table rows (``serving_<trace>_<view>_...``)."""
FAST_HZ_KEY = f"{serving_accuracy.FAST_HZ:g}hz"
"""The chat trace's what-if sampling rate in its keys (``serving_chat_<view>_50hz_...``)."""


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


GoalCheck = Callable[[dict[str, Any]], bool | None]


def _get(fig: dict[str, Any], key: str) -> float | None:
    v = fig.get(key)
    return float(v) if isinstance(v, int | float) else None


def goals(fig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal of issue 7 against its figure: met, missed, or not measured (None)."""

    def le(key: str, bound: float) -> bool | None:
        v = _get(fig, key)
        return None if v is None else v <= bound

    added = _get(fig, "proxy_added_p50_ms")
    nginx_added = _get(fig, "nginx_added_p50_ms")
    relay_added = _get(fig, "relay_added_p50_ms")
    acc = _get(fig, "attribution_median_error_percent")
    eq = _get(fig, "naive_equal_split_error_percent")
    tok = _get(fig, "naive_token_share_error_percent")
    rows: list[tuple[str, str, bool | None]] = [
        ("proxy_cpu_ratio_stream", "<= 2 (x nginx)", le("proxy_cpu_ratio_stream", 2.0)),
        ("proxy_cpu_ratio_request", "<= 3 (x nginx)", le("proxy_cpu_ratio_request", 3.0)),
        (
            "proxy_added_p50_ms",
            "<= nginx_added_p50_ms + 2",
            None if added is None or nginx_added is None else added <= nginx_added + 2.0,
        ),
        ("proxy_added_p50_ms_burst", "<= 10", le("proxy_added_p50_ms_burst", 10.0)),
        ("relay_cpu_ratio_stream", "<= 2 (x nginx)", le("relay_cpu_ratio_stream", 2.0)),
        ("relay_cpu_ratio_request", "<= 3 (x nginx)", le("relay_cpu_ratio_request", 3.0)),
        (
            "relay_added_p50_ms",
            "<= nginx_added_p50_ms + 2",
            None
            if relay_added is None or nginx_added is None
            else relay_added <= nginx_added + 2.0,
        ),
        ("relay_added_p50_ms_burst", "<= 10", le("relay_added_p50_ms_burst", 10.0)),
        ("sampler_cpu_percent_8gpu_10hz", "<= 1", le("sampler_cpu_percent_8gpu_10hz", 1.0)),
        ("rss_growth_mb_per_100k_requests", "<= 5", le("rss_growth_mb_per_100k_requests", 5.0)),
        (
            "attribution_median_error_percent",
            "<= 5 and below both naive rules",
            None
            if acc is None or eq is None or tok is None
            else acc <= 5.0 and acc < eq and acc < tok,
        ),
        ("scrape_ms_1000_inflight", "<= 50", le("scrape_ms_1000_inflight", 50.0)),
    ]
    serving = [
        (
            f"serving_{trace}_{mode}",
            f"serving_{trace}_{'proxy' if mode.startswith('proxy') else 'traces'}",
        )
        for trace, mode in itertools.product(("chat", "code"), SERVING_VIEWS)
    ]
    serving += [  # the chat trace sampled at 50 Hz, against the naive rules at 50 Hz
        (f"{k}_{FAST_HZ_KEY}", f"{view}_{FAST_HZ_KEY}") for k, view in serving[: len(SERVING_VIEWS)]
    ]
    for k, view in serving:
        med = _get(fig, f"{k}_ledger_median_error_percent")
        p90 = _get(fig, f"{k}_ledger_p90_error_percent")
        naive = [_get(fig, f"{view}_{rule}_median_error_percent") for rule in ("equal", "token")]
        met = None
        if med is not None and p90 is not None and None not in naive:
            met = med <= 3.0 and p90 <= 10.0 and all(med < n for n in naive if n is not None)
        rows.append((f"{k}_ledger_median_error_percent", "<= 3, p90 <= 10, below both naive", met))
    return {key: {"goal": goal, "met": met} for key, goal, met in rows}


TABLE: list[tuple[str, str, str]] = [
    # (key, unit, label)
    ("proxy_cpu_us_per_stream", "µs", "sidecar CPU per 20-token stream"),
    ("nginx_cpu_us_per_stream", "µs", "nginx CPU per 20-token stream"),
    ("bare_aiohttp_cpu_us_per_stream", "µs", "bare aiohttp proxy (no metering), per stream"),
    ("proxy_uvloop_cpu_us_per_stream", "µs", "sidecar on uvloop, per stream"),
    ("bare_httptools_cpu_us_per_stream", "µs", "bare httptools relay (no metering), per stream"),
    ("proxy_cpu_ratio_stream", "x", "sidecar / nginx, streams"),
    ("relay_cpu_us_per_stream", "µs", "sidecar on the relay data plane, per stream"),
    ("relay_cpu_ratio_stream", "x", "relay sidecar / nginx, streams"),
    ("proxy_cpu_us_per_request", "µs", "sidecar CPU per plain request"),
    ("nginx_cpu_us_per_request", "µs", "nginx CPU per plain request"),
    ("bare_aiohttp_cpu_us_per_request", "µs", "bare aiohttp proxy, per plain request"),
    ("proxy_uvloop_cpu_us_per_request", "µs", "sidecar on uvloop, per plain request"),
    ("bare_httptools_cpu_us_per_request", "µs", "bare httptools relay, per plain request"),
    ("proxy_cpu_ratio_request", "x", "sidecar / nginx, plain requests"),
    ("relay_cpu_us_per_request", "µs", "sidecar on the relay data plane, per plain request"),
    ("relay_cpu_ratio_request", "x", "relay sidecar / nginx, plain requests"),
    ("direct_p50_ms", "ms", "median stream, direct (100 in flight, steady)"),
    ("proxy_added_p50_ms", "ms", "added by the sidecar"),
    ("nginx_added_p50_ms", "ms", "added by nginx"),
    ("bare_aiohttp_added_p50_ms", "ms", "added by the bare aiohttp proxy"),
    ("proxy_uvloop_added_p50_ms", "ms", "added by the sidecar on uvloop"),
    ("bare_httptools_added_p50_ms", "ms", "added by the bare httptools relay"),
    ("relay_added_p50_ms", "ms", "added by the relay sidecar"),
    ("direct_p50_ms_burst", "ms", "median stream, direct (100 sent at once)"),
    ("proxy_added_p50_ms_burst", "ms", "added by the sidecar, burst"),
    ("nginx_added_p50_ms_burst", "ms", "added by nginx, burst"),
    ("bare_aiohttp_added_p50_ms_burst", "ms", "added by the bare aiohttp proxy, burst"),
    ("proxy_uvloop_added_p50_ms_burst", "ms", "added by the sidecar on uvloop, burst"),
    ("bare_httptools_added_p50_ms_burst", "ms", "added by the bare httptools relay, burst"),
    ("relay_added_p50_ms_burst", "ms", "added by the relay sidecar, burst"),
    ("proxy_max_chunks_per_s_one_core", "1/s", "sidecar chunk ceiling (added p50 <= 5 ms)"),
    ("relay_max_chunks_per_s_one_core", "1/s", "relay sidecar chunk ceiling (added p50 <= 5 ms)"),
    ("rss_mb_1000_streams_in_flight", "MB", "sidecar RSS, 1,000 streams in flight"),
    ("rss_mb_before_1000_streams", "MB", "  the same just before"),
    ("sidecar_idle_cpu_percent", "% core", "sidecar idle (1 simulated GPU, 10 Hz)"),
    ("sampler_cpu_percent_8gpu_10hz", "% core", "sampler alone, 8 GPUs at 10 Hz"),
    ("sampler_ledger_cpu_percent_8gpu_10hz", "% core", "sampler + ledger, 8 GPUs at 10 Hz"),
    ("rss_growth_mb_per_100k_requests", "MB", "RSS growth per 100k requests"),
    ("ledger_samples_per_second", "1/s", "ledger samples/s, 100 streams in flight"),
    ("ledger_realtime_factor", "x", "ledger: simulated s per CPU s (8 GPUs)"),
    ("ledger_realtime_factor_8gpu_100hz_256", "x", "  8 GPUs, 100 Hz, 256 in flight"),
    ("ledger_realtime_factor_8gpu_100hz_256_aligned", "x", "  same, GPUs read at one instant"),
    ("ledger_longest_call_ms_8gpu_100hz_256", "ms", "  longest call on the loop (a stall)"),
    ("ledger_p99_call_ms_8gpu_100hz_256", "ms", "  same, 99th percentile of calls"),
    ("attribution_median_error_percent", "%", "attribution error, sidecar as it runs"),
    ("attribution_known_idle_error_percent", "%", "  same, baseline known (--idle-watts)"),
    ("attribution_trace_error_percent", "%", "  same trace through `attribute`"),
    ("attribution_proposed_error_percent", "%", "  what-if: known baseline + prefill weight"),
    ("naive_equal_split_error_percent", "%", "naive: equal split per interval"),
    ("naive_token_share_error_percent", "%", "naive: whole-window share of all tokens"),
    ("naive_output_token_share_error_percent", "%", "naive: share of output tokens"),
    *(
        row
        for t, m in itertools.product(("chat", "code"), SERVING_VIEWS)
        for row in (
            (f"serving_{t}_{m}_ledger_median_error_percent", "%", f"serving {t}, {m}: sidecar"),
            (f"serving_{t}_{m}_ledger_p90_error_percent", "%", "  p90"),
            (f"serving_{t}_{m}_ledger_prefill_median_error_percent", "%", "  prefill stage"),
            (f"serving_{t}_{m}_ledger_decode_median_error_percent", "%", "  decode stage"),
            (f"serving_{t}_{m}_equal_median_error_percent", "%", "  naive equal split"),
            (f"serving_{t}_{m}_token_median_error_percent", "%", "  naive token share"),
        )
    ),
    *(
        row
        for m in SERVING_VIEWS
        for row in (
            (
                f"serving_chat_{m}_{FAST_HZ_KEY}_ledger_median_error_percent",
                "%",
                f"serving chat, {m}, {serving_accuracy.FAST_HZ:g} Hz",
            ),
            (f"serving_chat_{m}_{FAST_HZ_KEY}_ledger_p90_error_percent", "%", "  p90"),
        )
    ),
    ("scrape_ms_1000_inflight", "ms", "/metrics scrape, 1,000 in flight"),
    ("bloom_wh_per_request_all_in", "Wh", "BLOOM-like: GPU energy per request, all-in"),
    ("bloom_wh_per_request_seed", "Wh", "  the seed's (688 kWh / 230,768)"),
    ("bloom_idle_share", "", "BLOOM-like: idle share (attribute)"),
    ("bloom_idle_share_truth", "", "  the trace's true idle share"),
]


def table(fig: dict[str, Any], checks: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'figure':<46} {'value':>12} {'unit':<7} goal", "-" * 90]
    for key, unit, label in TABLE:
        v = fig.get(key)
        if v is None:
            continue
        value = f"{v:,.3f}" if isinstance(v, float) and abs(v) < 10 else f"{v:,.1f}"
        check = checks.get(key)
        goal = ""
        if check is not None:
            met = check["met"]
            goal = f"{check['goal']}: {'met' if met else 'MISSED' if met is not None else 'n/a'}"
        lines.append(f"{label:<46} {value:>12} {unit:<7} {goal}")
    m = fig["machine"]
    lines.append("-" * 90)
    lines.append(
        f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m['memory_gb']} GB, "
        f"Python {m['python']}, nginx {m['nginx']}, aiohttp {m['aiohttp']}; mode {fig['mode']}"
    )
    if "load_avg_1m_start" in fig:
        lines.append(
            f"load average (1 min): {fig['load_avg_1m_start']:.2f} at the start, "
            f"{fig.get('load_avg_1m_end', float('nan')):.2f} at the end"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark, briefly (< 3 min)")
    parser.add_argument("--bloom", action="store_true", help="add the BLOOM-like replay to --quick")
    parser.add_argument("--bloom-hours", type=int, default=24, help="hours of BLOOM-like trace")
    parser.add_argument(
        "--uvloop", action="store_true", help="add the uvloop experiment to --quick"
    )
    parser.add_argument(
        "--no-uvloop", action="store_true", help="leave the uvloop experiment out of a full run"
    )
    parser.add_argument("--out", type=Path, help="also write the table and the JSON here (DIR)")
    args = parser.parse_args(argv)
    logs.configure("warning", json=True)  # the in-process sidecar logs to stderr, quietly
    plan = plan_for(args)
    fig: dict[str, Any] = {"mode": plan.mode, "machine": machine()}
    fig["load_avg_1m_start"] = os.getloadavg()[0]  # a shared machine: read figures beside it
    fig.update(collect(plan))
    fig["load_avg_1m_end"] = os.getloadavg()[0]
    checks = goals(fig)
    fig["goals"] = checks
    text = table(fig, checks)
    line = json.dumps(fig, sort_keys=False)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (args.out / f"{plan.mode}-{stamp}.txt").write_text(text + "\n", encoding="utf-8")
        (args.out / f"{plan.mode}-{stamp}.json").write_text(
            json.dumps(fig, indent=1) + "\n", encoding="utf-8"
        )
    sys.stdout.write(text + "\n")
    sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
