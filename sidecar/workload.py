"""Synthetic batched workloads with exact ground truth, for tests, examples and benchmarks.

Offline twin of the simulated GPU: requests arrive (Poisson, with bursts and
quiet spells), prefill for a time that grows with their prompt, then stream
tokens at a steady rate. Between two request events the batch is constant,
so each request's contribution to power is constant there: its prefill or
decode cost, discounted alike for every member of a larger batch. The true
dynamic energy of a request is the exact sum of its contribution over time;
the power trace is idle plus all contributions, sampled with noise, with an
energy counter that integrates the noiseless power as hardware does.

This is the plain per-request model (no steps, tokens at a steady rate), kept
for the tests and benchmarks that pin it. Realistic serving physics (continuous
batching, chunked prefill, memory-bound decode, a real request trace) is
:mod:`sidecar.serving_sim`, which returns the same :class:`Workload`.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.trace import POWER_COLUMNS, REQUEST_COLUMNS, PowerRow, RequestRow


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    duration_s: float = 60.0
    rps: float = 2.0
    gpus: int = 1
    idle_w: float = 70.0
    noise_w: float = 1.5
    sample_hz: float = 10.0
    prefill_j_per_token: float = 0.06
    prefill_tokens_per_s: float = 6000.0
    decode_j_per_token: float = 1.2
    decode_tokens_per_s: float = 30.0
    batch_discount: float = 0.12
    """Each extra request in a batch makes every member's step this much cheaper (relative)."""
    prompt_tokens: tuple[int, int] = (20, 3000)
    completion_tokens: tuple[int, int] = (5, 300)
    bursty: bool = True
    seed: int = 0
    start_s: float = 1_700_000_000.0
    standby_lead_s: float = 0.0
    """Seconds of standby readings before the first arrival: a sidecar starts before
    traffic does (a native sidecar container starts before the model server, which
    then loads its weights and passes its readiness probe before any request)."""


@dataclass(slots=True)
class SyntheticRequest:
    id: str
    start_s: float
    first_token_s: float
    end_s: float
    prompt_tokens: int
    completion_tokens: int
    model: str = "sim-model"
    truth_j: float = 0.0
    truth_prefill_j: float = 0.0
    """Its true dynamic energy up to its first token (the rest is decode)."""
    token_s: list[float] | None = None
    """When each token left the server, the first included (a step-based engine's);
    ``None``: a steady stream at the workload's decode rate."""
    scheduled_s: float | None = None
    """When the engine first scheduled it (a trace span's view); ``None``: at its start."""
    cached_tokens: int = 0
    """Of its prompt, the tokens the engine read from its prefix cache, not computed."""

    def token_times(self, decode_tokens_per_s: float) -> list[float]:
        """Arrival of each streamed token after the first (the first comes with prefill)."""
        if self.token_s is not None:
            return self.token_s[1:]
        step = 1.0 / decode_tokens_per_s
        return [self.first_token_s + k * step for k in range(1, self.completion_tokens)]


@dataclass(slots=True)
class Workload:
    spec: WorkloadSpec | Any
    """What generated it: a :class:`WorkloadSpec`, or the serving engine's spec."""
    requests: list[SyntheticRequest]
    samples: list[tuple[float, str, float, float]] = field(default_factory=list)
    """``(time_s, gpu, power_w, energy_j)`` in time order."""

    def trace_rows(self) -> tuple[list[PowerRow], list[RequestRow]]:
        """The trace as ``attribute`` reads it, without a round trip through files."""
        power = [PowerRow(t, g, p, e) for t, g, p, e in self.samples]
        requests = [
            RequestRow(
                r.id,
                r.model,
                r.start_s,
                r.end_s,
                r.first_token_s,
                r.prompt_tokens,
                r.completion_tokens,
                "ok",
                r.cached_tokens or None,
            )
            for r in self.requests
        ]
        return power, requests

    def write(self, directory: Path) -> None:
        """Write the contract's power and requests CSVs."""
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "power.csv").open("w", encoding="utf-8") as f:
            f.write(",".join(POWER_COLUMNS) + "\n")
            for t, g, p, e in self.samples:
                f.write(f"{t:.3f},{g},{p:.2f},{e:.3f}\n")
        with (directory / "requests.csv").open("w", encoding="utf-8") as f:
            f.write(",".join(REQUEST_COLUMNS) + "\n")
            for r in self.requests:
                f.write(
                    f"{r.id},{r.model},{r.start_s:.4f},{r.end_s:.4f},{r.first_token_s:.4f},"
                    f"{r.prompt_tokens},{r.completion_tokens},ok,{r.cached_tokens or ''}\n"
                )


def _arrivals(spec: WorkloadSpec, rnd: random.Random) -> list[float]:
    """Poisson arrivals; when bursty, the rate swings between bursts and quiet spells."""
    out: list[float] = []
    t = 0.0
    while True:
        phase = (t / 20.0) % 1.0 if spec.bursty else 0.5
        rate = spec.rps * (2.2 if phase < 0.35 else 0.25 if phase > 0.7 else 1.0)
        t += rnd.expovariate(max(rate, 1e-9))
        if t >= spec.duration_s:
            return out
        out.append(t + spec.standby_lead_s)


def generate(spec: WorkloadSpec) -> Workload:
    """A deterministic workload for ``spec`` (same seed, same trace)."""
    rnd = random.Random(spec.seed)
    reqs: list[SyntheticRequest] = []
    for i, a in enumerate(_arrivals(spec, rnd)):
        lo, hi = spec.prompt_tokens
        prompt = int(math.exp(rnd.uniform(math.log(lo), math.log(hi))))
        lo, hi = spec.completion_tokens
        completion = int(math.exp(rnd.uniform(math.log(lo), math.log(hi))))
        ttft = 0.02 + prompt / spec.prefill_tokens_per_s
        ft = a + ttft
        end = ft + (completion - 1) / spec.decode_tokens_per_s + 0.005
        reqs.append(SyntheticRequest(f"req-{i:05d}", a, ft, end, prompt, completion))
    # Piecewise-constant contributions between consecutive request events.
    cuts = sorted(
        {
            0.0,
            spec.standby_lead_s + spec.duration_s + 30.0,
            *(t for r in reqs for t in (r.start_s, r.first_token_s, r.end_s)),
        }
    )
    total_w: list[float] = []  # dynamic watts over all GPUs in [cuts[k], cuts[k+1])
    for a, b in itertools.pairwise(cuts):
        mid = (a + b) / 2.0
        active = [r for r in reqs if r.start_s <= mid < r.end_s]
        discount = 1.0 / (1.0 + spec.batch_discount * (len(active) - 1)) if active else 1.0
        watts = 0.0
        for r in active:
            if mid < r.first_token_s:
                base = spec.prefill_j_per_token * r.prompt_tokens / (r.first_token_s - r.start_s)
            else:
                base = spec.decode_j_per_token * spec.decode_tokens_per_s
            c = base * discount
            r.truth_j += c * (b - a)
            if mid < r.first_token_s:
                r.truth_prefill_j += c * (b - a)
            watts += c
        total_w.append(watts)
    rnd_noise = random.Random(spec.seed + 1)
    samples: list[tuple[float, str, float, float]] = []
    step = 1.0 / spec.sample_hz
    energy = [0.0] * spec.gpus
    n = int((spec.standby_lead_s + spec.duration_s + 5.0) * spec.sample_hz)
    prev_t = 0.0
    for k in range(n + 1):
        t = k * step
        for g in range(spec.gpus):
            energy[g] += _integral(cuts, total_w, prev_t, t) / spec.gpus + spec.idle_w * (
                t - prev_t
            )
            i = max(0, bisect.bisect_right(cuts, t) - 1)
            p = spec.idle_w + (total_w[i] if i < len(total_w) else 0.0) / spec.gpus
            noisy = max(0.0, p + rnd_noise.gauss(0.0, spec.noise_w))
            samples.append((spec.start_s + t, str(g), noisy, 1000.0 + energy[g]))
        prev_t = t
    for r in reqs:
        r.start_s += spec.start_s
        r.first_token_s += spec.start_s
        r.end_s += spec.start_s
    return Workload(spec, reqs, samples)


def _integral(cuts: list[float], watts: list[float], a: float, b: float) -> float:
    """Exact integral of the piecewise-constant dynamic power over [a, b]."""
    if b <= a:
        return 0.0
    total = 0.0
    i = max(0, bisect.bisect_right(cuts, a) - 1)
    while i < len(watts) and cuts[i] < b:
        lo, hi = max(a, cuts[i]), min(b, cuts[i + 1])
        if hi > lo:
            total += watts[i] * (hi - lo)
        i += 1
    return total
