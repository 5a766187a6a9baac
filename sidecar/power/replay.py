"""Plays a recorded power CSV back on the sidecar's clock.

The first recorded sample maps to the moment the source opens; each read
returns the rows whose shifted time has come. Useful to rehearse dashboards
and alerts on a recorded production trace without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sidecar.power.base import GpuInfo, PowerSample, PowerSourceError, ReadError
from sidecar.trace import PowerRow, TraceError, read_power


class ReplaySource:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._rows: list[PowerRow] = []
        self._next = 0
        self._shift_s = 0.0

    def open(self) -> list[GpuInfo]:
        try:
            rows = read_power(self._path)
        except TraceError as e:
            raise PowerSourceError(str(e)) from e
        self._rows = sorted(rows, key=lambda r: r.time_s)
        self._shift_s = self._clock() - self._rows[0].time_s
        gpus = list(dict.fromkeys(r.gpu for r in self._rows))
        return [
            GpuInfo(gpu=g, uuid=g if g.startswith("GPU-") else f"replay-{g}", name="replay")
            for g in gpus
        ]

    def read(self) -> list[PowerSample | ReadError]:
        now = self._clock()
        out: list[PowerSample | ReadError] = []
        while self._next < len(self._rows) and self._rows[self._next].time_s + self._shift_s <= now:
            r = self._rows[self._next]
            out.append(PowerSample(r.time_s + self._shift_s, r.gpu, r.power_w, r.energy_j))
            self._next += 1
        return out

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self._rows)

    def close(self) -> None:
        return None
