"""Attribution accuracy against the simulated GPU's exact ground truth, beside two naive rules.

The workload is :func:`sidecar.workload.generate` at a rate where batches of
5 to 20 requests are the rule. Each request's true dynamic energy is the
integral of its own contribution to power. Four answers on the same trace:

* ``live``: the events the proxy would report (start with a prompt estimate,
  first token, one event per streamed token, end with the usage) and the
  samples the sampler would deliver (reconciled against the energy counter),
  fed in time order to the ledger, as ``run`` does. The headline figure.
* ``trace``: :func:`sidecar.attribute.attribute` on the recorded CSV rows
  (completion tokens known only as a total, spread between first token and end).
* what-ifs of the sidecar with ``--idle-watts`` (the baseline known), and with the
  proposed prefill weighting (prompt tokens weighted by the ratio of joules per
  prompt token to joules per output token, fitted on the trace by least squares).
* ``equal split``: each piece of time's dynamic energy (power above the same
  baseline, pieces cut at every request start and end) split equally among
  the requests in flight.
* ``token share``: the whole trace's dynamic energy split by each request's
  share of all tokens (prompt plus completion).

Error per request is ``|attributed dynamic - truth| / truth``; the figure is
the median over requests that ended at least a second before the last sample.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.common import median, percentile
from sidecar.attribute import attribute
from sidecar.ledger import Ledger, estimate_idle_watts
from sidecar.power.base import PowerSample
from sidecar.reconcile import Reconciler, reconcile_all
from sidecar.workload import SyntheticRequest, Workload, WorkloadSpec, generate

PROMPT_ESTIMATE_SPREAD = 0.25
"""The proxy estimates a prompt from the request body (about 4 bytes a token): within ±25 %."""
STANDBY_LEAD_S = 5.0
"""Standby readings before the first request. The sidecar starts before traffic: as a
native sidecar container it is up before the model server, which then spends tens of
seconds loading weights and warming up before its readiness probe lets a request in.
Five seconds (50 readings at 10 Hz) is a short, conservative lead-in."""


@dataclass(frozen=True, slots=True)
class AccuracyResult:
    requests: int
    concurrency_p10: float
    concurrency_median: float
    concurrency_p90: float
    live_error_percent: float
    live_error_p90_percent: float
    live_total_ratio: float
    """Sum of attributed dynamic over sum of true dynamic (live, default estimator)."""
    live_known_idle_error_percent: float
    fitted_prompt_weight: float
    proposed_error_percent: float
    """Live, known baseline and prompt tokens weighted by the fitted ratio (proposed fix)."""
    trace_error_percent: float
    equal_split_error_percent: float
    token_share_error_percent: float
    output_token_share_error_percent: float
    live_conservation_error: float
    """|sum of phases - energy measured| / measured, live path."""
    dynamic_share_truth: float
    """True dynamic energy as a share of all energy: how much there is to get right."""


def _errors(got: dict[str, float], reqs: Sequence[SyntheticRequest]) -> list[float]:
    return [abs(got.get(r.id, 0.0) - r.truth_j) / r.truth_j * 100.0 for r in reqs if r.truth_j > 0]


def live_replay(
    wl: Workload,
    *,
    idle_watts: dict[str, float] | None = None,
    prompt_weight: float = 1.0,
    seed: int = 3,
) -> tuple[dict[str, float], float]:
    """Per-request dynamic joules as the running sidecar would attribute them.

    ``idle_watts`` is ``--idle-watts`` (default: the live estimator).
    ``prompt_weight`` scales the prompt estimate handed to the ledger, which
    is how a what-if of the proposed prefill weighting is run without
    changing the ledger: a streamed request's prompt work is that estimate.
    """
    rnd = random.Random(seed)
    gpus = sorted({g for _, g, _, _ in wl.samples})
    ledger = Ledger(gpus, idle_watts=idle_watts)
    if wl.samples:  # the model server answers from the first reading on (the meter's call)
        ledger.upstream_ready(wl.samples[0][0])
    rate = wl.spec.decode_tokens_per_s
    events: list[tuple[float, int, int, str, int]] = []  # (time, kind order, seq, id, arg)
    seq = 0
    for r in wl.requests:
        guess = max(
            1,
            round(
                r.prompt_tokens
                * rnd.uniform(1 - PROMPT_ESTIMATE_SPREAD, 1 + PROMPT_ESTIMATE_SPREAD)
            ),
        )
        for t, kind, arg in (
            (r.start_s, 0, guess),
            (r.first_token_s, 1, 0),
            (r.first_token_s, 2, 1),
            *((t, 2, 1) for t in r.token_times(rate)),
            (r.end_s, 3, 0),
        ):
            seq += 1
            events.append((t, kind, seq, r.id, arg))
    events.sort()
    by_id = {r.id: r for r in wl.requests}
    recs = {g: Reconciler() for g in gpus}
    out: dict[str, float] = {}
    measured = 0.0
    next_tick = wl.samples[0][0] if wl.samples else 0.0
    i = 0

    def feed(samples: Iterable[PowerSample]) -> None:
        for s in samples:
            ledger.sample(s.gpu, s.time_s, s.power_w)

    def apply(ev: tuple[float, int, int, str, int]) -> None:
        t, kind, _, rid, arg = ev
        if kind == 0:
            ledger.start(rid, t, model="sim", prompt_tokens=arg * prompt_weight)
        elif kind == 1:
            ledger.first_token(rid, t)
        elif kind == 2:
            ledger.tokens(rid, t, arg)
        else:
            r = by_id[rid]
            ledger.finish(
                rid, t, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens
            )

    prev: dict[str, tuple[float, float]] = {}
    for t, g, p, e in wl.samples:
        while i < len(events) and events[i][0] <= t:
            apply(events[i])
            i += 1
        feed(recs[g].push(PowerSample(t, g, p, e)))
        if g in prev:
            measured += e - prev[g][1]
        prev[g] = (t, e)
        if t >= next_tick:
            ledger.advance(t)
            next_tick = t + 0.5
        for f in ledger.pop_finished():
            out[f.id] = f.dynamic_j
    for ev in events[i:]:
        apply(ev)
    for rec in recs.values():
        feed(rec.flush())
    ledger.flush()
    for f in ledger.pop_finished():
        out[f.id] = f.dynamic_j
    conservation = abs(ledger.total_j - measured) / measured if measured else 0.0
    return out, conservation


def fit_prompt_weight(wl: Workload, idle: dict[str, float], window_s: float = 1.0) -> float:
    """Joules per prompt token over joules per output token, learnt from the trace itself.

    Least squares, no intercept, over fixed windows: the energy counter's
    increase above the baseline against the prompt tokens prefilled and the
    output tokens decoded in each window (each spread evenly over its phase).
    Everything here is known to a running sidecar; nothing reads the truth.
    """
    t0 = wl.samples[0][0]
    n = max(1, int((wl.samples[-1][0] - t0) / window_s))
    dyn = [0.0] * n
    pre = [0.0] * n
    dec = [0.0] * n
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    for t, g, _, e in wl.samples:
        by_gpu.setdefault(g, []).append((t, e))
    for g, xs in by_gpu.items():
        k = 0
        start_e = xs[0][1]
        start_t = xs[0][0]
        for t, e in xs[1:]:
            if t >= t0 + (k + 1) * window_s:
                if k < n:
                    dyn[k] += (e - start_e) - idle.get(g, 0.0) * (t - start_t)
                k += 1
                start_e, start_t = e, t

    def spread(arr: list[float], a: float, b: float, work: float) -> None:
        if b <= a:
            return
        for k in range(max(0, int((a - t0) / window_s)), min(n, int((b - t0) / window_s) + 1)):
            lo, hi = t0 + k * window_s, t0 + (k + 1) * window_s
            overlap = min(hi, b) - max(lo, a)
            if overlap > 0:
                arr[k] += work * overlap / (b - a)

    for r in wl.requests:
        spread(pre, r.start_s, r.first_token_s, float(r.prompt_tokens))
        spread(dec, r.first_token_s, r.end_s, float(r.completion_tokens))
    spp = sum(x * x for x in pre)
    sdd = sum(x * x for x in dec)
    spd = sum(x * y for x, y in zip(pre, dec, strict=True))
    spy = sum(x * y for x, y in zip(pre, dyn, strict=True))
    sdy = sum(x * y for x, y in zip(dec, dyn, strict=True))
    det = spp * sdd - spd * spd
    if det <= 0:
        return 1.0
    j_prompt = (spy * sdd - sdy * spd) / det
    j_output = (sdy * spp - spy * spd) / det
    return j_prompt / j_output if j_output > 0 and j_prompt > 0 else 1.0


def _pieces_dynamic(
    samples: Sequence[PowerSample], idle_w: float, spans: Sequence[tuple[float, float, str]]
) -> Iterable[tuple[float, set[str]]]:
    """(dynamic joules, requests in flight) per piece of one GPU's power line.

    Pieces are cut at every request start and end and where the line crosses
    the baseline, so each lies wholly above or below it and has one set of
    requests in flight: the naive rules get the same exact integration as the
    ledger, and differ from it only in how they share.
    """
    bounds: list[tuple[float, int, str]] = []
    for s, e, rid in spans:
        bounds.append((s, 1, rid))
        bounds.append((e, 0, rid))
    bounds.sort()
    active: set[str] = set()
    j = 0
    for a_s, b_s in itertools.pairwise(samples):
        t0, p0, t1, p1 = a_s.time_s, a_s.power_w, b_s.time_s, b_s.power_w
        if t1 <= t0:
            continue
        slope = (p1 - p0) / (t1 - t0)
        cuts: list[float] = [t0]
        if (p0 - idle_w) * (p1 - idle_w) < 0:
            cuts.append(t0 + (idle_w - p0) / slope)
        k = j
        while k < len(bounds) and bounds[k][0] < t1:
            if bounds[k][0] > t0:
                cuts.append(bounds[k][0])
            k += 1
        cuts.append(t1)
        cuts.sort()
        for a, b in itertools.pairwise(cuts):
            while j < len(bounds) and bounds[j][0] <= a:
                _, is_start, rid = bounds[j]
                if is_start:
                    active.add(rid)
                else:
                    active.discard(rid)
                j += 1
            if b <= a:
                continue
            pa = p0 + slope * (a - t0)
            pb = p0 + slope * (b - t0)
            above = (pa + pb) / 2.0 - idle_w
            if above > 0 and active:
                yield above * (b - a), active


def naive(
    wl: Workload, reconciled: Sequence[PowerSample], idle: dict[str, float]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Equal split per piece, whole-trace token share (all tokens, and output tokens only)."""
    spans = [(r.start_s, r.end_s, r.id) for r in wl.requests]
    equal: dict[str, float] = dict.fromkeys((r.id for r in wl.requests), 0.0)
    total_dyn = 0.0
    for g in sorted(idle):
        mine = [s for s in reconciled if s.gpu == g]
        for dyn, active in _pieces_dynamic(mine, idle[g], spans):
            total_dyn += dyn
            share = dyn / len(active)
            for rid in active:
                equal[rid] += share
    all_tokens = sum(r.prompt_tokens + r.completion_tokens for r in wl.requests)
    out_tokens = sum(r.completion_tokens for r in wl.requests)
    token = {
        r.id: total_dyn * (r.prompt_tokens + r.completion_tokens) / all_tokens for r in wl.requests
    }
    output = {r.id: total_dyn * r.completion_tokens / out_tokens for r in wl.requests}
    return equal, token, output


def run(duration_s: float, *, rps: float = 3.0, gpus: int = 2, seed: int = 11) -> AccuracyResult:
    spec = WorkloadSpec(
        duration_s=duration_s, rps=rps, gpus=gpus, seed=seed, standby_lead_s=STANDBY_LEAD_S
    )
    wl = generate(spec)
    last_sample_s = wl.samples[-1][0]
    scored = [r for r in wl.requests if r.end_s < last_sample_s - 1.0]
    conc = [
        float(sum(1 for o in wl.requests if o.start_s <= (r.start_s + r.end_s) / 2 < o.end_s))
        for r in scored
    ]
    live, conservation = live_replay(wl)
    power_rows, request_rows = wl.trace_rows()
    doc = attribute(power_rows, request_rows)
    trace = {q["id"]: float(q["dynamic_joules"]) for q in doc["requests"]}
    reconciled = reconcile_all(PowerSample(t, g, p, e) for t, g, p, e in wl.samples)
    reconciled.sort(key=lambda s: s.time_s)
    idle = estimate_idle_watts(
        ((s.gpu, s.time_s, s.power_w) for s in reconciled),
        [(r.start_s, r.end_s) for r in wl.requests],
    )
    equal, token, output = naive(wl, reconciled, idle)
    known, _ = live_replay(wl, idle_watts=idle)
    weight = fit_prompt_weight(wl, idle)
    proposed, _ = live_replay(wl, idle_watts=idle, prompt_weight=weight)
    truth_dyn = sum(r.truth_j for r in wl.requests)
    first_e: dict[str, float] = {}
    last_e: dict[str, float] = {}
    for _, g, _, e in wl.samples:
        first_e.setdefault(g, e)
        last_e[g] = e
    total_e = sum(last_e[g] - first_e[g] for g in last_e)
    live_err = _errors(live, scored)
    return AccuracyResult(
        requests=len(scored),
        concurrency_p10=percentile(conc, 0.1),
        concurrency_median=median(conc),
        concurrency_p90=percentile(conc, 0.9),
        live_error_percent=median(live_err),
        live_error_p90_percent=percentile(live_err, 0.9),
        live_total_ratio=sum(live.get(r.id, 0.0) for r in scored) / sum(r.truth_j for r in scored),
        live_known_idle_error_percent=median(_errors(known, scored)),
        fitted_prompt_weight=weight,
        proposed_error_percent=median(_errors(proposed, scored)),
        trace_error_percent=median(_errors(trace, scored)),
        equal_split_error_percent=median(_errors(equal, scored)),
        token_share_error_percent=median(_errors(token, scored)),
        output_token_share_error_percent=median(_errors(output, scored)),
        live_conservation_error=conservation,
        dynamic_share_truth=truth_dyn / total_e if total_e else 0.0,
    )
