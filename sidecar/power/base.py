"""The one small protocol every power source speaks, and the records it yields.

Sources are blocking on purpose: NVML and friends block, so the sampler runs
``read`` in a worker thread and the event loop never waits on a driver.
Units are SI at this boundary (watts, joules, seconds); sources convert from
their native units (mW, mJ, µs) before a sample leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

ErrorReason = Literal["not_supported", "gpu_lost", "unknown"]


class PowerSourceError(Exception):
    """A source cannot start (no driver, unknown GPU, bad file): one line for the user."""


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What a source learned about one GPU when it opened; read once, never per sample."""

    gpu: str  # the `gpu` label: NVML index as the container sees it, or the source's own id
    uuid: str
    name: str


@dataclass(frozen=True, slots=True)
class PowerSample:
    """One power reading on the sidecar's monotonic clock.

    ``energy_j`` is the GPU's cumulative hardware energy counter where one exists
    (NVML's total energy, DCGM's, or a replayed column); ``None`` otherwise.
    """

    time_s: float
    gpu: str
    power_w: float
    energy_j: float | None = None


@dataclass(frozen=True, slots=True)
class ReadError:
    """One GPU failed one read; the others carry on. Counted by reason."""

    gpu: str
    reason: ErrorReason


class PowerSource(Protocol):
    """Where power comes from. All three methods may block."""

    def open(self) -> list[GpuInfo]:
        """Probe capabilities once and return the GPUs this source meters."""
        ...

    def read(self) -> list[PowerSample | ReadError]:
        """Poll every GPU once: zero or more samples per GPU, in time order per GPU."""
        ...

    def close(self) -> None:
        """Release the driver or file; safe to call twice."""
        ...
