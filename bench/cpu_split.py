"""The sidecar's CPU per request, split by what it does, beside nginx and the bare relay.

``python -m bench.cpu_split [--reps 2] [--data-plane relay]`` runs the sidecar
three times over (``bench.variant_sidecar``: ``full``, ``nosim`` without the
simulated GPU following requests, ``nometer`` without any metering of them)
next to nginx and the bare httptools relay, all in front of one stand-in
upstream, and measures each process's CPU (``/proc``, not a profile) per:

* batched stream: 20-token streams back to back, 32 at a time, chunks as
  fast as the upstream writes them (the quick bench's CPU figure);
* plain request: the same, not streamed;
* paced stream: 100 streams in flight, 30 ms between chunks, as a model
  server streams: every chunk a wake-up of its own, with cold caches.

Loads alternate between the paths, so a neighbour's load hits all alike.
The differences are the split: ``full - nosim`` the benchmark's simulated GPU,
``nosim - nometer`` the meter and ledger, ``nometer - bare`` the data plane
and tracking over a relay that does nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import cpu_s_many, median  # noqa: E402
from bench.procs import (  # noqa: E402
    Harness,
    LoadGen,
    nginx_pids,
    start_nginx,
    start_relay,
    start_sidecar,
    start_upstream,
)
from bench.proxy_bench import ProxyPlan, Target, cpu_figures  # noqa: E402
from bench.variant_sidecar import VARIANTS  # noqa: E402

CHAT = "/v1/chat/completions"
PACED_STREAMS = 100
PACED_PER_WORKER = 3


def run(reps: int, data_plane: str) -> dict[str, dict[str, float]]:
    """µs of CPU per request by path, for each kind of load."""
    with Harness("cpu-split-") as h:
        tmp, procs = h.tmp, h.procs
        up, up_port = start_upstream(tmp)
        procs.append(up)
        ng, ng_port = start_nginx(tmp, up_port)
        procs.append(ng)
        targets = [Target("nginx", f"http://127.0.0.1:{ng_port}{CHAT}", lambda: nginx_pids(ng))]
        for variant in VARIANTS:
            proc, port, _ = start_sidecar(
                tmp, up_port, name=variant, data_plane=data_plane, variant=variant
            )
            procs.append(proc)
            targets.append(
                Target(variant, f"http://127.0.0.1:{port}{CHAT}", (lambda p: lambda: [p])(proc.pid))
            )
        bare, bare_port = start_relay(tmp, up_port)
        procs.append(bare)
        targets.append(
            Target("bare_relay", f"http://127.0.0.1:{bare_port}{CHAT}", lambda: [bare.pid])
        )
        gen = h.gen = LoadGen(tmp)
        plan = ProxyPlan(
            streams=1200, plain=1600, reps=reps, concurrency=32, latency_rounds=1,
            latency_concurrency=PACED_STREAMS, latency_delay_s=0.03, latency_per_worker=2,
            latency_burst_rounds=1, rss_requests=0, rss_warmup=0, uvloop=False, bare=False,
        )  # fmt: skip
        out: dict[str, dict[str, float]] = {}
        for kind, stream in (("batched_stream", True), ("plain_request", False)):
            r = cpu_figures(gen, targets, plan, stream=stream)
            out[kind] = {k: v["cpu_us_per_request"] for k, v in r.items()}
        paced: dict[str, list[float]] = {t.name: [] for t in targets}
        n = PACED_STREAMS * PACED_PER_WORKER  # the ramp's streams are served too
        for rep in range(reps + 1):  # the first round warms every pool
            for t in targets:
                before = cpu_s_many(t.pids())
                gen.call(
                    cmd="latency", targets={t.name: t.url}, concurrency=PACED_STREAMS,
                    delay=0.03, max_tokens=20, rounds=1, per_worker=PACED_PER_WORKER,
                    stagger_s=22 * 0.03,
                )  # fmt: skip
                if rep:
                    paced[t.name].append((cpu_s_many(t.pids()) - before) / n * 1e6)
        out["paced_stream"] = {k: median(v) for k, v in paced.items()}
        return out


def report(out: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(out.values())))
    lines = [f"{'µs CPU per request':18s}" + "".join(f"{n:>11s}" for n in names)]
    for kind, row in out.items():
        lines.append(f"{kind:18s}" + "".join(f"{row[n]:11.0f}" for n in names))
    lines.append("split (µs): simulated GPU = full - nosim, meter+ledger = nosim - nometer,")
    lines.append("            data plane+tracking over the bare relay = nometer - bare_relay")
    for kind, row in out.items():
        lines.append(
            f"  {kind:16s} sim {row['full'] - row['nosim']:6.0f}"
            f"  meter {row['nosim'] - row['nometer']:6.0f}"
            f"  plane {row['nometer'] - row['bare_relay']:6.0f}"
            f"  full/nginx {row['full'] / row['nginx']:5.2f}"
            f"  nosim/nginx {row['nosim'] / row['nginx']:5.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--data-plane", default="relay", choices=("relay", "aiohttp"))
    args = parser.parse_args()
    print(report(run(args.reps, args.data_plane)))


if __name__ == "__main__":
    main()
