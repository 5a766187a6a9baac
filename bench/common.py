"""Shared helpers of the benchmarks: process accounting, ports, machine details.

CPU time is read from ``/proc/<pid>/stat`` (``utime + stime``, all threads,
in clock ticks), so each figure belongs to one process and not to the load
generator or the stand-in upstream that share the machine with it.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1]
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of one process, all its threads, since it started."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_s_many(pids: Sequence[int]) -> float:
    """CPU seconds summed over several processes (nginx: its master and workers)."""
    return sum(cpu_s(p) for p in pids)


def rss_mb(pid: int) -> float:
    """Resident set size in MiB (``/proc/<pid>/statm``, second field, in pages)."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE_SIZE / (1 << 20)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's workers under its master)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 1]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    """Where the figures came from: they only mean something beside this."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 0
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "memory_gb": round(mem_kb / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": nginx_version(),
        "aiohttp": _version("aiohttp"),
    }


def nginx_version() -> str | None:
    exe = nginx_binary()
    if exe is None:
        return None
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False)
    text = (out.stderr or out.stdout).strip()
    return text.split("/", 1)[1] if "/" in text else text or None


def nginx_binary() -> str | None:
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def python() -> str:
    """The interpreter running the bench: subprocesses use the same one (the venv's)."""
    return sys.executable
