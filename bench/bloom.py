"""A BLOOM-like deployment trace, attributed by ``attribute``: the seed's case study.

The seed (seed-facts.md): BLOOM on one instance of 16 A100 40GB, about 18
days, no batching, 230,768 requests (558 an hour on average, hourly from 93
to 3,630), GPU power of the instance 1,252 to 2,735 W in 10-minute means,
1,664 W on average (104 W a GPU), GPU energy 688 kWh: 2.98 Wh of GPU energy
per request all-in; "about 75 %" of the energy kept the model loaded, 82 %
by a fit of 10-minute energy against requests.

The trace here has that shape and is built from the seed's own figures, not
tuned to its shares:

* hours: a daily cycle with noise, one hour set to 3,630 requests and one to
  93, the rest scaled so the mean is 558 an hour; Poisson arrivals in each;
* no batching: one request at a time on all 16 GPUs (tensor and pipeline
  parallel), first come first served; a queued request is in flight (it has
  arrived at the proxy), as the contract counts it;
* a request: a prompt of 10 to 500 tokens (log-uniform) prefilled at 2,000
  tokens/s, then 1 to 48 output tokens (log-uniform) at 60 ms each;
* power per GPU: an idle (memory-resident) draw plus a constant dynamic draw
  while a request is served. The idle draw comes from the seed's lowest and
  mean 10-minute power and its lowest and mean request rates under a linear
  model (power = idle + rate x energy per request): 1,252 W at about 93/h,
  1,664 W at 558/h give 1,170 W, 73 W a GPU. The dynamic draw is then set so
  the trace's mean is 104 W a GPU, as the seed's;
* samples at 1 Hz with 1.5 W of noise per GPU, and an energy counter that
  integrates the noiseless power, as hardware counters do.

``attribute`` then estimates its own baseline from the standby samples, as it
would on a recorded trace, and splits the energy.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from typing import Any

from sidecar.attribute import attribute
from sidecar.trace import PowerRow, RequestRow

GPUS = 16
SEED_MEAN_W_PER_GPU = 1664.0 / 16
SEED_REQUESTS_PER_HOUR = 558.0
SEED_HOUR_MIN, SEED_HOUR_MAX = 93, 3630
SEED_MIN_10MIN_W, SEED_MAX_10MIN_W = 1252.0, 2735.0
SEED_WH_PER_REQUEST = 688_000.0 / 230_768
IDLE_W_PER_GPU = (
    SEED_MIN_10MIN_W
    - (SEED_HOUR_MIN / 3600.0)
    * (SEED_MEAN_W_PER_GPU * GPUS - SEED_MIN_10MIN_W)
    / ((SEED_REQUESTS_PER_HOUR - SEED_HOUR_MIN) / 3600.0)
) / GPUS
NOISE_W = 1.5
PREFILL_TOKENS_PER_S = 2000.0
DECODE_S_PER_TOKEN = 0.060


@dataclass(frozen=True, slots=True)
class BloomResult:
    hours: float
    requests: int
    mean_power_w_per_gpu_truth: float
    """The trace's own mean power (the counters'): the seed's 104 W by construction."""
    wh_per_request_truth: float
    """Counter energy / requests: what a perfect meter reports all-in."""
    wh_per_request_all_in: float
    """``attribute``'s total / requests."""
    energy_error_vs_counter: float
    """``attribute``'s total over the counters' increase, minus 1."""
    idle_share: float
    standby_share: float
    idle_share_truth: float
    fit_intercept_share: float
    """The seed's method on this trace: 10-minute energy against requests, intercept / mean."""
    baseline_w_per_gpu: float
    idle_w_per_gpu_truth: float
    no_counter_wh_per_request: float
    no_counter_idle_share: float
    no_counter_baseline_w_per_gpu: float
    min_10min_w: float
    max_10min_w: float
    dynamic_w_per_gpu_serving: float
    busy_fraction: float
    conservation_error: float
    """|sum of request energy + standby - total| / total: nothing lost or created."""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def hourly_rates(hours: int, rnd: random.Random) -> list[float]:
    """Requests per hour: daily cycle with noise, one peak hour, one trough; mean 558."""
    raw = [
        (1.0 + 0.6 * math.sin(2 * math.pi * (h % 24 - 9) / 24)) * math.exp(rnd.gauss(0.0, 0.35))
        for h in range(hours)
    ]
    peak = min(hours - 1, 14) if hours > 1 else 0
    trough = min(hours - 1, 4) if hours > 2 else None
    rest = [i for i in range(hours) if i not in (peak, trough)]
    fixed = SEED_HOUR_MAX + (SEED_HOUR_MIN if trough is not None else 0)
    budget = SEED_REQUESTS_PER_HOUR * hours - fixed
    scale = budget / sum(raw[i] for i in rest) if rest else 0.0
    rates = [max(float(SEED_HOUR_MIN), r * scale) for r in raw]
    rates[peak] = float(SEED_HOUR_MAX)
    if trough is not None:
        rates[trough] = float(SEED_HOUR_MIN)
    return rates


def build(
    hours: int, *, sample_hz: float = 1.0, seed: int = 2022, flat: bool = False
) -> tuple[list[PowerRow], list[RequestRow], dict[str, float]]:
    """Power rows, request rows and the trace's own truth (idle energy, totals)."""
    rnd = random.Random(seed)
    rates = [SEED_REQUESTS_PER_HOUR] * hours if flat else hourly_rates(hours, rnd)
    arrivals: list[float] = []
    for h, rate in enumerate(rates):
        t = h * 3600.0
        while True:
            t += rnd.expovariate(rate / 3600.0)
            if t >= (h + 1) * 3600.0:
                break
            arrivals.append(t)
    reqs: list[RequestRow] = []
    busy: list[tuple[float, float]] = []
    free_at = 0.0
    for i, a in enumerate(arrivals):
        prompt = int(math.exp(rnd.uniform(math.log(10), math.log(500))))
        out = int(math.exp(rnd.uniform(0.0, math.log(48))))
        begin = max(a, free_at)
        first = begin + prompt / PREFILL_TOKENS_PER_S
        end = first + out * DECODE_S_PER_TOKEN
        free_at = end
        busy.append((begin, end))
        reqs.append(RequestRow(f"q{i:06d}", "bloom", a, end, first, prompt, out, "ok"))
    duration = math.ceil(max(free_at, hours * 3600.0) + 30.0)  # every request ends inside
    busy_s = sum(e - b for b, e in busy)
    dyn_w = (SEED_MEAN_W_PER_GPU - IDLE_W_PER_GPU) * duration / busy_s
    starts = [b for b, _ in busy]
    cum = [0.0]  # cumulative busy time before each busy interval, for the energy counters
    for b, e in busy:
        cum.append(cum[-1] + (e - b))

    def busy_until(t: float) -> float:
        k = bisect.bisect_right(starts, t)
        if k == 0:
            return 0.0
        b, e = busy[k - 1]
        return cum[k - 1] + min(t - b, e - b)

    def serving(t: float) -> bool:
        k = bisect.bisect_right(starts, t)
        return k > 0 and t < busy[k - 1][1]

    rows: list[PowerRow] = []
    base_s = 1_650_000_000.0
    for k in range(int(duration * sample_hz) + 1):
        t = k / sample_hz
        p = IDLE_W_PER_GPU + (dyn_w if serving(t) else 0.0)
        e = 5_000_000.0 + IDLE_W_PER_GPU * t + dyn_w * busy_until(t)
        for g in range(GPUS):
            rows.append(PowerRow(base_s + t, str(g), max(0.0, p + rnd.gauss(0.0, NOISE_W)), e))
    shifted = [
        RequestRow(
            r.id,
            r.model,
            r.start_s + base_s,
            r.end_s + base_s,
            None if r.first_token_s is None else r.first_token_s + base_s,
            r.prompt_tokens,
            r.completion_tokens,
            r.status,
        )
        for r in reqs
    ]
    truth = {
        "duration_s": duration,
        "total_j": GPUS * (IDLE_W_PER_GPU * duration + dyn_w * busy_s),
        "idle_j": GPUS * IDLE_W_PER_GPU * duration,
        "dynamic_w_per_gpu": dyn_w,
        "busy_fraction": busy_s / duration,
    }
    return rows, shifted, truth


def _ten_minute_fit(
    rows: list[PowerRow], reqs: list[RequestRow], duration: float
) -> tuple[float, float, float]:
    """(min, max) 10-minute mean instance power and the seed-style intercept share."""
    bins = max(1, int(duration // 600))
    t0 = rows[0].time_s
    energy = [0.0] * bins
    first: dict[tuple[int, str], float] = {}
    last: dict[tuple[int, str], float] = {}
    for r in rows:
        b = int((r.time_s - t0) // 600)
        if b >= bins or r.energy_j is None:
            continue
        first.setdefault((b, r.gpu), r.energy_j)
        last[(b, r.gpu)] = r.energy_j
    for key, e in last.items():
        energy[key[0]] += e - first[key]
    counts = [0.0] * bins
    for q in reqs:
        b = int((q.start_s - t0) // 600)
        if 0 <= b < bins:
            counts[b] += 1
    power = [e / 600.0 for e in energy]
    n = float(bins)
    mx, my = sum(counts) / n, sum(energy) / n
    sxx = sum((x - mx) ** 2 for x in counts)
    slope = (
        sum((x - mx) * (y - my) for x, y in zip(counts, energy, strict=True)) / sxx if sxx else 0.0
    )
    intercept = my - slope * mx
    return min(power), max(power), intercept / my if my else 0.0


def sampling_sensitivity(hours: int = 2) -> dict[str, dict[str, float]]:
    """The same short trace (a flat 558 requests an hour) at 1 Hz and at 10 Hz, against the truth."""
    out: dict[str, dict[str, float]] = {}
    for hz in (1.0, 10.0):
        rows, reqs, truth = build(hours, sample_hz=hz, seed=7, flat=True)
        e = attribute(rows, reqs)["energy_joules"]
        total = float(e["total"])
        out[f"{hz:g}hz"] = {
            "idle_share": (float(e["idle_serving"]) + float(e["idle_standby"])) / total,
            "idle_share_truth": truth["idle_j"] / truth["total_j"],
            "energy_error_vs_counter": total / truth["total_j"] - 1.0,
        }
    return out


def run(hours: int = 24) -> BloomResult:
    rows, reqs, truth = build(hours)
    duration = truth["duration_s"]
    doc = attribute(rows, reqs)
    e = doc["energy_joules"]
    total = float(e["total"])
    lo, hi, share = _ten_minute_fit(rows, reqs, duration)
    attributed = sum(float(q["energy_joules"]) for q in doc["requests"])
    plain = attribute([PowerRow(r.time_s, r.gpu, r.power_w, None) for r in rows], reqs)
    pe = plain["energy_joules"]
    plain_total = float(pe["total"])
    n = len(reqs)
    return BloomResult(
        hours=float(hours),
        requests=n,
        mean_power_w_per_gpu_truth=truth["total_j"] / duration / GPUS,
        wh_per_request_truth=truth["total_j"] / n / 3600.0,
        wh_per_request_all_in=total / n / 3600.0,
        energy_error_vs_counter=total / truth["total_j"] - 1.0,
        idle_share=(float(e["idle_serving"]) + float(e["idle_standby"])) / total,
        standby_share=float(e["idle_standby"]) / total,
        idle_share_truth=truth["idle_j"] / truth["total_j"],
        fit_intercept_share=share,
        baseline_w_per_gpu=float(doc["idle_baseline_watts"]) / GPUS,
        idle_w_per_gpu_truth=IDLE_W_PER_GPU,
        no_counter_wh_per_request=plain_total / n / 3600.0,
        no_counter_idle_share=(float(pe["idle_serving"]) + float(pe["idle_standby"])) / plain_total,
        no_counter_baseline_w_per_gpu=float(plain["idle_baseline_watts"]) / GPUS,
        min_10min_w=lo,
        max_10min_w=hi,
        dynamic_w_per_gpu_serving=truth["dynamic_w_per_gpu"],
        busy_fraction=truth["busy_fraction"],
        conservation_error=abs(attributed + float(e["idle_standby"]) - total) / total,
    )
