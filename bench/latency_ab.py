"""Added latency of the two data planes side by side, repeated and interleaved.

``python -m bench.latency_ab [--rounds N] [--streams 100] [--nice]`` starts one
stand-in upstream and, in front of it, nginx, the sidecar on each data plane
(``aiohttp`` and ``relay``, both under ``bench.lag_sidecar``'s event-loop
probe) and the bare httptools relay. Each round runs 100 streams through every
path in turn (direct first), steady (100 in flight throughout) then burst (100
sent at once); a path's added latency in a round is its median stream time
minus the direct path's in the same round, so a neighbour's load hits a round,
not a path. The figure is the median over rounds, beside the lowest and
highest round: on a shared 2-core box one round can be off by tens of
milliseconds, and only the spread says whether a gap between paths is real.
Beside it, each sidecar's longest stalls of its own event loop (CPU its loop
thread used between two 1 ms ticks), which is what holds chunks whatever
the neighbours do. ``--nice`` raises the priority of every process it starts
(root only), to shield the figures from the neighbours' load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import median  # noqa: E402
from bench.procs import (  # noqa: E402
    Harness,
    LoadGen,
    start_nginx,
    start_relay,
    start_sidecar,
    start_upstream,
)

CHAT = "/v1/chat/completions"
DELAY_S = 0.03
TOKENS = 20


def run(rounds: int, streams: int) -> dict[str, Any]:
    """Per path and kind (steady, burst): added p50 of every round, and the sidecars' stalls."""
    with Harness("latency-ab-") as h:
        tmp, procs = h.tmp, h.procs
        up, up_port = start_upstream(tmp)
        procs.append(up)
        ng, ng_port = start_nginx(tmp, up_port)
        procs.append(ng)
        urls = {"direct": up_port, "nginx": ng_port}
        lag: dict[str, Path] = {}
        for plane in ("aiohttp", "relay"):
            lag[plane] = tmp / f"lag-{plane}.json"
            proc, port, _ = start_sidecar(
                tmp, up_port, name=plane, data_plane=plane, lag_out=lag[plane]
            )
            procs.append(proc)
            urls[plane] = port
        bare, bare_port = start_relay(tmp, up_port)
        procs.append(bare)
        urls["bare_relay"] = bare_port
        targets = {k: f"http://127.0.0.1:{p}{CHAT}" for k, p in urls.items()}
        gen = h.gen = LoadGen(tmp)
        common = {
            "cmd": "latency",
            "targets": targets,
            "concurrency": streams,
            "delay": DELAY_S,
            "max_tokens": TOKENS,
        }
        gen.call(**common, rounds=1)  # warm: every path's connection pool filled
        for path in lag.values():
            path.with_suffix(".reset").touch()
        time.sleep(1.2)
        added: dict[str, dict[str, list[float]]] = {"steady": {}, "burst": {}}
        stream_s = (TOKENS + 2) * DELAY_S
        for _ in range(rounds):
            for kind in ("steady", "burst"):
                extra = {"per_worker": 2, "stagger_s": stream_s} if kind == "steady" else {}
                r = gen.call(**common, rounds=1, **extra)
                times: dict[str, list[float]] = r["times_s"]
                if any(r["errors"].values()):
                    raise RuntimeError(f"streams failed: {r['errors']}")
                base = median(times["direct"])
                for target, ts in times.items():
                    if target != "direct":
                        added[kind].setdefault(target, []).append((median(ts) - base) * 1e3)
        time.sleep(1.2)  # the probes write once a second
        stalls = {k: json.loads(p.read_text()) for k, p in lag.items()}
        return {"added_ms": added, "stalls": stalls, "rounds": rounds, "streams": streams}


def report(result: dict[str, Any]) -> str:
    lines = [
        f"added p50 (ms) over {result['rounds']} interleaved rounds of {result['streams']} streams:"
        " median [lowest, highest]"
    ]
    for kind, paths in result["added_ms"].items():
        for path, xs in paths.items():
            lines.append(
                f"  {kind:6s} {path:10s} {median(xs):7.2f}  [{min(xs):7.2f}, {max(xs):7.2f}]"
            )
    lines.append("event-loop stalls of each sidecar over the whole run (its loop thread's CPU):")
    for plane, s in result["stalls"].items():
        lines.append(
            f"  {plane:8s} busy p99 {s['busy_p99_ms']:.2f} ms, max {s['busy_max_ms']:.1f} ms,"
            f" {s['busy_over_5ms']} over 5 ms; late p99 {s['late_p99_ms']:.2f} ms,"
            f" max {s['late_max_ms']:.1f} ms; gc max"
            f" {max(g['max_ms'] for g in s['gc'].values()):.1f} ms"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--nice", action="store_true", help="raise every process's priority")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.nice:
        os.nice(-10)  # inherited by every process started below
    result = run(args.rounds, args.streams)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
