"""The one small protocol every power source speaks, and the records it yields.

Sources are blocking on purpose: NVML and friends block, so the sampler runs
``read`` in a worker thread and the event loop never waits on a driver.
Units are SI at this boundary (watts, joules, seconds); sources convert from
their native units (mW, mJ, µs) before a sample leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

ErrorReason = Literal["not_supported", "gpu_lost", "unknown", "timeout", "not_mapped"]
"""Why a read failed. ``timeout``: the GPU's read outlived its deadline (a hung driver
call; the GPU is skipped until the call returns). ``not_mapped``: the source is up but
does not yet know this pod's GPUs (dcgm-exporter before the kubelet maps the pod)."""


class PowerSourceError(Exception):
    """A source cannot start (no driver, unknown GPU, bad file): one line for the user."""


class PowerSourcePending(PowerSourceError):
    """The source answers but cannot name this pod's GPUs yet: retry later, do not exit.

    dcgm-exporter maps a pod to its GPUs through the kubelet's pod-resources API a
    few seconds after the pod starts, so a sidecar that starts first sees nothing.
    """


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What a source learned about one GPU when it opened; read once, never per sample."""

    gpu: str  # the `gpu` label: NVML index as the container sees it, or the source's own id
    uuid: str
    name: str
    mig: bool = False  # the GPU is in MIG mode: its power covers every slice, not ours alone


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
