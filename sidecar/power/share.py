"""A GPU shared by several pods: book only this pod's fraction of the board's power.

NVML and dcgm-exporter read a whole physical GPU. When a board is split (MIG
slices, or time-slicing by the device plugin), each pod's sidecar would book
the whole board to its own model, and the node's energy would be counted once
per pod. ``--gpu-share F`` says which fraction of each metered board this pod
books; it scales power and the energy counter alike, at the source, so the
reconciler, the baseline and the ledger all see the booked share and every
figure the sidecar exports (watts, joules, grams) is this pod's share.

MIG is visible through NVML (and dcgm-exporter's ``GPU_I_ID`` label), so a MIG
GPU without a share refuses to start. Time-slicing cannot be seen from inside a
container: nothing detects it, and the same setting is the remedy.
"""

from __future__ import annotations

from dataclasses import replace

from sidecar.power.base import GpuInfo, PowerSample, PowerSource, PowerSourceError, ReadError

__all__ = ["GpuShareRequired", "SharedSource", "require_share"]


class GpuShareRequired(PowerSourceError):
    """A metered GPU is in MIG mode and no ``--gpu-share`` says what part of it is ours."""


def require_share(gpus: list[GpuInfo], share: float | None) -> None:
    """Refuse to meter a MIG board in full: its power covers every slice, other pods' too."""
    if share is not None:
        return
    mig = [g for g in gpus if g.mig]
    if mig:
        named = ", ".join(f"{g.gpu} ({g.uuid})" for g in mig)
        raise GpuShareRequired(
            f"GPU {named} is in MIG mode, and its power covers every slice on the board: "
            "give the fraction this pod books, for example 3/7 = 0.43 for a 3g slice of 7"
        )


class SharedSource:
    """A :class:`~sidecar.power.base.PowerSource` that books ``share`` of another's readings."""

    def __init__(self, inner: PowerSource, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"a GPU share is in (0, 1], got {share}")
        self._inner = inner
        self._share = share

    @property
    def inner(self) -> PowerSource:
        return self._inner

    @property
    def share(self) -> float:
        return self._share

    def open(self) -> list[GpuInfo]:
        return self._inner.open()

    def read(self) -> list[PowerSample | ReadError]:
        k = self._share
        return [
            item
            if isinstance(item, ReadError)
            else replace(
                item,
                power_w=item.power_w * k,
                energy_j=None if item.energy_j is None else item.energy_j * k,
            )
            for item in self._inner.read()
        ]

    def close(self) -> None:
        self._inner.close()
