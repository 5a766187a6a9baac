"""Traces mode's hold: delay to a final figure, and memory per held slot (in-process).

``delay``: a simulated vLLM (Poisson arrivals, 1 per s, for 300 s; generation lengths drawn
from ``--durations``) beside the meter in ``observer+traces`` mode: the observer's 1 Hz scrape
gives the running gauge and the requests finished since the last scrape, and each request's
span arrives 5 s after its end (vLLM's batch exporter). A request's figure is final once every
slot it ran in has settled (every request the count saw there reported, plus the 6 s grace) or
been claimed (30 s after the slot's end, a co-runner still running weighing as a stand-in), so
the delay is at most about 30 s whatever the length of the generations it ran beside; the
unattributed share is what stand-ins kept that no span took where the count said the slot was
serving (0 if every stand-in was for a request that ran there). ``memory``: bytes per held slot
(0.1 s of the 15-minute hold, whatever the GPUs and the sample rate), empty and with requests
placed in it (tracemalloc).

    .venv/bin/python bench/held_bench.py [--durations 0.07,0.5,2,8,30]

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tracemalloc
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.ledger.held import HeldRequest, HeldSlots, span_request
from sidecar.ledger.pieces import Books
from sidecar.meter import FixedIntensity, Meter
from sidecar.power.base import GpuInfo, PowerSample
from sidecar.traces.span import RequestSpan

EXPORT_DELAY_S = 5.0


def delay(durations: list[float], seed: int = 7) -> dict[str, float]:
    rng = random.Random(seed)
    now = [0.0]
    final_at: dict[str, float] = {}
    meter = Meter(
        [GpuInfo("0", "GPU-bench", "bench")],
        clock=lambda: now[0],
        idle_watts={"0": 80.0},
        intensity=FixedIntensity(400.0, "none", "fixed"),
        traces_hold_s=900.0,
        running_from="observer",
        on_finished=lambda f: final_at.update({f.id: final_at.get(f.id, now[0])}),
    )
    reqs: list[tuple[str, float, float, float]] = []
    t = 1.0
    while t < 300.0:
        reqs.append((f"r{len(reqs)}", t, t + 0.05, t + rng.choice(durations)))
        t += rng.expovariate(1.0)
    sent: set[str] = set()
    step = 0
    horizon = max(e for *_, e in reqs) + EXPORT_DELAY_S + 20.0
    while now[0] < horizon:
        step += 1
        now[0] = round(step * 0.1, 6)
        running = sum(1 for _, s, _, e in reqs if s <= now[0] < e)
        meter.on_samples([PowerSample(now[0], "0", 100.0 + 20.0 * running)])
        if step % 10 == 0:
            t0 = now[0] - 1.0
            ended = sum(1 for _, _, _, e in reqs if t0 <= e < now[0])
            meter.server_running(t0, now[0], {"m": float(running)}, {"m": float(ended)})
            meter.tick()
        for rid, s, ft, e in reqs:
            if rid not in sent and now[0] >= e + EXPORT_DELAY_S:
                sent.add(rid)
                meter.span_finished(RequestSpan(rid, "m", s, s, ft, e, 100, 50))
    ends = {rid: e for rid, _, _, e in reqs}
    delays = sorted(final_at[r] - ends[r] for r in final_at)
    measured = meter.ledger.gpu_energy_j("0")
    return {
        "held_requests": len(reqs),
        "held_final": len(final_at),
        "held_delay_s_median": round(statistics.median(delays), 2),
        "held_delay_s_p90": round(delays[int(0.9 * (len(delays) - 1))], 2),
        "held_delay_s_max": round(delays[-1], 2),
        "held_unattributed_share": round(meter.ledger.unattributed_j / measured, 6),
    }


def memory(per_slot: int, slots: int = 9000) -> float:
    held = HeldSlots(Books(), hold_s=1e9, counted=True)
    end = slots * held.slot_s
    reqs = [
        HeldRequest(
            span_request(
                f"r{i}",
                "m",
                start_s=0.0,
                first_token_s=1.0,
                end_s=end,
                prompt_work=10.0,
                completion_tokens=10.0,
                endpoint="unknown",
            ),
            0.0,
            end,
        )
        for i in range(per_slot)
    ]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(slots):
        held.add_interval(i * held.slot_s, 300.0, (i + 1) * held.slot_s, 300.0, 100.0)
    for r in reqs:
        held.place(r)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durations", default="0.07,0.5,2,8,30")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    out: dict[str, float] = delay([float(x) for x in args.durations.split(",")])
    for n in (0, 8, 64):
        out[f"held_bytes_per_slot_{n}_requests"] = round(memory(n))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
