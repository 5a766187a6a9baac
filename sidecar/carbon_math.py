"""The one conversion every path shares: joules to grams CO2e."""

from __future__ import annotations

from typing import Final

JOULES_PER_KWH: Final = 3.6e6


def operational_grams(energy_j: float, intensity_g_per_kwh: float, pue: float = 1.0) -> float:
    """Grams CO2e of ``energy_j`` at a grid intensity, scaled by the data centre's PUE."""
    return energy_j / JOULES_PER_KWH * intensity_g_per_kwh * pue
