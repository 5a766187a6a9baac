"""The power source the settings name, built once in the sidecar's start-up."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from sidecar.config import Settings
from sidecar.power.base import PowerSource
from sidecar.power.share import SharedSource
from sidecar.power.simulated import SimulatedGpus, SimulatedSource

__all__ = ["build_source"]


def build_source(
    settings: Settings,
    *,
    env: Mapping[str, str],
    clock: Callable[[], float],
    simulated: SimulatedGpus | None = None,
) -> PowerSource:
    """The power source the settings name, booking ``--gpu-share`` of it where given."""
    source = _build_source(settings, env=env, clock=clock, simulated=simulated)
    return source if settings.gpu_share is None else SharedSource(source, settings.gpu_share)


def _build_source(
    settings: Settings,
    *,
    env: Mapping[str, str],
    clock: Callable[[], float],
    simulated: SimulatedGpus | None = None,
) -> PowerSource:
    """The power source the settings name (``--power-source``)."""
    kind, _, arg = settings.power_source.partition(":")
    gpus = list(settings.gpus) or None
    if kind == "simulated":
        model = simulated or SimulatedGpus(gpus=len(gpus) if gpus else 1)
        return SimulatedSource(model, clock=clock)
    if kind == "replay":
        from sidecar.power.replay import ReplaySource

        return ReplaySource(Path(arg), clock=clock)
    if kind == "dcgm":
        from sidecar.power.dcgm import DcgmSource

        return DcgmSource(
            arg,
            pod=env.get("POD_NAME") or None,
            namespace=env.get("POD_NAMESPACE") or None,
            gpus=gpus,
            clock=clock,
        )
    from sidecar.power.nvml import NvmlSource

    return NvmlSource(gpus, clock=clock)
