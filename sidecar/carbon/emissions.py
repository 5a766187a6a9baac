"""Joules and reserved seconds → grams CO2e, the way SCI (ISO/IEC 21031:2024) counts.

Pure functions and records: no I/O, no clock. Inputs carry their units in their
names; the only conversions are here, once.

*Operational* grams use the intensity in force when the energy was used. Because
intensity changes (a live provider refreshes every few minutes), do not multiply a
day's joules by today's last figure: integrate as energy arrives, each increment
times the intensity current at that moment (``tracker.current`` when the increment
is booked, or ``tracker.intensity_at(time_s)`` for energy booked after the fact),
and sum the grams. :class:`OperationalEmissions` does that bookkeeping.

*Embodied* grams (SCI's M) accrue with time reserved, whether the GPUs are busy or
not: ``M = TE x (TS / EL) x RS``, total embodied emissions times the time share of
the hardware's expected life times the share of the hardware reserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_GPUS_PER_HOST",
    "DEFAULT_HOST_EMBODIED_KG",
    "DEFAULT_LIFETIME_YEARS",
    "GPU_EMBODIED_DEFAULTS",
    "G_PER_KWH_PER_LB_PER_MWH",
    "HOURS_PER_YEAR",
    "JOULES_PER_KWH",
    "SECONDS_PER_YEAR",
    "UNKNOWN_GPU_EMBODIED_KG",
    "EmbodiedModel",
    "GpuEmbodied",
    "OperationalEmissions",
    "gpu_embodied_default",
    "joules_to_kwh",
    "operational_grams",
    "sci_per_unit",
]

JOULES_PER_KWH: Final = 3.6e6
# 1 lb = 453.59237 g exactly, so 1 lb/MWh = 0.45359237 g/kWh (the seed rounds to 0.45359).
G_PER_KWH_PER_LB_PER_MWH: Final = 0.45359237
# A 365-day year, as BLOOM's and the SCI's worked examples count (8,760 h).
HOURS_PER_YEAR: Final = 8760.0
SECONDS_PER_YEAR: Final = HOURS_PER_YEAR * 3600.0


def joules_to_kwh(energy_j: float) -> float:
    """Joules → kilowatt-hours."""
    return energy_j / JOULES_PER_KWH


def operational_grams(energy_j: float, intensity_g_per_kwh: float, pue: float = 1.0) -> float:
    """Grams CO2e of ``energy_j`` drawn at ``intensity_g_per_kwh``, scaled by PUE.

    PUE multiplies the metered IT energy up to what the data centre drew for it
    (cooling, power conversion), as SCI asks when the building is in the boundary.
    """
    if pue < 1.0:
        raise ValueError(f"PUE is at least 1, got {pue!r}")
    return energy_j / JOULES_PER_KWH * intensity_g_per_kwh * pue


def sci_per_unit(
    energy_kwh: float, intensity_g_per_kwh: float, pue: float, embodied_g: float, units: float
) -> float:
    """SCI = (E x I + M) / R in grams CO2e per functional unit.

    ``energy_kwh`` is the all-in energy of the window (idle included) before PUE,
    ``embodied_g`` the embodied grams of the same window, ``units`` the requests or
    tokens (or thousands of tokens) served in it. Raises ``ValueError`` when no unit
    was served: SCI per nothing is undefined, not zero.
    """
    if units <= 0:
        raise ValueError(f"SCI needs at least one functional unit, got {units!r}")
    if pue < 1.0:
        raise ValueError(f"PUE is at least 1, got {pue!r}")
    return (energy_kwh * pue * intensity_g_per_kwh + embodied_g) / units


@dataclass(frozen=True, slots=True)
class GpuEmbodied:
    """A default embodied figure for GPUs whose name contains ``match`` (case-insensitive)."""

    match: str
    kg: float
    source: str


# First match wins, so longer names come before their prefixes (A100 before A10,
# L40S before L40 before L4, H200 and H100 apart). Manufacturer figures are rare:
# only the H100's is published by NVIDIA; the A100's is BLOOM's lower bound; the
# others are estimates scaled from the A100's 150 kg by GPU die area (826 mm² for
# GA100), which ignores memory, board and process-node differences: treat them as
# order-of-magnitude figures and override with --gpu-embodied-kg when you know better.
GPU_EMBODIED_DEFAULTS: Final[tuple[GpuEmbodied, ...]] = (
    GpuEmbodied(
        "H100", 164.0, "NVIDIA HGX H100 product carbon footprint: 1,312 kg per 8-GPU board / 8"
    ),
    GpuEmbodied(
        "H200",
        164.0,
        "estimate: the H100's figure (same GH100 die and board); its larger HBM3e is not "
        "counted, so a lower bound",
    ),
    GpuEmbodied("A100", 150.0, "BLOOM (Luccioni et al. 2022), lower bound"),
    GpuEmbodied("A10G", 114.0, "estimate: A100 x GA102 die area 628/826 mm²"),
    GpuEmbodied("A10", 114.0, "estimate: A100 x GA102 die area 628/826 mm²"),
    GpuEmbodied("L40S", 111.0, "estimate: A100 x AD102 die area 609/826 mm²"),
    GpuEmbodied("L40", 111.0, "estimate: A100 x AD102 die area 609/826 mm²"),
    GpuEmbodied("L4", 53.0, "estimate: A100 x AD104 die area 295/826 mm²"),
    GpuEmbodied("V100", 148.0, "estimate: A100 x GV100 die area 815/826 mm²"),
    GpuEmbodied("T4", 99.0, "estimate: A100 x TU104 die area 545/826 mm²"),
)
# An unknown GPU gets the one manufacturer-published per-GPU figure rather than
# zero: embodied emissions are never nothing, and most unknown datacentre GPUs are
# newer parts of the H100's class.
UNKNOWN_GPU_EMBODIED_KG: Final = 164.0
# BLOOM's figure for a server without its GPUs (an 8-H100 cloud host is put at up to
# 5,700 kg: 2,500 is the lower end of the seed's range).
DEFAULT_HOST_EMBODIED_KG: Final = 2500.0
DEFAULT_GPUS_PER_HOST: Final = 8
# The seed's range is 3 to 6 years. Four: servers are depreciated over 5 to 6 years
# but accelerator fleets turn over faster, and 4 years is what Cloud Carbon
# Footprint (35,040 h) and the SCI worked example use. A shorter life gives more
# embodied grams per hour, so 4 errs on the side of not under-reporting.
DEFAULT_LIFETIME_YEARS: Final = 4.0


def gpu_embodied_default(gpu_name: str) -> GpuEmbodied:
    """The default embodied figure for a GPU model name as NVML reports it
    (``NVIDIA H100 80GB HBM3``); unknown names get :data:`UNKNOWN_GPU_EMBODIED_KG`."""
    folded = gpu_name.casefold()
    for entry in GPU_EMBODIED_DEFAULTS:
        if entry.match.casefold() in folded:
            return entry
    return GpuEmbodied(
        gpu_name, UNKNOWN_GPU_EMBODIED_KG, "default for unknown GPUs: the H100's published figure"
    )


@dataclass(frozen=True, slots=True)
class EmbodiedModel:
    """SCI's M for the GPUs this sidecar meters and their share of the host.

    ``gpu_embodied_kg`` is per GPU; ``host_embodied_kg`` per server without its
    GPUs, of which ``host_share`` is reserved (``gpus / gpus_per_host``; above 1 for
    several hosts). ``utilisation`` is the share of its life the hardware is reserved
    at all: 1 for a sidecar that bills every wall-clock second, below 1 (BLOOM: 0.85)
    when amortising over busy hours only, which spreads idle life over them.
    """

    gpu_embodied_kg: float
    gpus: int
    host_embodied_kg: float = DEFAULT_HOST_EMBODIED_KG
    host_share: float = 1.0 / DEFAULT_GPUS_PER_HOST
    lifetime_years: float = DEFAULT_LIFETIME_YEARS
    utilisation: float = 1.0

    def __post_init__(self) -> None:
        if self.gpu_embodied_kg < 0 or self.host_embodied_kg < 0:
            raise ValueError("embodied emissions cannot be negative")
        if self.gpus < 0 or self.host_share < 0:
            raise ValueError("GPU count and host share cannot be negative")
        if self.lifetime_years <= 0:
            raise ValueError(f"lifetime must be positive, got {self.lifetime_years!r} years")
        if not 0 < self.utilisation <= 1:
            raise ValueError(f"utilisation is in (0, 1], got {self.utilisation!r}")

    @classmethod
    def for_gpus(
        cls,
        gpu_name: str,
        gpus: int,
        *,
        gpu_embodied_kg: float | None = None,
        host_embodied_kg: float | None = None,
        gpus_per_host: int = DEFAULT_GPUS_PER_HOST,
        lifetime_years: float | None = None,
        utilisation: float = 1.0,
    ) -> EmbodiedModel:
        """Defaults by GPU model name, each overridable (``--gpu-embodied-kg`` and friends)."""
        if gpus_per_host <= 0:
            raise ValueError(f"GPUs per host must be positive, got {gpus_per_host!r}")
        return cls(
            gpu_embodied_kg=(
                gpu_embodied_kg
                if gpu_embodied_kg is not None
                else gpu_embodied_default(gpu_name).kg
            ),
            gpus=gpus,
            host_embodied_kg=(
                host_embodied_kg if host_embodied_kg is not None else DEFAULT_HOST_EMBODIED_KG
            ),
            host_share=gpus / gpus_per_host,
            lifetime_years=lifetime_years if lifetime_years is not None else DEFAULT_LIFETIME_YEARS,
            utilisation=utilisation,
        )

    @property
    def total_embodied_kg(self) -> float:
        """TE x RS: the reserved share of the hardware's manufacturing emissions."""
        return self.gpus * self.gpu_embodied_kg + self.host_share * self.host_embodied_kg

    @property
    def _reserved_life_s(self) -> float:
        return self.lifetime_years * SECONDS_PER_YEAR * self.utilisation

    @property
    def gpu_grams_per_second(self) -> float:
        """Embodied grams per reserved second from the GPUs alone."""
        return self.gpus * self.gpu_embodied_kg * 1000.0 / self._reserved_life_s

    @property
    def host_grams_per_second(self) -> float:
        """Embodied grams per reserved second from the host share alone."""
        return self.host_share * self.host_embodied_kg * 1000.0 / self._reserved_life_s

    @property
    def grams_per_second(self) -> float:
        """Embodied grams CO2e accruing per second of reservation (GPUs and host)."""
        return self.total_embodied_kg * 1000.0 / self._reserved_life_s

    def grams(self, duration_s: float) -> float:
        """SCI's M for ``duration_s`` seconds reserved: TE x (TS / EL) x RS."""
        if duration_s < 0:
            raise ValueError(f"duration cannot be negative, got {duration_s!r} s")
        return self.grams_per_second * duration_s


class OperationalEmissions:
    """Running total of operational grams, each energy increment at its own intensity.

    Call :meth:`add` as joules are booked, with the intensity in force when they were
    used (``tracker.current.g_per_kwh``, or ``tracker.intensity_at(t).g_per_kwh``
    for energy booked later). Pure: holds numbers, reads no clock.
    """

    __slots__ = ("_energy_j", "_grams", "pue")

    def __init__(self, pue: float = 1.0) -> None:
        if pue < 1.0:
            raise ValueError(f"PUE is at least 1, got {pue!r}")
        self.pue = pue
        self._energy_j = 0.0
        self._grams = 0.0

    def add(self, energy_j: float, intensity_g_per_kwh: float) -> float:
        """Book ``energy_j`` at ``intensity_g_per_kwh``; returns this increment's grams."""
        grams = operational_grams(energy_j, intensity_g_per_kwh, self.pue)
        self._energy_j += energy_j
        self._grams += grams
        return grams

    @property
    def energy_j(self) -> float:
        """Joules booked so far (before PUE)."""
        return self._energy_j

    @property
    def grams(self) -> float:
        """Operational grams CO2e so far (PUE applied)."""
        return self._grams
