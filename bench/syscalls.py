"""The sidecar's system calls per request, counted by strace: the kernel side of a hot path.

``python -m bench.syscalls [--plain] [--n 1000] [--tree PATH]`` starts the stand-in
upstream and the sidecar (``--data-plane`` default, simulated GPU sampled once a second),
warms it with 100 requests, then counts its system calls with ``strace -f -c`` attached
twice: over an idle second and over ``n`` more requests, 32 at a time (20-token streams, or
plain requests with ``--plain``). The difference over ``n`` is the calls per request.

:mod:`bench.instructions` counts user-space instructions under cachegrind; a ``sendto``
it cannot see costs 7 to 8 µs of kernel time on this VM (a loopback send of 400 bytes in
a tight loop), about as much as a thousand lines of Python. ``--tree`` measures another
checkout with this harness, for an A/B in one sitting. Counts, not time: strace slows the
process, so calls that depend on timing (``epoll_wait``) read high.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import python  # noqa: E402
from bench.procs import Harness, start_tree_sidecar  # noqa: E402

WARM = 100
_ROW = re.compile(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$")


def _traced(pid: int, out: Path, load: object) -> dict[str, int]:
    """System calls of process ``pid`` (its threads too) while ``load()`` runs."""
    st = subprocess.Popen(
        ["strace", "-f", "-c", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL
    )
    time.sleep(1.5)  # attached to every thread before the load starts
    if callable(load):
        load()
    time.sleep(0.5)
    st.send_signal(signal.SIGINT)
    st.wait(60)
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            calls[m.group(2)] = int(m.group(1))
    return calls


def per_request(tree: Path, *, plain: bool, n: int) -> dict[str, float]:
    with Harness("syscalls-") as h:
        proc, load = start_tree_sidecar(h, tree, [python(), "-m", "sidecar"], timeout_s=120)
        load(WARM, plain)
        idle = _traced(proc.pid, h.tmp / "idle.txt", None)
        busy = _traced(proc.pid, h.tmp / "busy.txt", lambda: load(n, plain))
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {k: (busy.get(k, 0) - idle.get(k, 0)) / n for k in set(idle) | set(busy)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__)
    parser.add_argument("--plain", action="store_true", help="plain requests, not streams")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure")
    args = parser.parse_args()
    calls = per_request(args.tree.resolve(), plain=args.plain, n=args.n)
    what = "plain request" if args.plain else "20-token stream"
    for name, v in sorted(calls.items(), key=lambda kv: -kv[1]):
        if v >= 0.01:
            print(f"{name:16s} {v:6.2f} a {what}")


if __name__ == "__main__":
    main()
