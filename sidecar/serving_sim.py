"""A step-based serving engine with exact per-request energy: the accuracy bench's yardstick.

The plain workload (:mod:`sidecar.workload`) gives every request its own
fixed draw. A real server does not: vLLM and SGLang run *continuous batching*,
one forward step after another, each step carrying one decode token for every
running request plus chunks of waiting prompts up to a token budget (vLLM's
``max_num_batched_tokens``, 2048 here, as vLLM's "Optimization and Tuning"
page describes chunked prefill; Sarathi-Serve, Agrawal et al., OSDI 2024, is
the design). So the cost of a token depends on what else is in the step:

* Decode is memory-bound: each step reads the weights once whatever the batch
  (``step_fixed_s``), plus each sequence's KV cache (``kv_token_s`` per token of
  context). Step energy grows sub-linearly with batch size, so energy per output
  token falls several-fold from batch 1 to batch 32 (the ML.ENERGY leaderboard,
  Chung et al. 2025; DynamoLLM, Stojkovic et al., HPCA 2025). Power in this
  regime rises with the batch but stays far below TDP.
* Prefill is compute-bound: time and energy are about linear in prompt tokens
  (``prefill_token_s``), at a draw near TDP (Splitwise, Patel et al., ISCA 2024:
  the prompt phase runs at the power limit, the token phase well under it;
  one operator reports decode at 180-200 W and prefill at 270-300 W per GPU).

The defaults are a 7B model (Llama-2-7B, bf16) on two A100-80GB with tensor
parallelism: 14 GB of weights over 2 x 2.0 TB/s at ~70 % achieved bandwidth
plus launch overhead give ~8 ms a step; 14 GFLOP a prompt token over
2 x 312 TFLOPS at ~50 % MFU give ~45 us a token; 0.5 MB of KV a token give
~0.19 us a token of context a step. Per GPU above a 70 W resident draw:
100 W for the memory-bound part of a step at batch 1, rising towards 160 W
with the tokens in the step; 250 W for compute (the A100's TDP is 400 W).

A prefix cache (``prefix_share``, ``prefix_tokens``): that share of requests start with one
shared prefix (a system prompt); once one of them has been prefilled, the others read it
from the cache in whole blocks (``cache_block``, vLLM's 16 tokens) and compute only the rest,
as vLLM's automatic prefix caching does; their KV cache still holds the whole prompt.

Exact per-request truth: each step's energy is split by the physics itself:
the weight read by tokens in the step (every token uses the weights once), the
KV reads by each sequence's context, the compute by each one's tokens. A
request's true dynamic energy is the sum of its shares; its prefill stage is
its shares up to and including the step that yields its first token.
Arrivals and lengths come from a real trace (``bench/data``: the Azure LLM
inference trace 2023), not uniform draws.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.workload import SyntheticRequest, Workload

TraceRow = tuple[float, int, int]
"""(arrival offset in seconds, prompt tokens, output tokens)."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    gpus: int = 2
    idle_w: float = 70.0
    """Per GPU: the resident (model loaded, no work) draw."""
    noise_w: float = 1.5
    sample_hz: float = 10.0
    sensor_window_s: float = 0.02
    """A reading is the mean draw over this window (NVML's instant field refreshes at ~50 Hz)."""
    token_budget: int = 2048
    max_seqs: int = 256
    kv_capacity_tokens: int = 200_000
    """KV cache of 2 x 80 GB less weights and activations, at 0.5 MB a token."""
    step_fixed_s: float = 0.008
    kv_token_s: float = 1.9e-7
    decode_seq_s: float = 2.0e-5
    prefill_token_s: float = 4.5e-5
    memory_w: tuple[float, float] = (100.0, 160.0)
    """Per GPU above idle in the memory-bound part of a step: at 1 token, and the limit."""
    memory_w_tokens: float = 24.0
    """Tokens in a step over which the memory-bound draw closes ~63 % of that rise."""
    compute_w: float = 250.0
    """Per GPU above idle in the compute-bound part of a step."""
    stream_delay_s: float = 0.001
    """From the end of a step to the token leaving the server (detokenise, send)."""
    rate_scale: float = 1.0
    """Arrival rate relative to the trace's (arrival offsets are divided by it)."""
    from_s: float = 0.0
    """Where in the trace to begin (trace seconds): its quiet minutes can be skipped."""
    duration_s: float = 180.0
    """Arrivals of the trace kept: those within this many seconds (after scaling)."""
    standby_lead_s: float = 5.0
    seed: int = 0
    start_s: float = 1_700_000_000.0
    prefix_share: float = 0.0
    """Requests that begin with the one shared prefix (drawn with ``seed``)."""
    prefix_tokens: int = 0
    cache_block: int = 16


def load_trace(path: Path) -> list[TraceRow]:
    """Rows ``offset_s,context_tokens,generated_tokens`` (bench/data's format)."""
    rows: list[TraceRow] = []
    with path.open(encoding="utf-8") as f:
        header = f.readline().strip()
        if header != "offset_s,context_tokens,generated_tokens":
            raise ValueError(f"{path}: header must be offset_s,context_tokens,generated_tokens")
        for n, line in enumerate(f, start=2):
            parts = line.strip().split(",")
            if len(parts) != 3:
                raise ValueError(f"{path}: line {n}: expected 3 columns, got {len(parts)}")
            rows.append((float(parts[0]), max(1, int(parts[1])), max(1, int(parts[2]))))
    return rows


@dataclass(slots=True)
class _Live:
    req: SyntheticRequest
    prefilled: int = 0
    generated: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.req.prompt_tokens


@dataclass(slots=True)
class _Power:
    """Dynamic power over all GPUs, piecewise constant per step (gaps are zero)."""

    t0: list[float] = field(default_factory=list)
    t1: list[float] = field(default_factory=list)
    watts: list[float] = field(default_factory=list)
    cum_j: list[float] = field(default_factory=list)

    def add(self, t0: float, t1: float, watts: float) -> None:
        prev = self.cum_j[-1] + self.watts[-1] * (self.t1[-1] - self.t0[-1]) if self.t0 else 0.0
        self.t0.append(t0)
        self.t1.append(t1)
        self.watts.append(watts)
        self.cum_j.append(prev)

    def energy_j(self, t: float) -> float:
        """Exact dynamic energy from the first step up to ``t``."""
        k = bisect.bisect_right(self.t0, t) - 1
        if k < 0:
            return 0.0
        return self.cum_j[k] + self.watts[k] * (min(t, self.t1[k]) - self.t0[k])


def serve(trace: Sequence[TraceRow], spec: EngineSpec) -> Workload:
    """Run ``trace`` through the engine; a deterministic :class:`Workload` with exact truth."""
    arrivals = sorted(
        (spec.standby_lead_s + (off - spec.from_s) / spec.rate_scale, p, o)
        for off, p, o in trace
        if 0.0 <= (off - spec.from_s) / spec.rate_scale < spec.duration_s
    )
    reqs = [
        SyntheticRequest(f"req-{i:05d}", a, a, a, p, o, token_s=[], scheduled_s=None)
        for i, (a, p, o) in enumerate(arrivals)
    ]
    rnd = random.Random(spec.seed + 2)
    shares_prefix = {r.id for r in reqs if spec.prefix_tokens and rnd.random() < spec.prefix_share}
    prefix_ready = False  # one request with the prefix has been prefilled: it is cached
    power = _Power()
    waiting: deque[_Live] = deque()
    running: list[_Live] = []
    kv_used = 0
    i = 0
    t = 0.0
    while i < len(reqs) or waiting or running:
        if not waiting and not running:
            t = max(t, reqs[i].start_s)
        while i < len(reqs) and reqs[i].start_s <= t:
            waiting.append(_Live(reqs[i]))
            i += 1
        batch: list[tuple[_Live, int]] = []
        budget = spec.token_budget
        for lv in running:
            if budget <= 0:
                break
            n = 1 if lv.decoding else min(lv.req.prompt_tokens - lv.prefilled, budget)
            batch.append((lv, n))
            budget -= n
        while waiting and budget > 0 and len(running) < spec.max_seqs:
            need = waiting[0].req.prompt_tokens + waiting[0].req.completion_tokens
            if kv_used + need > spec.kv_capacity_tokens and running:
                break  # no room in the KV cache: it waits for a running request to end
            lv = waiting.popleft()
            kv_used += need
            lv.req.scheduled_s = t
            if prefix_ready and lv.req.id in shares_prefix:  # read, not computed
                hit = min(spec.prefix_tokens, lv.req.prompt_tokens - 1)
                lv.req.cached_tokens = lv.prefilled = hit - hit % spec.cache_block
            running.append(lv)
            n = min(lv.req.prompt_tokens - lv.prefilled, budget)
            batch.append((lv, n))
            budget -= n
        if not batch:  # nothing could run (cannot happen with a sane spec): wait for arrivals
            t = reqs[i].start_s if i < len(reqs) else t + 1.0
            continue
        t1 = t + _step(spec, batch, t, power)
        for lv, n in batch:
            if lv.decoding:
                lv.generated += 1
            else:
                lv.prefilled += n
                if lv.decoding:
                    lv.generated = 1  # the step that completes the prompt yields the first token
            if not lv.decoding:
                continue
            assert lv.req.token_s is not None
            lv.req.token_s.append(t1 + spec.stream_delay_s)
            if lv.generated == 1:
                lv.req.first_token_s = t1 + spec.stream_delay_s
                lv.req.truth_prefill_j = lv.req.truth_j
                if lv.req.id in shares_prefix and lv.req.prompt_tokens >= spec.prefix_tokens:
                    prefix_ready = True
        done = [lv for lv in running if lv.generated >= lv.req.completion_tokens]
        for lv in done:
            running.remove(lv)
            kv_used -= lv.req.prompt_tokens + lv.req.completion_tokens
            lv.req.end_s = t1 + spec.stream_delay_s
        t = t1
    samples = _samples(spec, power, t + 5.0)
    for r in reqs:
        r.start_s += spec.start_s
        r.first_token_s += spec.start_s
        r.end_s += spec.start_s
        r.scheduled_s = (r.scheduled_s or 0.0) + spec.start_s
        r.token_s = [x + spec.start_s for x in r.token_s or ()]
    return Workload(spec, reqs, samples)


def _step(spec: EngineSpec, batch: list[tuple[_Live, int]], t: float, power: _Power) -> float:
    """One forward step: its time, its energy into ``power``, each member's share into truth."""
    tokens = sum(n for _, n in batch)
    lo, hi = spec.memory_w
    mem_w = spec.gpus * (lo + (hi - lo) * (1.0 - math.exp(-(tokens - 1) / spec.memory_w_tokens)))
    cmp_w = spec.gpus * spec.compute_w
    parts: list[tuple[_Live, float, float]] = []  # (request, memory-bound s, compute s)
    for lv, n in batch:
        if lv.decoding:
            ctx = lv.req.prompt_tokens + lv.generated
            parts.append((lv, spec.kv_token_s * ctx, spec.decode_seq_s))
        else:
            parts.append((lv, 0.0, spec.prefill_token_s * n))
    step_s = spec.step_fixed_s + sum(m + c for _, m, c in parts)
    energy = mem_w * spec.step_fixed_s
    for (lv, m, c), (_, n) in zip(parts, batch, strict=True):
        share = mem_w * (spec.step_fixed_s * n / tokens + m) + cmp_w * c
        lv.req.truth_j += share
        energy += mem_w * m + cmp_w * c
    power.add(t, t + step_s, energy / step_s)
    return step_s


def _samples(
    spec: EngineSpec, power: _Power, end_s: float
) -> list[tuple[float, str, float, float]]:
    """Readings at ``sample_hz`` (mean draw over the sensor window, with noise) and a counter
    that integrates the noiseless power exactly; request times move to ``start_s``."""
    rnd = random.Random(spec.seed + 1)
    out: list[tuple[float, str, float, float]] = []
    w = spec.sensor_window_s
    for k in range(int(end_s * spec.sample_hz) + 1):
        t = k / spec.sample_hz
        dyn = power.energy_j(t)
        mean = (dyn - power.energy_j(t - w)) / w if t >= w else 0.0
        for g in range(spec.gpus):
            p = spec.idle_w + mean / spec.gpus + rnd.gauss(0.0, spec.noise_w)
            e = 1000.0 + spec.idle_w * t + dyn / spec.gpus
            out.append((spec.start_s + t, str(g), max(0.0, p), e))
    return out
