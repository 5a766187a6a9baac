"""Where the running sidecar's CPU goes under the quick bench's batched load: cProfile.

``python -m bench.profile_sidecar [--variant full|nosim|nometer] [--plain] [--n 2000]
[--delay S] [--top 30] [--sort cumulative|tottime]`` starts the stand-in upstream and the
sidecar (``--data-plane`` default, simulated GPU) under :mod:`cProfile`, sends ``n`` requests
32 at a time (20-token streams, or plain requests with ``--plain``; ``--delay``: ``S``
seconds between a stream's chunks, as a model server paces them, where the batched default
sends a stream in one read) after 300 to warm it, stops it with SIGTERM and prints
the functions by cumulative time. ``--variant`` switches part of the work off as
:mod:`bench.variant_sidecar` does (``nosim``: the simulated GPU does not follow requests,
the benchmark's own stand-in). Profiled time is inflated (about twice on this code), so
read shares and call counts, not microseconds; :mod:`bench.cpu_split` measures those.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port, python  # noqa: E402
from bench.procs import Harness, LoadGen, run_args, start_upstream, wait_http  # noqa: E402

CHAT = "/v1/chat/completions"


def child(variant: str, out: str, argv: list[str]) -> int:
    """The sidecar's CLI with ``variant`` switched off, profiled until it exits."""
    import atexit

    from bench.variant_sidecar import switch_off
    from sidecar.cli import main

    switch_off(variant)
    profile = cProfile.Profile()

    def dump() -> None:
        profile.disable()
        profile.dump_stats(out)

    atexit.register(dump)
    sys.argv = [sys.argv[0], *argv]
    profile.enable()
    return main()


def run(variant: str, *, plain: bool, n: int, top: int, sort: str, delay: float = 0.0) -> None:
    with Harness("profile-sidecar-") as h:
        up, up_port = start_upstream(h.tmp)
        h.procs.append(up)
        port, mport = free_port(), free_port()
        out = h.tmp / "sidecar.prof"
        proc = subprocess.Popen(
            [
                python(), "-m", "bench.profile_sidecar", "--child", variant, str(out),
                *run_args(up_port, port, mport), "--log-level", "warning",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        h.procs.append(proc)
        wait_http(f"http://127.0.0.1:{mport}/healthz", proc, "the sidecar")
        gen = h.gen = LoadGen(h.tmp)
        url = f"http://127.0.0.1:{port}{CHAT}"
        for count in (300, n):  # warm, then the profiled load
            r = gen.call(
                cmd="load",
                url=url,
                n=count,
                concurrency=32,
                stream=not plain,
                max_tokens=20,
                delay=delay,
            )
        print(f"{r['ok']} requests, {r['errors']} errors, {r['elapsed_s']:.1f} s")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        pstats.Stats(str(out)).sort_stats(sort).print_stats(top)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[3], sys.argv[4:]))
    parser = argparse.ArgumentParser(prog="python -m bench.profile_sidecar")
    parser.add_argument("--variant", default="nosim", choices=("full", "nosim", "nometer"))
    parser.add_argument("--plain", action="store_true", help="plain requests, not streams")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds between a stream's chunks (paced)"
    )
    parser.add_argument("--sort", default="cumulative", choices=("cumulative", "tottime"))
    args = parser.parse_args()
    run(args.variant, plain=args.plain, n=args.n, top=args.top, sort=args.sort, delay=args.delay)


if __name__ == "__main__":
    main()
