"""Proxy benchmarks, side by side with nginx: CPU per request, added latency, memory growth.

One stand-in upstream serves all paths: direct, through nginx (``proxy_buffering
off``, keep-alive upstream) and through the real sidecar process. Loads
alternate between nginx and the sidecar and repeat, so a noisy neighbour
hits both alike; CPU is each proxy's own (``/proc/<pid>/stat``), latency the
load generator's wall time per request.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import ROOT, cpu_s, cpu_s_many, median, percentile, rss_mb
from bench.procs import (
    Harness,
    LoadGen,
    nginx_pids,
    start_bare,
    start_nginx,
    start_relay,
    start_sidecar,
    start_upstream,
)

sys.path.insert(0, str(ROOT / "tests"))

from upstreams import openai_chunks  # the stand-in upstream's own chunks

CHAT = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class ProxyPlan:
    """Sizes of the proxy benchmarks (``--quick`` or full)."""

    streams: int  # 20-token streamed requests per CPU measurement and proxy
    plain: int  # non-streaming requests per CPU measurement and proxy
    reps: int  # alternations nginx/sidecar per CPU figure
    concurrency: int  # connections of the CPU loads
    latency_rounds: int
    latency_concurrency: int
    latency_delay_s: float  # seconds between the upstream's chunks in latency rounds
    latency_per_worker: int  # streams each worker runs back to back in the steady rounds
    latency_burst_rounds: int
    rss_requests: int
    rss_warmup: int  # requests before the first reading: allocator arenas and caches settle
    uvloop: bool  # also a sidecar on uvloop's event loop (the experiment)
    bare: bool  # also the bare aiohttp proxy (no metering), as the floor
    relay: bool = False  # also the bare httptools relay (bench/bare_relay.py), the other candidate
    relay_sidecar: bool = True  # also the sidecar on --data-plane relay (target "relay")
    max_tokens: int = 20  # tokens (SSE chunks) per streamed response
    ceiling_steps: tuple[int, ...] = (100, 200, 400, 700)  # streams in flight, chunk ceiling
    ceiling_added_ms: float = 5.0  # the ceiling: added p50 past this
    inflight_streams: int = 1000  # streams held open at once for the resident memory figure


@dataclass(slots=True)
class Target:
    name: str
    url: str
    pids: Callable[[], Sequence[int]]


def _cpu_run(
    gen: LoadGen, target: Target, *, n: int, concurrency: int, stream: bool
) -> tuple[float, int, float]:
    """(CPU seconds, requests served, wall seconds) of one load through ``target``."""
    pids = target.pids()
    before = cpu_s_many(pids)
    r = gen.call(
        cmd="load",
        url=target.url,
        n=n,
        concurrency=concurrency,
        stream=stream,
        max_tokens=20,
    )
    after = cpu_s_many(pids)
    if r["errors"]:
        raise RuntimeError(f"{r['errors']} of {n} requests failed through {target.name}")
    return after - before, int(r["ok"]), float(r["elapsed_s"])


def cpu_figures(
    gen: LoadGen, targets: Sequence[Target], plan: ProxyPlan, *, stream: bool
) -> dict[str, dict[str, float]]:
    """CPU µs per request for each target, alternating targets ``plan.reps`` times (in turn first)."""
    n = plan.streams if stream else plan.plain
    for t in targets:  # warm: connections open, code paths hot
        _cpu_run(gen, t, n=max(200, n // 10), concurrency=plan.concurrency, stream=stream)
    acc = {t.name: [0.0, 0, 0.0] for t in targets}
    for rep in range(plan.reps):
        # each rep starts one target later: two identical sidecars measured 14 % apart per
        # batched stream by their place in a fixed order (an A/B run both ways round)
        k = rep % len(targets)
        for t in [*targets[k:], *targets[:k]]:
            cpu, ok, wall = _cpu_run(gen, t, n=n, concurrency=plan.concurrency, stream=stream)
            a = acc[t.name]
            a[0] += cpu
            a[1] += ok
            a[2] += wall
    return {
        name: {
            "cpu_us_per_request": cpu / ok * 1e6,
            "requests": ok,
            "requests_per_s": ok / wall,
            "cpu_s": cpu,
        }
        for name, (cpu, ok, wall) in ((k, (v[0], int(v[1]), v[2])) for k, v in acc.items())
    }


def latency_figures(
    gen: LoadGen, direct_url: str, targets: Sequence[Target], plan: ProxyPlan
) -> dict[str, dict[str, float]]:
    """Median total time of 100 concurrent streams per path, minus direct; steady and burst.

    Steady: 100 streams in flight throughout (workers loop, starts spread over
    one stream's duration). Burst: 100 streams sent at the same instant, so the
    figure is dominated by how long the proxy takes to start 100 requests.
    Rounds interleave the paths (direct, nginx, sidecar, ...) so drift in the
    machine's load hits every path alike.
    """
    urls = {"direct": direct_url, **{t.name: t.url for t in targets}}
    stream_s = (plan.max_tokens + 2) * plan.latency_delay_s
    common = {
        "cmd": "latency",
        "targets": urls,
        "concurrency": plan.latency_concurrency,
        "delay": plan.latency_delay_s,
        "max_tokens": plan.max_tokens,
    }
    gen.call(**common, rounds=1)  # warm: connection pools of every path filled
    steady = gen.call(
        **common, rounds=plan.latency_rounds, per_worker=plan.latency_per_worker, stagger_s=stream_s
    )
    burst = gen.call(**common, rounds=plan.latency_burst_rounds)
    out: dict[str, dict[str, float]] = {}
    for kind, r in (("", steady), ("burst_", burst)):
        times: dict[str, list[float]] = r["times_s"]
        base = median(times["direct"])
        for name, ts in times.items():
            row = out.setdefault(name, {})
            row[f"{kind}p50_ms"] = median(ts) * 1e3
            row[f"{kind}p90_ms"] = percentile(ts, 0.9) * 1e3
            row[f"{kind}added_p50_ms"] = (median(ts) - base) * 1e3
            row[f"{kind}errors"] = float(r["errors"][name])
            row[f"{kind}n"] = float(len(ts))
    return out


def chunks_per_stream(max_tokens: int) -> int:
    """SSE events the stand-in upstream writes for one streamed request (include_usage on)."""
    return len(openai_chunks("bench-model", max_tokens, True))


def ceiling_figures(
    gen: LoadGen, direct_url: str, proxy_url: str, plan: ProxyPlan, pid: int
) -> dict[str, float]:
    """Chunks per second the proxy relays before its added p50 passes ``ceiling_added_ms``.

    Steady rounds (as :func:`latency_figures`) at each step of streams in flight,
    direct, then proxy; the chunk rate of a step is its streams times
    the chunks of a stream over the direct path's median stream time. The
    ceiling is interpolated between the last step under the limit and the
    first over it (from zero if the first is over); ``bounded`` is 0 when no
    step passed the limit (the figure is then a lower bound: the last rate).
    Beside each step, the sidecar's (``pid``) CPU as a share of one core over
    its round (ramp included): well under 100 % at the ceiling means the
    machine (load generator, upstream) gave out before the sidecar's core did.
    """
    stream_s = (plan.max_tokens + 2) * plan.latency_delay_s
    per_stream = chunks_per_stream(plan.max_tokens)
    points: list[tuple[float, float]] = [(0.0, 0.0)]
    out: dict[str, float] = {}
    for conc in plan.ceiling_steps:
        times: dict[str, list[float]] = {}
        for name, url in (("direct", direct_url), ("proxy", proxy_url)):
            cpu0, t0 = cpu_s(pid), time.monotonic()
            r = gen.call(
                cmd="latency",
                targets={name: url},
                concurrency=conc,
                delay=plan.latency_delay_s,
                max_tokens=plan.max_tokens,
                rounds=1,
                per_worker=2,
                stagger_s=stream_s,
            )
            if r["errors"][name] or not r["times_s"][name]:
                raise RuntimeError(f"{r['errors'][name]} streams failed at {conc} in flight")
            times[name] = r["times_s"][name]
        out[f"cpu_percent_at_{conc}"] = (cpu_s(pid) - cpu0) / (time.monotonic() - t0) * 100
        direct = median(times["direct"])
        added_ms = (median(times["proxy"]) - direct) * 1e3
        rate = conc * per_stream / direct
        out[f"added_p50_ms_at_{conc}"] = added_ms
        out[f"chunks_per_s_at_{conc}"] = rate
        if added_ms > plan.ceiling_added_ms:
            r0, a0 = points[-1]
            frac = (plan.ceiling_added_ms - a0) / (added_ms - a0) if added_ms > a0 else 0.0
            out["max_chunks_per_s"] = r0 + frac * (rate - r0)
            out["bounded"] = 1.0
            return out
        points.append((rate, added_ms))
    out["max_chunks_per_s"] = points[-1][0]
    out["bounded"] = 0.0
    return out


def inflight_rss_figures(gen: LoadGen, pid: int, url: str, plan: ProxyPlan) -> dict[str, float]:
    """Resident memory of the sidecar with ``inflight_streams`` streams open at once.

    Every stream starts at the same instant and lasts a few seconds (0.1 s
    between chunks), so all are in flight together; RSS is read every 50 ms
    meanwhile and the highest reading is the figure, beside the reading before.
    """
    before = rss_mb(pid)
    gen.send(
        cmd="latency",
        targets={"proxy": url},
        concurrency=plan.inflight_streams,
        delay=0.1,
        max_tokens=plan.max_tokens,
        rounds=1,
        pause_s=0.0,
    )
    peak = before
    while not gen.ready(0.05):
        peak = max(peak, rss_mb(pid))
    r = gen.receive("latency")
    if r["errors"]["proxy"]:
        raise RuntimeError(f"{r['errors']['proxy']} of {plan.inflight_streams} streams failed")
    return {"rss_before_mb": before, "rss_peak_mb": peak, "streams": float(plan.inflight_streams)}


def rss_figures(gen: LoadGen, pid: int, url: str, n: int, warmup: int) -> dict[str, float]:
    """Resident memory of the sidecar before and after ``n`` short requests, per 100k.

    Short requests alternate streamed and plain (5 tokens). The first
    ``warmup`` requests settle the allocator (RSS rises over the first ten
    thousand or so, then stays flat), so the figure is steady-state growth.
    """
    gen.call(cmd="load", url=url, n=warmup, concurrency=32, mixed=True, max_tokens=5)
    time.sleep(2.0)  # let the ledger finalise (samples past the ends) before the first reading
    before = rss_mb(pid)
    points = [(0, before)]
    step = max(1, n // 5)
    done = 0
    while done < n:
        k = min(step, n - done)
        r = gen.call(cmd="load", url=url, n=k, concurrency=32, mixed=True, max_tokens=5)
        if r["errors"]:
            raise RuntimeError(f"{r['errors']} of {k} requests failed in the memory run")
        done += k
        points.append((done, rss_mb(pid)))
    time.sleep(2.0)
    after = rss_mb(pid)
    # least-squares slope over the steps: one allocator jump weighs less than in end-minus-start
    xs = [float(x) for x, _ in points]
    ys = [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return {
        "requests": float(n),
        "rss_before_mb": before,
        "rss_after_mb": after,
        "growth_mb_per_100k": (after - before) * 100_000 / n,
        "slope_mb_per_100k": slope * 100_000,
    }


def run(plan: ProxyPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Every proxy figure, from one set of processes started and stopped here."""
    with Harness("sidecar-bench-") as h:
        tmp, procs = h.tmp, h.procs
        upstream, up_port = start_upstream(tmp)
        procs.append(upstream)
        nginx, ng_port = start_nginx(tmp, up_port)
        procs.append(nginx)
        # "proxy": the sidecar on aiohttp's data plane, as in every earlier run
        sidecar, sc_port, _sc_mport = start_sidecar(tmp, up_port, data_plane="aiohttp")
        procs.append(sidecar)
        targets = [
            Target("nginx", f"http://127.0.0.1:{ng_port}{CHAT}", lambda: nginx_pids(nginx)),
            Target("proxy", f"http://127.0.0.1:{sc_port}{CHAT}", lambda: [sidecar.pid]),
        ]
        relayed: Any = None
        if plan.relay_sidecar:  # the same sidecar on the relay data plane (sidecar/relay)
            relayed, rs_port, _ = start_sidecar(
                tmp, up_port, name="sidecar-relay", data_plane="relay"
            )
            procs.append(relayed)
            targets.append(
                Target(
                    "relay",
                    f"http://127.0.0.1:{rs_port}{CHAT}",
                    (lambda p: lambda: [p])(relayed.pid),
                )
            )
        if plan.uvloop:
            uv, uv_port, _ = start_sidecar(tmp, up_port, name="sidecar-uvloop", uvloop=True)
            procs.append(uv)
            targets.append(
                Target("proxy_uvloop", f"http://127.0.0.1:{uv_port}{CHAT}", lambda: [uv.pid])
            )
        if plan.bare:
            for uvl in (False, True) if plan.uvloop else (False,):
                bare, bare_port = start_bare(tmp, up_port, uvloop=uvl)
                procs.append(bare)
                targets.append(
                    Target(
                        "bare_aiohttp_uvloop" if uvl else "bare_aiohttp",
                        f"http://127.0.0.1:{bare_port}{CHAT}",
                        (lambda p: lambda: [p])(bare.pid),
                    )
                )
        if plan.relay:
            relay, relay_port = start_relay(tmp, up_port)
            procs.append(relay)
            targets.append(
                Target(
                    "bare_httptools",
                    f"http://127.0.0.1:{relay_port}{CHAT}",
                    (lambda p: lambda: [p])(relay.pid),
                )
            )
        gen = h.gen = LoadGen(tmp)
        # idle CPU and memory are the default data plane's (the relay): what users run
        own, own_url = (
            (relayed, targets[2].url) if relayed is not None else (sidecar, targets[1].url)
        )
        time.sleep(1.0)
        idle0 = cpu_s(own.pid)
        t0 = time.monotonic()
        time.sleep(3.0)
        idle_pct = (cpu_s(own.pid) - idle0) / (time.monotonic() - t0) * 100
        log(f"sidecar idle CPU (sampler 10 Hz + ticker): {idle_pct:.2f} % of a core")
        log("CPU per streamed request ...")
        stream = cpu_figures(gen, targets, plan, stream=True)
        log("CPU per plain request ...")
        plain = cpu_figures(gen, targets, plan, stream=False)
        log("added latency, 100 concurrent streams, interleaved rounds ...")
        direct = f"http://127.0.0.1:{up_port}{CHAT}"
        latency = latency_figures(gen, direct, targets, plan)
        log(f"chunk ceiling, {'/'.join(map(str, plan.ceiling_steps))} streams in flight ...")
        ceiling = ceiling_figures(gen, direct, targets[1].url, plan, sidecar.pid)
        relay_ceiling: dict[str, float] = {}
        if relayed is not None:
            log("chunk ceiling of the relay sidecar ...")
            relay_ceiling = ceiling_figures(gen, direct, targets[2].url, plan, relayed.pid)
        log(f"memory over {plan.rss_requests} short requests ...")
        rss = rss_figures(gen, own.pid, own_url, plan.rss_requests, plan.rss_warmup)
        log(f"memory with {plan.inflight_streams} streams in flight ...")
        inflight = inflight_rss_figures(gen, own.pid, own_url, plan)
        return {
            "memory_data_plane": "relay" if relayed is not None else "aiohttp",
            "sidecar_idle_cpu_percent": idle_pct,
            "stream": stream,
            "plain": plain,
            "latency": latency,
            "ceiling": ceiling,
            "relay_ceiling": relay_ceiling,
            "rss": rss,
            "inflight_rss": inflight,
        }
