"""Where the running sidecar's CPU goes under the quick bench's batched load: cProfile or py-spy.

``python -m bench.profile_sidecar [--variant full|nosim|nometer] [--plain] [--n 2000]
[--delay S] [--top 30] [--sort cumulative|tottime] [--py-spy OUT.txt]`` starts the stand-in
upstream and the sidecar (``--data-plane`` default, simulated GPU) under :mod:`cProfile`,
sends ``n`` requests 32 at a time (20-token streams, or plain requests with ``--plain``;
``--delay``: ``S`` seconds between a stream's chunks, as a model server paces them, where the
batched default sends a stream in one read) after 300 to warm it, stops it with SIGTERM and
prints the functions by cumulative time. ``--variant`` switches part of the work off as
:mod:`bench.variant_sidecar` does (``nosim``: the simulated GPU does not follow requests,
the benchmark's own stand-in). Profiled time is inflated (about twice on this code), so
read shares and call counts, not microseconds; :mod:`bench.cpu_split` measures those.

``--py-spy OUT.txt`` profiles without the tracer's inflation: the sidecar runs as it is,
py-spy (the ``bench`` extra: ``pip install -e '.[bench]'``) samples it from outside at
1 kHz during the ``n`` requests only (not the warm-up), writes its collapsed stacks to
``OUT.txt`` and the summary prints each part's share of the samples: a sample goes to the
innermost frame of ours (``sidecar/``), by module, and to the transport where that frame
is asyncio's socket write or read. py-spy samples threads that are not idle, by wall time:
a ``send()`` whose woken reader preempts the sender on a 2-core machine counts the wait
too, and a loop waiting in ``epoll`` with paced streams is often counted as busy.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
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


def run(
    variant: str, *, plain: bool, n: int, top: int, sort: str, delay: float = 0.0,
    spy: Path | None = None,
) -> None:  # fmt: skip
    with Harness("profile-sidecar-") as h:
        up, up_port = start_upstream(h.tmp)
        h.procs.append(up)
        port, mport = free_port(), free_port()
        out = h.tmp / "sidecar.prof"
        # py-spy samples the sidecar as it runs; cProfile runs inside it, as --child
        head = ["bench.variant_sidecar", variant]
        if spy is None:
            head = ["bench.profile_sidecar", "--child", variant, str(out)]
        proc = subprocess.Popen(
            [python(), "-m", *head, *run_args(up_port, port, mport), "--log-level", "warning"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        h.procs.append(proc)
        wait_http(f"http://127.0.0.1:{mport}/healthz", proc, "the sidecar")
        gen = h.gen = LoadGen(h.tmp)
        url = f"http://127.0.0.1:{port}{CHAT}"
        spying: subprocess.Popen[bytes] | None = None
        for count in (300, n):  # warm, then the profiled load
            if spy is not None and count == n:
                spying = _spy(proc.pid, spy)
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
        if spying is not None and spy is not None:
            spying.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
            spying.wait(60)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            print(summarize(spy.read_text(), top))
            return
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        pstats.Stats(str(out)).sort_stats(sort).print_stats(top)


def _spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(python()).with_name("py-spy"))
    if not Path(exe).exists():
        raise SystemExit("--py-spy: py-spy is not installed (pip install -e '.[bench]')")
    command = [exe, "record", "--format", "raw", "--rate", "1000", "--nonblocking",
               "--pid", str(pid), "-o", str(out)]  # fmt: skip
    spying = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached before the load starts
    if spying.poll() is not None:
        err = spying.stderr.read().decode() if spying.stderr is not None else ""
        raise SystemExit(f"py-spy exited at once: {err.strip()}")
    return spying


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_TRANSPORT = ("write", "_write_ready", "_read_ready__data_received", "_read_ready__get_buffer",
              "_read_ready", "sendall", "sock_sendall")  # fmt: skip
_ROOTS = ("sidecar/cli.py", "sidecar/__main__.py", "bench/variant_sidecar.py")
"""Frames of ours that only hold the loop: a sample whose innermost frame of ours is one of
these is the loop's own work."""


def owner(stack: list[str]) -> str:
    """Which part a sample's CPU is for: the innermost frame of ours, by module, or the
    transport where that frame is asyncio's socket write or read."""
    inner = None
    for frame in reversed(stack):
        m = _FRAME.match(frame)
        if m is None:
            continue
        file, func = m["file"].replace("\\", "/"), m["func"]
        if inner is None:
            inner = (file, func)
        at = file.find("sidecar/")
        if at >= 0 and "/site-packages/" not in file:
            leaf_file, leaf_func = inner
            if "asyncio/" in leaf_file and leaf_func.rpartition(".")[2] in _TRANSPORT:
                return "socket write/read (asyncio transport)"
            if file.endswith(_ROOTS):  # below the loop's own frames: the loop's work
                break
            return file[at:]
    if inner is None:
        return "(no frames)"
    if "threading.py" in " ".join(stack):
        return "other threads (sampler)"
    if "asyncio/" in inner[0] or "selectors.py" in inner[0]:
        return "event loop (asyncio)"
    return f"other: {Path(inner[0]).name}"


_AREAS = (
    ("sidecar/relay/", "data plane (the relay)"),
    ("sidecar/tracking/", "tracking (request and response reading, the handler)"),
    ("sidecar/power/simulated", "simulated GPU (the bench's stand-in load)"),
    ("sidecar/", "meter, ledger and the rest of ours"),
)


def area(part: str) -> str:
    """The coarse part: data plane, tracking, meter and ledger, transport, loop."""
    for prefix, name in _AREAS:
        if part.startswith(prefix):
            return name
    return part


def summarize(raw: str, top: int) -> str:
    """Shares of the samples by owner, then the innermost functions by their own samples."""
    by_owner: Counter[str] = Counter()
    by_area: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        stack, samples = stack_text.split(";"), int(count)
        total += samples
        part = owner(stack)
        by_owner[part] += samples
        by_area[area(part)] += samples
        m = _FRAME.match(stack[-1])
        leaf = stack[-1] if m is None else f"{m['func']} ({Path(m['file']).name})"
        by_leaf[leaf] += samples
    if not total:
        return "py-spy recorded no samples"
    lines = [f"{total} samples (1 kHz, threads not idle)", "", "share  area"]
    lines += [f"{100 * k / total:5.1f}  {name}" for name, k in by_area.most_common()]
    lines += ["", "share  part"]
    lines += [f"{100 * k / total:5.1f}  {name}" for name, k in by_owner.most_common(top)]
    lines += ["", "share  innermost function"]
    lines += [f"{100 * k / total:5.1f}  {name}" for name, k in by_leaf.most_common(top)]
    return "\n".join(lines)


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
    parser.add_argument(
        "--py-spy", type=Path, default=None, metavar="OUT.txt",
        help="sample with py-spy instead of cProfile; collapsed stacks to OUT.txt",
    )  # fmt: skip
    args = parser.parse_args()
    run(
        args.variant, plain=args.plain, n=args.n, top=args.top, sort=args.sort,
        delay=args.delay, spy=args.py_spy,
    )  # fmt: skip


if __name__ == "__main__":
    main()
