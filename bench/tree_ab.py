"""Two checkouts of the sidecar side by side under one interleaved load: loop stalls and CPU.

``python -m bench.tree_ab OLD_TREE [--rounds 6] [--plane relay]`` starts one stand-in
upstream and, in front of it, the sidecar from ``OLD_TREE`` (a checkout, for example
``git worktree add /tmp/old 8c31678``) and from this tree, both under this tree's
``bench.lag_sidecar`` probe with every callback timed (``LAG_CALLBACKS=1``). Each round
sends 100 steady then 100 simultaneous 20-token streams through the upstream directly
and through each sidecar in turn, so a neighbour's load hits a round, not a tree. It
prints per tree: CPU per stream (the process's, probe included: compare the two, not
against other benches), added p50 over the direct path, the loop thread's longest busy
stretch between two 1 ms ticks, and the slowest callbacks by name: which code held the
chunks. A measurement for one change, not a figure for the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, median, python  # noqa: E402
from bench.procs import Harness, LoadGen, run_args, start_upstream, wait_http  # noqa: E402

CHAT = "/v1/chat/completions"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(tree: Path, tag: str, tmp: Path, up_port: int, plane: str) -> tuple[Any, int]:
    """``tree``'s sidecar under this tree's probe (copied in, so both measure alike)."""
    probe_dir = tmp / f"probe-{tag}" / "bench"
    probe_dir.mkdir(parents=True)
    (probe_dir / "__init__.py").write_text("")
    shutil.copy(ROOT / "bench" / "lag_sidecar.py", probe_dir / "lag_sidecar.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ENERGY_")}
    env["PYTHONPATH"] = str(tree)  # the probe's package comes first: it is the cwd
    env["LAG_CALLBACKS"] = "1"
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [python(), "-m", "bench.lag_sidecar", str(tmp / f"lag-{tag}.json"),
         *run_args(up_port, port, mport), "--data-plane", plane],
        cwd=probe_dir.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{mport}/healthz", proc, f"the sidecar ({tag})")
    return proc, port


def run(old: Path, rounds: int, plane: str) -> dict[str, Any]:
    with Harness("tree-ab-") as h:
        tmp, procs = h.tmp, h.procs
        up, up_port = start_upstream(tmp)
        procs.append(up)
        side = {}
        for tag, tree in (("old", old), ("new", ROOT)):
            proc, port = start(tree, tag, tmp, up_port, plane)
            procs.append(proc)
            side[tag] = (proc, port)
        targets = {"direct": f"http://127.0.0.1:{up_port}{CHAT}"}
        targets |= {t: f"http://127.0.0.1:{port}{CHAT}" for t, (_, port) in side.items()}
        gen = h.gen = LoadGen(tmp)
        common = {"cmd": "latency", "targets": targets, "concurrency": 100,
                  "delay": 0.03, "max_tokens": 20}  # fmt: skip
        gen.call(**common, rounds=1)  # warm
        for t in side:
            (tmp / f"lag-{t}.reset").touch()
        time.sleep(1.2)
        cpu0 = {t: cpu_s(p.pid) for t, (p, _) in side.items()}
        added: dict[str, dict[str, list[float]]] = {"steady": {}, "burst": {}}
        streams = 0
        for _ in range(rounds):
            for kind in ("steady", "burst"):
                extra = {"per_worker": 2, "stagger_s": 0.66} if kind == "steady" else {}
                times = gen.call(**common, rounds=1, **extra)["times_s"]
                base = median(times["direct"])
                for t in side:
                    added[kind].setdefault(t, []).append((median(times[t]) - base) * 1e3)
                streams += len(times["old"])
        time.sleep(1.3)  # the probes write once a second
        out: dict[str, Any] = {}
        for t, (p, _) in side.items():
            lag = json.loads((tmp / f"lag-{t}.json").read_text())
            out[t] = {
                "cpu_us_per_stream": 1e6 * (cpu_s(p.pid) - cpu0[t]) / streams,
                "added_p50_ms": {k: median(v[t]) for k, v in added.items()},
                "busy_max_ms": lag["busy_max_ms"],
                "busy_over_5ms": lag["busy_over_5ms"],
                "gc_max_ms": max(g["max_ms"] for g in lag["gc"].values()),
                "slowest": lag["slow_callbacks"][:5],
            }
        return {"rounds": rounds, "plane": plane, "streams": streams, "trees": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("old", type=Path, help="the other checkout (its repository root)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--plane", default="relay", choices=("relay", "aiohttp"))
    args = parser.parse_args()
    result = run(args.old.resolve(), args.rounds, args.plane)
    print(f"{result['plane']} plane, {result['rounds']} rounds, {result['streams']} streams each")
    for tag, r in result["trees"].items():
        slowest = ", ".join(f"{ms:.1f} {name[:40]}" for ms, name in r["slowest"])
        print(
            f"  {tag}: {r['cpu_us_per_stream']:.0f} us/stream; added p50 steady"
            f" {r['added_p50_ms']['steady']:.2f}, burst {r['added_p50_ms']['burst']:.2f} ms;"
            f" busy max {r['busy_max_ms']:.1f} ms, {r['busy_over_5ms']} over 5 ms;"
            f" gc max {r['gc_max_ms']:.1f} ms\n    slowest callbacks (ms): {slowest}"
        )


if __name__ == "__main__":
    main()
