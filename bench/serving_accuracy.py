"""Per-request and per-stage accuracy on a continuous-batching engine fed a real request trace.

:func:`sidecar.serving_sim.serve` runs a slice of the Azure LLM inference trace
2023 (``bench/data``) through a step-based engine whose per-request truth is
exact. Two views of the same run, as the sidecar gets them:

* ``proxy``: what the proxy sees: the request at its arrival (queue included)
  with a prompt estimated from the body (within ±25 %), the first streamed
  chunk, one chunk per token as it leaves the server, the end with the usage.
* ``traces``: what vLLM's ``llm_request`` span tells: scheduled, first token,
  end, exact prompt and completion tokens, but no token times, so decode is
  spread evenly from first token to end. Spans come after the request ends;
  the ledger holds intervals back (``hold_s``) so each span is placed in the
  intervals where it ran, as traces mode does, with the running count live
  (the observer on) for the baseline.
* ``traces_live``: the same spans through the path ``run --otlp-listen --observe``
  takes: held slots, each span placed when it arrives (up to 5 s after the end, as
  vLLM's batch exporter sends), the server's running count from a 1 s scrape.

Three rules on each view, all over the same reconciled power line and above
the same baseline for the naive ones: the ledger's, an equal split of each
piece (pieces cut at every start and end of that view), and a whole-run token
share (prompt + output). Stage figures compare each request's prefill and
decode energy (dynamic plus its equal share of the resident draw, CONTRACT.md
"Stages") with the truth's (true dynamic by stage plus the same contract share
of the true resident draw).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.accuracy import PROMPT_ESTIMATE_SPREAD, _pieces_dynamic
from bench.common import median, percentile
from sidecar.ledger import Ledger, estimate_idle_watts
from sidecar.power.base import PowerSample
from sidecar.reconcile import Reconciler, reconcile_all
from sidecar.serving_sim import EngineSpec, load_trace, serve
from sidecar.workload import SyntheticRequest, Workload

DATA = Path(__file__).resolve().parent / "data"
TRACES: dict[str, tuple[str, float, float]] = {
    "chat": ("azure_llm_2023_conv_20min.csv", 0.0, 1.0),
    "code": ("azure_llm_2023_code_20min.csv", 180.0, 0.5),
}
"""Name: (file, trace second to begin at, rate scale). Code's first minutes are nearly
silent; its bursts (9 requests/s of ~2,000-token prompts) are a whole service's traffic:
one simulated server at the full rate is past capacity (time to first token p90 12 s,
queues that grow for minutes), so it runs at half the rate (p90 3.3 s, still queueing)."""
Mode = Literal["proxy", "traces"]
MODES: tuple[Mode, ...] = ("proxy", "traces")
RULES = ("ledger", "equal", "token")
HOLD_S = 300.0
"""Traces mode's hold in the replay: longer than any request here plus the export delay."""
PROXY_HOLD_S = 30.0
"""``--proxy-hold`` in the ``proxy_held`` view: what the README suggests."""


@dataclass(frozen=True, slots=True)
class Errors:
    median: float
    p90: float

    @classmethod
    def of(cls, xs: Sequence[float]) -> Errors:
        return cls(median(xs), percentile(xs, 0.9)) if xs else cls(float("nan"), float("nan"))


@dataclass(frozen=True, slots=True)
class ModeResult:
    request: dict[str, Errors]
    """Rule -> per-request dynamic-energy error (%)."""
    prefill: dict[str, Errors]
    decode: dict[str, Errors]


@dataclass(frozen=True, slots=True)
class TraceResult:
    trace: str
    requests: int
    batch_p10_median_p90: tuple[float, float, float]
    modes: dict[str, ModeResult]
    conservation_error: float
    traces_unpaced: Errors
    """Traces view with output spread at a steady rate (the ledger's ``paced`` off)."""
    proxy_exact_prompt: Errors
    """Proxy view with the exact prompt count at the start (no ±25 % estimate) and with the
    first chunk (a server reporting usage in every chunk)."""


def _view(r: SyntheticRequest, mode: Mode) -> tuple[float, float, float]:
    start = r.start_s if mode == "proxy" else (r.scheduled_s or r.start_s)
    return start, r.first_token_s, r.end_s


def replay(
    wl: Workload,
    mode: Mode,
    *,
    seed: int = 3,
    paced: bool = True,
    prompt_spread: float = PROMPT_ESTIMATE_SPREAD,
    first_chunk_usage: bool = False,
    proxy_hold_s: float = 0.0,
    cache_aware: bool = True,
) -> tuple[dict[str, tuple[float, float, float]], float]:
    """Per request (dynamic J, attributed J, prefill J) as the running sidecar books them.
    ``prompt_spread``: how far the proxy's prompt estimate strays (0: the exact count at
    the start). ``first_chunk_usage``: the proxy also hands the ledger the exact prompt
    count with the first token (a server that reports usage in every chunk, vLLM's
    ``continuous_usage_stats``). ``proxy_hold_s``: the ledger's hold in the proxy view
    (``run --proxy-hold``). ``cache_aware``: the usage's count of prompt tokens read from
    the prefix cache reaches the ledger (else it weighs every prompt token as computed)."""
    rnd = random.Random(seed)
    gpus = sorted({g for _, g, _, _ in wl.samples})
    ledger = Ledger(
        gpus,
        hold_s=HOLD_S if mode == "traces" else proxy_hold_s,
        prompts_at_end=mode == "proxy" and proxy_hold_s > 0.0,  # as Meter(proxy_hold_s=...)
    )
    ledger._books.paced = mode == "traces" and paced  # vLLM's spans: a continuous batcher
    ledger.upstream_ready(wl.samples[0][0])
    events: list[tuple[float, int, int, str, float]] = []
    seq = itertools.count()
    for r in wl.requests:
        start, first, end = _view(r, mode)
        if mode == "proxy":
            spread = rnd.uniform(1 - prompt_spread, 1 + prompt_spread)
            evs = [(start, 0, max(1.0, round(r.prompt_tokens * spread))), (first, 1, 0.0)]
            evs += [(t, 2, 1.0) for t in [first, *r.token_times(0.0)]]
        else:
            evs = [(start, 0, float(r.prompt_tokens)), (first, 1, 0.0)]
        evs.append((end, 3, 0.0))
        events.extend((t, kind, next(seq), r.id, arg) for t, kind, arg in evs)
    events.sort()
    by_id = {r.id: r for r in wl.requests}
    recs = {g: Reconciler() for g in gpus}
    out: dict[str, tuple[float, float, float]] = {}
    measured = 0.0
    last_e: dict[str, float] = {}
    i = 0
    next_tick = wl.samples[0][0]

    def apply(ev: tuple[float, int, int, str, float]) -> None:
        t, kind, _, rid, arg = ev
        r = by_id[rid]
        if kind == 0:
            ledger.start(rid, t, model="sim", prompt_tokens=arg)
        elif kind == 1:
            counted = r.prompt_tokens if first_chunk_usage and mode == "proxy" else None
            ledger.first_token(rid, t, prompt_tokens=counted)
        elif kind == 2:
            ledger.tokens(rid, t, int(arg))
        else:
            ledger.finish(
                rid, t, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                cached_tokens=r.cached_tokens if cache_aware else None,
            )  # fmt: skip

    def collect() -> None:
        for f in ledger.pop_finished():
            out[f.id] = (f.dynamic_j, f.energy_j, f.prefill_j)

    for t, g, p, e in wl.samples:
        while i < len(events) and events[i][0] <= t:
            apply(events[i])
            i += 1
        for s in recs[g].push(PowerSample(t, g, p, e)):
            ledger.sample(s.gpu, s.time_s, s.power_w)
        if g in last_e:
            measured += e - last_e[g]
        last_e[g] = e
        if t >= next_tick:
            ledger.advance(t)
            next_tick = t + 0.5
        collect()
    for ev in events[i:]:
        apply(ev)
    for rec in recs.values():
        for s in rec.flush():
            ledger.sample(s.gpu, s.time_s, s.power_w)
    ledger.flush()
    collect()
    return out, abs(ledger.total_j - measured) / measured if measured else 0.0


EXPORT_DELAY_S = 5.0
"""vLLM's batch span exporter sends within this long of a request's end (uniform here)."""
SCRAPE_S = 1.0
"""The observer's scrape period: the server's running count, as traces mode reads it."""
LATE_HOLD_S = 900.0


def replay_live_traces(
    wl: Workload, *, seed: int = 5, cache_aware: bool = True
) -> tuple[dict[str, tuple[float, float, float]], float]:
    """Traces mode exactly as ``run --otlp-listen --observe`` books it: held slots, each
    span placed when it arrives (``EXPORT_DELAY_S`` after the end at most), the server's
    running count from a scrape every ``SCRAPE_S``, paced decode."""
    rnd = random.Random(seed)
    gpus = sorted({g for _, g, _, _ in wl.samples})
    ledger = Ledger(
        gpus, late_hold_s=LATE_HOLD_S, counted=True, live_phases=True, paced_decode=True
    )
    ledger.upstream_ready(wl.samples[0][0])
    spans = sorted((r.end_s + rnd.uniform(0.0, EXPORT_DELAY_S), r.id) for r in wl.requests)
    by_id = {r.id: r for r in wl.requests}
    runs = [(_view(r, "traces")[0], r.end_s) for r in wl.requests]
    recs = {g: Reconciler() for g in gpus}
    out: dict[str, tuple[float, float, float]] = {}
    measured = 0.0
    last_e: dict[str, float] = {}
    i = 0
    next_tick = next_scrape = wl.samples[0][0]
    last_scrape: tuple[float, int] | None = None

    def collect() -> None:
        for f in ledger.pop_finished():
            out[f.id] = (f.dynamic_j, f.energy_j, f.prefill_j)

    for t, g, p, e in wl.samples:
        while i < len(spans) and spans[i][0] <= t:
            r = by_id[spans[i][1]]
            start, first, end = _view(r, "traces")
            ledger.place(
                r.id, model="sim", start_s=start, first_token_s=first, end_s=end,
                prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                cached_tokens=r.cached_tokens if cache_aware else None,
            )  # fmt: skip
            i += 1
        for smp in recs[g].push(PowerSample(t, g, p, e)):
            ledger.sample(smp.gpu, smp.time_s, smp.power_w)
        if g in last_e:
            measured += e - last_e[g]
        last_e[g] = e
        if t >= next_scrape:
            now_running = sum(1 for a, b in runs if a <= t < b)
            if last_scrape is not None:
                t0, before = last_scrape
                ended = sum(1 for _, b in runs if t0 < b <= t)
                through = max(0, before - ended) if now_running > 0 else 0
                ledger.running(t0, t, now_running + ended, through)
            last_scrape = (t, now_running)
            next_scrape = t + SCRAPE_S
        if t >= next_tick:
            ledger.advance(t)
            next_tick = t + 0.5
        collect()
    for _, rid in spans[i:]:
        r = by_id[rid]
        start, first, end = _view(r, "traces")
        ledger.place(
            r.id, model="sim", start_s=start, first_token_s=first, end_s=end,
            prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
            cached_tokens=r.cached_tokens if cache_aware else None,
        )  # fmt: skip
    for rec in recs.values():
        for smp in rec.flush():
            ledger.sample(smp.gpu, smp.time_s, smp.power_w)
    ledger.flush()
    collect()
    return out, abs(ledger.total_j - measured) / measured if measured else 0.0


def idle_by_stage(wl: Workload, mode: Mode, idle_w: float) -> dict[str, tuple[float, float]]:
    """Each request's equal share of ``idle_w`` (all GPUs) while in flight, (prefill, decode)."""
    bounds: list[tuple[float, int, str]] = []
    first: dict[str, float] = {}
    for r in wl.requests:
        s, f, e = _view(r, mode)
        first[r.id] = f
        bounds += [(s, 1, r.id), (e, 0, r.id)]
    bounds.sort()
    cuts = sorted({t for t, _, _ in bounds} | set(first.values()))
    out = {r.id: [0.0, 0.0] for r in wl.requests}
    active: set[str] = set()
    j = 0
    for a, b in itertools.pairwise(cuts):
        while j < len(bounds) and bounds[j][0] <= a:
            _, is_start, rid = bounds[j]
            (active.add if is_start else active.discard)(rid)
            j += 1
        if not active:
            continue
        each = idle_w * (b - a) / len(active)
        for rid in active:
            out[rid][0 if b <= first[rid] else 1] += each
    return {k: (v[0], v[1]) for k, v in out.items()}


def naive(
    wl: Workload, mode: Mode, reconciled: Sequence[PowerSample], idle: dict[str, float]
) -> dict[str, dict[str, tuple[float, float]]]:
    """Equal split and token share: per request (dynamic J, dynamic J before the first token)."""
    views = {r.id: _view(r, mode) for r in wl.requests}
    spans: list[tuple[float, float, str]] = []
    for rid, (s, f, e) in views.items():  # cut at the first token too, for the stage split
        spans += [(s, f, rid + "\x00p"), (f, e, rid + "\x00d")]
    equal: dict[str, list[float]] = {rid: [0.0, 0.0] for rid in views}
    total = 0.0
    for g in sorted(idle):
        mine = [s for s in reconciled if s.gpu == g]
        for dyn, active in _pieces_dynamic(mine, idle[g], spans):
            total += dyn
            for key in active:
                rid, stage = key.split("\x00")
                equal[rid][0] += dyn / len(active)
                if stage == "p":
                    equal[rid][1] += dyn / len(active)
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in wl.requests)
    token = {
        r.id: (
            total * (r.prompt_tokens + r.completion_tokens) / tokens,
            total * r.prompt_tokens / tokens,
        )
        for r in wl.requests
    }
    return {"equal": {k: (v[0], v[1]) for k, v in equal.items()}, "token": token}


def _pct(got: float, want: float) -> float:
    return abs(got - want) / want * 100.0


def served(name: str, duration_s: float, **spec: Any) -> tuple[Workload, list[SyntheticRequest]]:
    """``duration_s`` seconds of the named trace through the engine (``spec``: further
    :class:`EngineSpec` fields), and the requests scored: those that drew energy and ended
    a second before the last reading."""
    file, from_s, rate_scale = TRACES[name]
    wl = serve(
        load_trace(DATA / file),
        EngineSpec(duration_s=duration_s, rate_scale=rate_scale, from_s=from_s, **spec),
    )
    last = wl.samples[-1][0]
    return wl, [r for r in wl.requests if r.end_s < last - 1.0 and r.truth_j > 0]


def run_trace(name: str, duration_s: float, *, sample_hz: float = 10.0) -> TraceResult:
    """Both views, three rules, on ``duration_s`` seconds of the named trace."""
    wl, scored = served(
        name, duration_s, sample_hz=sample_hz, sensor_window_s=min(0.02, 1.0 / sample_hz)
    )
    conc = [
        float(
            sum(
                1
                for o in wl.requests
                if _view(o, "traces")[0] <= (r.first_token_s + r.end_s) / 2 < o.end_s
            )
        )
        for r in scored
    ]
    reconciled = reconcile_all(PowerSample(t, g, p, e) for t, g, p, e in wl.samples)
    reconciled.sort(key=lambda s: s.time_s)
    idle = estimate_idle_watts(
        ((s.gpu, s.time_s, s.power_w) for s in reconciled),
        [(r.start_s, r.end_s) for r in wl.requests],
    )
    true_idle_w = wl.spec.idle_w * wl.spec.gpus
    modes: dict[str, ModeResult] = {}
    conservation = 0.0
    for name_ in (*MODES, "traces_live", "proxy_held"):
        mode: Mode = "proxy" if name_.startswith("proxy") else "traces"
        if name_ == "traces_live":
            ledger, cons = replay_live_traces(wl)
        else:  # proxy_held: through run --proxy-hold, intervals wait for the streams' usage
            hold = PROXY_HOLD_S if name_ == "proxy_held" else 0.0
            ledger, cons = replay(wl, mode, proxy_hold_s=hold)
        conservation = max(conservation, cons)
        truth_idle = idle_by_stage(wl, mode, true_idle_w)
        est_idle = idle_by_stage(wl, mode, sum(idle.values()))
        got: dict[str, dict[str, tuple[float, float, float]]] = {
            "ledger": {rid: (d, a, p) for rid, (d, a, p) in ledger.items()}
        }
        rules = RULES if name_ in MODES else ("ledger",)
        if name_ in MODES:
            for rule, res in naive(wl, mode, reconciled, idle).items():
                got[rule] = {
                    rid: (d, d + sum(est_idle[rid]), dp + est_idle[rid][0])
                    for rid, (d, dp) in res.items()
                }
        req: dict[str, Errors] = {}
        pre: dict[str, Errors] = {}
        dec: dict[str, Errors] = {}
        for rule in rules:
            g = got[rule]
            e_req, e_pre, e_dec = [], [], []
            for r in scored:
                d, a, p = g.get(r.id, (0.0, 0.0, 0.0))
                ti = truth_idle[r.id]
                t_pre = r.truth_prefill_j + ti[0]
                t_dec = r.truth_j - r.truth_prefill_j + ti[1]
                e_req.append(_pct(d, r.truth_j))
                if t_pre > 0:
                    e_pre.append(_pct(p, t_pre))
                if t_dec > 0:
                    e_dec.append(_pct(a - p, t_dec))
            req[rule], pre[rule], dec[rule] = Errors.of(e_req), Errors.of(e_pre), Errors.of(e_dec)
        modes[name_] = ModeResult(req, pre, dec)
    unpaced, _ = replay(wl, "traces", paced=False)
    exact, _ = replay(wl, "proxy", prompt_spread=0.0, first_chunk_usage=True)
    return TraceResult(
        name,
        len(scored),
        (percentile(conc, 0.1), median(conc), percentile(conc, 0.9)),
        modes,
        conservation,
        Errors.of([_pct(unpaced.get(r.id, (0.0, 0.0, 0.0))[0], r.truth_j) for r in scored]),
        Errors.of([_pct(exact.get(r.id, (0.0, 0.0, 0.0))[0], r.truth_j) for r in scored]),
    )


FAST_HZ = 50.0
"""The what-if sampling rate: ``--sample-hz 50``, as fast as NVML's instant field refreshes."""


def fast_sampling(duration_s: float) -> dict[str, float]:
    """The chat trace's figures at ``FAST_HZ`` (keys ``serving_chat_<view>_50hz_...``): the
    sidecar's in every view, the naive rules' medians in the views that have them."""
    res = run_trace("chat", duration_s, sample_hz=FAST_HZ)
    fig: dict[str, float] = {}
    for mode, m in res.modes.items():
        k = f"serving_chat_{mode}_{FAST_HZ:g}hz"
        fig[f"{k}_ledger_median_error_percent"] = m.request["ledger"].median
        fig[f"{k}_ledger_p90_error_percent"] = m.request["ledger"].p90
        fig[f"{k}_ledger_prefill_median_error_percent"] = m.prefill["ledger"].median
        fig[f"{k}_ledger_decode_median_error_percent"] = m.decode["ledger"].median
        for rule in m.request:
            if rule != "ledger":
                fig[f"{k}_{rule}_median_error_percent"] = m.request[rule].median
    return fig


PREFIX_SHARE = 0.6
PREFIX_TOKENS = 512
"""The prefix-cache what-if: 60 % of the chat trace's requests open with one 512-token system
prompt, read from the engine's prefix cache once it has been prefilled."""


def prefix_cache(duration_s: float) -> dict[str, float]:
    """The chat trace with a shared system prompt (``PREFIX_SHARE`` of requests,
    ``PREFIX_TOKENS``), in the views that hear the cached count (``proxy_held``: the
    stream's usage at its end; ``traces_live``: the span), each cache-aware and cache-blind
    (every prompt token weighed as computed). Keys
    ``serving_chat_cached_<view>_{aware,blind}_ledger_{median,p90}_error_percent`` and the
    share of prompt tokens cached."""
    wl, scored = served("chat", duration_s, prefix_share=PREFIX_SHARE, prefix_tokens=PREFIX_TOKENS)
    fig: dict[str, float] = {
        "serving_chat_cached_prompt_share": sum(r.cached_tokens for r in wl.requests)
        / max(1, sum(r.prompt_tokens for r in wl.requests)),
    }
    for aware in (True, False):
        runs = {
            "proxy_held": replay(wl, "proxy", proxy_hold_s=PROXY_HOLD_S, cache_aware=aware)[0],
            "traces_live": replay_live_traces(wl, cache_aware=aware)[0],
        }
        for view, got in runs.items():
            err = Errors.of([_pct(got.get(r.id, (0.0, 0.0, 0.0))[0], r.truth_j) for r in scored])
            k = f"serving_chat_cached_{view}_{'aware' if aware else 'blind'}_ledger"
            fig[f"{k}_median_error_percent"] = err.median
            fig[f"{k}_p90_error_percent"] = err.p90
    return fig


def figures(results: Iterable[TraceResult]) -> dict[str, float | list[float]]:
    """Flat bench keys: ``serving_<trace>_<mode>_<rule>_{median,p90}_error_percent`` and
    ``..._{prefill,decode}_median_error_percent``."""
    fig: dict[str, float | list[float]] = {}
    for res in results:
        base = f"serving_{res.trace}"
        fig[f"{base}_requests"] = res.requests
        fig[f"{base}_batch_p10_median_p90"] = list(res.batch_p10_median_p90)
        fig[f"{base}_conservation_error"] = res.conservation_error
        fig[f"{base}_traces_unpaced_ledger_median_error_percent"] = res.traces_unpaced.median
        fig[f"{base}_traces_unpaced_ledger_p90_error_percent"] = res.traces_unpaced.p90
        fig[f"{base}_proxy_exact_prompt_ledger_median_error_percent"] = (
            res.proxy_exact_prompt.median
        )
        fig[f"{base}_proxy_exact_prompt_ledger_p90_error_percent"] = res.proxy_exact_prompt.p90
        for mode, m in res.modes.items():
            for rule in m.request:
                k = f"{base}_{mode}_{rule}"
                fig[f"{k}_median_error_percent"] = m.request[rule].median
                fig[f"{k}_p90_error_percent"] = m.request[rule].p90
                fig[f"{k}_prefill_median_error_percent"] = m.prefill[rule].median
                fig[f"{k}_decode_median_error_percent"] = m.decode[rule].median
    return fig


BINS: dict[str, tuple[float, ...]] = {
    "prompt tokens": (0, 100, 300, 600, 1000, 2000, 4000, 1e9),
    "output tokens": (0, 20, 50, 100, 200, 400, 1e9),
    "true prefill share": (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.01),
    "queued s": (0.0, 0.001, 0.05, 0.2, 0.5, 1.0, 2.0, 1e9),
    "running at its mid-point": (0, 5, 10, 20, 30, 40, 1e9),
}
"""The error breakdown's bins: where the error comes from."""


def breakdown(name: str, duration_s: float) -> dict[str, list[dict[str, float]]]:
    """Per view, the ledger's error in bins of what could explain it (prompt and output
    length, the truth's prefill share, time queued, requests running beside it): per bin
    the request count, median and p90 of ``|error|`` and the median signed error (+ is
    overcharged), each in %."""
    wl, scored = served(name, duration_s)
    out: dict[str, list[dict[str, float]]] = {}
    for mode in MODES:
        got, _ = replay(wl, mode)
        rows = []
        for r in scored:
            mid = (r.first_token_s + r.end_s) / 2
            keys = {
                "prompt tokens": float(r.prompt_tokens),
                "output tokens": float(r.completion_tokens),
                "true prefill share": r.truth_prefill_j / r.truth_j,
                "queued s": (r.scheduled_s or r.start_s) - r.start_s,
                "running at its mid-point": float(
                    sum(1 for o in wl.requests if _view(o, "traces")[0] <= mid < o.end_s)
                ),
            }
            signed = (got.get(r.id, (0.0, 0.0, 0.0))[0] - r.truth_j) / r.truth_j * 100.0
            rows.append((keys, signed))
        for what, edges in BINS.items():
            for lo, hi in itertools.pairwise(edges):
                errs = [e for k, e in rows if lo <= k[what] < hi]
                if not errs:
                    continue
                out.setdefault(f"{name} {mode} by {what}", []).append(
                    {
                        "from": lo,
                        "to": hi,
                        "requests": len(errs),
                        "median": median([abs(e) for e in errs]),
                        "p90": percentile([abs(e) for e in errs], 0.9),
                        "bias": median(errs),
                    }
                )
    return out


def all_figures(duration_s: float) -> dict[str, float | list[float]]:
    """Every trace's keys and the 50 Hz what-if, run in two processes (they share nothing):
    the quick bench's longest step, halved on a 2-core machine."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        fast = pool.submit(fast_sampling, duration_s)
        traces = [pool.submit(run_trace, n, duration_s) for n in TRACES]
        out = figures(t.result() for t in traces)
        out.update(fast.result())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m bench.serving_accuracy",
        description="Per-request and per-stage accuracy on the serving simulator (JSON).",
    )
    ap.add_argument("seconds", nargs="?", type=float, default=180.0, help="trace seconds kept")
    ap.add_argument(
        "--prefix-cache",
        action="store_true",
        help="the chat trace with a shared, cached system prompt: cache-aware against blind",
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="the ledger's error in bins (prompt, output, prefill share, queue, batch) instead",
    )
    args = ap.parse_args(argv)
    if args.prefix_cache:
        print(json.dumps(prefix_cache(args.seconds), indent=1))
        return
    if args.breakdown:
        rows: dict[str, object] = {}
        for n in TRACES:
            rows.update(breakdown(n, args.seconds))
        print(json.dumps(rows, indent=1))
        return
    print(json.dumps(all_figures(args.seconds), indent=1))


if __name__ == "__main__":
    main()
