"""Sampler overhead: ``python -m bench.sampler_bench GPUS HZ SECONDS [ledger]``.

Runs alone in its own process: the real :class:`~sidecar.sampler.Sampler`
over :class:`~sidecar.power.nvml.NvmlSource` over a live fake pynvml with
``GPUS`` GPUs at ``HZ``, and prints one JSON line: the CPU it used
(``time.process_time``, all threads) as a share of one core over ``SECONDS``
of wall time, after a one-second warm-up. With ``ledger`` the samples go on
into a :class:`~sidecar.ledger.Ledger` (the meter's path); without, to a sink
that drops them (the sampler alone). The fake's Python stands in for the
driver, whose own cost is measured on a real GPU by ``bench/gpu_check.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable

from bench.fakegpu import LiveFakeNvml, fake_gpus
from sidecar import logs
from sidecar.ledger import Ledger
from sidecar.power.base import PowerSample
from sidecar.power.nvml import NvmlSource
from sidecar.sampler import Sampler


async def measure(gpus: int, hz: float, seconds: float, *, ledger: bool) -> dict[str, float]:
    nvml = LiveFakeNvml(fake_gpus(gpus))
    source = NvmlSource(None, nvml=nvml, env={})
    infos = source.open()
    sink: Callable[[list[PowerSample]], None]
    count = 0
    if ledger:
        book = Ledger([g.gpu for g in infos])

        def to_ledger(batch: list[PowerSample]) -> None:
            nonlocal count
            for s in batch:
                book.sample(s.gpu, s.time_s, s.power_w)
            count += len(batch)

        sink = to_ledger
    else:

        def drop(batch: list[PowerSample]) -> None:
            nonlocal count
            count += len(batch)

        sink = drop
    sampler = Sampler(source, infos, hz=hz, sink=sink)
    task = asyncio.create_task(sampler.run())
    await asyncio.sleep(1.0)
    cpu0, wall0, reads0 = time.process_time(), time.monotonic(), sampler.stats.reads
    await asyncio.sleep(seconds)
    cpu1, wall1, reads1 = time.process_time(), time.monotonic(), sampler.stats.reads
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    source.close()
    wall = wall1 - wall0
    return {
        "gpus": gpus,
        "hz": hz,
        "seconds": wall,
        "cpu_percent": (cpu1 - cpu0) / wall * 100.0,
        "reads_per_s": (reads1 - reads0) / wall,
        "samples_out": count,
        "mean_interval_s": sampler.stats.mean_interval_s or 0.0,
    }


def main() -> None:
    gpus, hz, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    ledger = sys.argv[4:] == ["ledger"]
    logs.configure("warning", json=True)  # stdout carries the one JSON line
    result = asyncio.run(measure(gpus, hz, seconds, ledger=ledger))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
