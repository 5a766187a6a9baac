"""The sidecar's instructions per request, counted by cachegrind: a figure load cannot move.

``python -m bench.instructions [--variant nosim] [--plain] [--n 300] [--tree PATH]``
runs the sidecar (``bench.variant_sidecar``, simulated GPU sampled once a
second) under ``valgrind --tool=cachegrind`` twice in front of the stand-in
upstream: once with only the warm-up load (100 requests), once with ``n`` more,
32 at a time (20-token streams, or plain requests with ``--plain``). The
difference of the two runs' instruction counts over ``n`` is the sidecar's
instructions per request, start-up, shut-down and warm-up cancelled out.

CPU time on this 2-core machine moves by a tenth from one run to the next
(:mod:`bench.cpu_split`), so two versions of a hot path cannot be told apart
by it; their instruction counts can, within a few per cent (what varies is
how many requests one socket read or one sampler turn carries). ``--tree``
measures another checkout (a ``git worktree`` of an older commit) with this
tree's harness, for an A/B in one sitting. Instructions are not time: an
allocation or a cache miss costs more than an add; use it to compare versions
of the same code, and :mod:`bench.cpu_split` for microseconds.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import python  # noqa: E402
from bench.procs import Harness, start_tree_sidecar  # noqa: E402

WARM = 100
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def instructions(tree: Path, variant: str, *, plain: bool, n: int) -> int:
    """Instructions of one sidecar run under cachegrind that served ``WARM + n`` requests."""
    with Harness("instructions-") as h:
        log = h.tmp / "cachegrind.log"
        command = [
            "valgrind", "--tool=cachegrind", "--cache-sim=no",
            "--cachegrind-out-file=/dev/null", f"--log-file={log}",
            python(), "-m", "bench.variant_sidecar", variant,
        ]  # fmt: skip
        proc, load = start_tree_sidecar(h, tree, command, timeout_s=300)
        for count in (WARM, n):
            if count:
                load(count, plain)
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
        found = _REFS.search(log.read_text())
        if found is None:
            raise SystemExit(f"no instruction count in {log}")
        return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--variant", default="nosim", choices=("full", "nosim", "nometer"))
    parser.add_argument("--plain", action="store_true", help="plain requests, not streams")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure")
    args = parser.parse_args()
    tree = args.tree.resolve()
    base = instructions(tree, args.variant, plain=args.plain, n=0)
    loaded = instructions(tree, args.variant, plain=args.plain, n=args.n)
    what = "plain request" if args.plain else "20-token stream"
    per = (loaded - base) / args.n
    print(f"{tree} {args.variant}: {per / 1000:,.0f}k instructions per {what} "
          f"({base:,} warm-only, {loaded:,} with {args.n} more)")  # fmt: skip


if __name__ == "__main__":
    main()
