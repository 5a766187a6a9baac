"""CPU per received span in traces mode, in-process and through a real sidecar process.

``in_process``: decode (official bindings) + request-span extraction + duplicate check +
``Meter.span_finished`` (placement in held intervals fed by a simulated GPU at 10 Hz) + the
settling of every held slot when the hold ends (no running count: the costliest case), timed
with ``time.process_time`` over exports of ``--spans-per-export`` vLLM ``llm_request`` spans.
``process``: a real ``python -m sidecar run --otlp-listen ... --power-source simulated`` is
sent the same exports over HTTP by this process; its CPU (``/proc/<pid>/stat``, all
threads) over the load, less its idle CPU over an equal quiet window, per span.
``final_delay``: how long after a request's end its energy is final (``otlp_final_delay_s_*``)
on a workload with long generations (1 to 4 minutes) beside short requests, spans sent up
to 5 s after each end (vLLM's batch exporter), the server's running count scraped each
second (``--observe``), all on a simulated clock through ``Meter``.

    .venv/bin/python bench/otlp_bench.py [--spans 20000] [--spans-per-export 100]

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from otlp_build import export, llm_request  # noqa: E402

from bench.common import cpu_s, free_port, median, percentile  # noqa: E402
from sidecar.ledger.requests import FinishedRequest  # noqa: E402
from sidecar.meter import FixedIntensity, Meter  # noqa: E402
from sidecar.power.base import GpuInfo, PowerSample  # noqa: E402
from sidecar.traces.receiver import Receiver  # noqa: E402
from sidecar.traces.span import RequestSpan  # noqa: E402


def bodies(n_spans: int, per_export: int, base_ns: int) -> list[bytes]:
    """Exports of vLLM-shaped spans, 20 requests a second, each 0.5 s long."""
    out = []
    for start in range(0, n_spans, per_export):
        spans = [
            llm_request(
                f"chatcmpl-{i:08x}",
                arrival_ns=base_ns + i * 50_000_000,
                ttft_s=0.08,
                prefill_s=0.05,
                decode_s=0.42,
            )
            for i in range(start, min(start + per_export, n_spans))
        ]
        out.append(export(*spans).SerializeToString())
    return out


def in_process(n_spans: int, per_export: int) -> dict[str, float]:
    gpu = GpuInfo(gpu="0", uuid="GPU-bench", name="bench")
    now = [0.0]
    finished: list[FinishedRequest] = []
    meter = Meter(
        [gpu],
        clock=lambda: now[0],
        intensity=FixedIntensity(400.0, "none", "fixed"),
        traces_hold_s=900.0,
        on_finished=finished.append,
    )
    wall_offset_s = 1_796_000_000.0
    duration_s = n_spans * 0.05 + 1.0
    # samples at 10 Hz over the whole stretch the spans cover
    meter.on_samples(
        PowerSample(time_s=t / 10, gpu="0", power_w=200.0 + (t % 7))
        for t in range(int(duration_s * 10))
    )
    now[0] = duration_s
    meter.tick()
    receiver = Receiver(meter.span_finished, to_monotonic_s=lambda s: s - wall_offset_s)
    data = bodies(n_spans, per_export, round(wall_offset_s * 1e9))
    t0 = time.process_time()
    for body in data:
        receiver._take(receiver._decode(body, "application/x-protobuf", None))
    intake = time.process_time() - t0
    meter.flush()  # the hold ends: every slot settles, every request is handed out
    cpu = time.process_time() - t0
    decode_t0 = time.process_time()
    for body in data:
        receiver._decode(body, "application/x-protobuf", None)
    decode_cpu = time.process_time() - decode_t0
    return {
        "otlp_cpu_us_per_span_in_process": round(cpu / n_spans * 1e6, 2),
        "otlp_intake_cpu_us_per_span": round(intake / n_spans * 1e6, 2),
        "otlp_settle_cpu_us_per_span": round((cpu - intake) / n_spans * 1e6, 2),
        "otlp_decode_cpu_us_per_span": round(decode_cpu / n_spans * 1e6, 2),
        "otlp_spans_accepted": receiver.spans["accepted"],
        "otlp_requests_final": len(finished),
        "otlp_joules_booked": round(sum(f.energy_j for f in finished), 3),
    }


def final_delay(duration_s: float = 600.0, seed: int = 11) -> dict[str, float]:
    """Seconds from each request's end to its final figure: two short requests a second
    (0.3 to 3 s) and a long generation every 15 s (60 to 240 s), each span sent up to
    5 s after its end, the running count scraped each second; the clock runs on past
    the last end until every request is final (the hold is 15 minutes)."""
    rnd = random.Random(seed)
    runs: list[tuple[float, float, int]] = []  # (start, end, completion tokens)
    t = 1.0
    while t < duration_s:
        length = rnd.uniform(0.3, 3.0)
        runs.append((t, t + length, round(30 * length)))
        t += rnd.expovariate(2.0)
    for start in range(5, int(duration_s), 15):
        length = rnd.uniform(60.0, 240.0)
        runs.append((float(start), start + length, round(30 * length)))
    spans = sorted((end + rnd.uniform(0.0, 5.0), i) for i, (_, end, _) in enumerate(runs))
    now = [0.0]
    final_at: dict[str, float] = {}
    meter = Meter(
        [GpuInfo(gpu="0", uuid="GPU-bench", name="bench")],
        clock=lambda: now[0],
        idle_watts={"0": 100.0},
        intensity=FixedIntensity(400.0, "none", "fixed"),
        traces_hold_s=900.0,
        running_from="observer",
        on_finished=lambda f: _first(final_at, f.id, now[0]),
    )
    starts, ends = sorted(a for a, _, _ in runs), sorted(b for _, b, _ in runs)
    nxt, step, last_scrape = 0, 0, 0.0
    while len(final_at) < len(runs) and now[0] < ends[-1] + 960.0:
        step += 1
        now[0] = step / 10
        busy = bisect.bisect_right(starts, now[0]) - bisect.bisect_right(ends, now[0])
        meter.on_samples([PowerSample(time_s=now[0], gpu="0", power_w=150.0 + 10.0 * busy)])
        while nxt < len(spans) and spans[nxt][0] <= now[0]:
            i = spans[nxt][1]
            a, b, tokens = runs[i]
            meter.span_finished(RequestSpan(f"r{i}", "m", a, a, a + 0.1, b, 100, tokens))
            nxt += 1
        if step % 10 == 0:
            ended = bisect.bisect_right(ends, now[0]) - bisect.bisect_right(ends, last_scrape)
            meter.server_running(last_scrape, now[0], {"m": busy}, {"m": ended})
            last_scrape = now[0]
            meter.tick()
    meter.flush()  # what is still held at the end (none, with the clock run on)
    delays = [final_at[f"r{i}"] - end for i, (_, end, _) in enumerate(runs) if f"r{i}" in final_at]
    return {
        "otlp_final_delay_s_p50": round(median(delays), 2),
        "otlp_final_delay_s_p90": round(percentile(delays, 0.9), 2),
        "otlp_final_delay_s_max": round(max(delays), 2),
        "otlp_final_delay_requests": len(delays),
    }


def _first(seen: dict[str, float], key: str, value: float) -> None:
    seen.setdefault(key, value)


async def through_process(n_spans: int, per_export: int) -> dict[str, float]:
    import aiohttp

    port, mport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ENERGY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--otlp-listen", f"127.0.0.1:{port}",
         "--power-source", "simulated", "--metrics-listen", f"127.0.0.1:{mport}",
         "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"http://127.0.0.1:{mport}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            data = bodies(n_spans, per_export, time.time_ns() - round(n_spans * 0.05 * 1e9))
            await asyncio.sleep(1.0)
            c0, t0 = cpu_s(proc.pid), time.monotonic()
            for body in data:
                async with s.post(
                    f"http://127.0.0.1:{port}/v1/traces",
                    data=body,
                    headers={"Content-Type": "application/x-protobuf"},
                ) as r:
                    assert r.status == 200, r.status
                    await r.read()
            busy_cpu, busy_s = cpu_s(proc.pid) - c0, time.monotonic() - t0
            c1 = cpu_s(proc.pid)
            await asyncio.sleep(busy_s)
            idle_cpu = cpu_s(proc.pid) - c1
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "otlp_cpu_us_per_span_process": round((busy_cpu - idle_cpu) / n_spans * 1e6, 2),
        "otlp_spans_per_s_process": round(n_spans / busy_s),
    }


def main() -> None:
    from sidecar import logs

    logs.configure("warning")  # as the sidecar runs: no per-request debug lines
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spans", type=int, default=20_000)
    p.add_argument("--spans-per-export", type=int, default=100)
    args = p.parse_args()
    out = {"spans": args.spans, "spans_per_export": args.spans_per_export}
    out.update(in_process(args.spans, args.spans_per_export))
    out.update(final_delay())
    out.update(asyncio.run(through_process(args.spans, args.spans_per_export)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
