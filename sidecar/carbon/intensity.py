"""The one record every intensity source produces, and the vocabulary it uses.

Kept apart from the providers and the region table so both can build it without
importing each other, and so the exposition layer can read it without pulling in
aiohttp clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, get_args

Source = Literal["fixed", "static", "static-fallback", "electricitymaps", "watttime", "uk"]
"""Where a figure came from: the contract's values of the ``source`` metric label."""

LiveSource = Literal["electricitymaps", "watttime", "uk"]

Basis = Literal["lifecycle average", "direct average", "direct marginal", "as configured"]
"""What a figure counts, because figures on different bases do not compare.

*lifecycle* includes upstream emissions (fuel supply, plant construction), *direct*
only the stacks; *average* is the whole generation mix, *marginal* the plant that
answers the next kWh (WattTime's MOER). ``as configured`` is ``--carbon-intensity``:
the operator's number, on whatever basis they chose.
"""

BASES: Final[frozenset[str]] = frozenset(get_args(Basis))
SOURCES: Final[frozenset[str]] = frozenset(get_args(Source))


@dataclass(frozen=True, slots=True)
class Intensity:
    """A grid carbon intensity in force, with enough provenance to label and audit it.

    ``g_per_kwh`` is grams CO2e per kWh. ``region`` is the configured region for
    static figures and the provider's zone for live ones (the ``region`` label).
    ``measured_at`` is the provider's own timestamp (UTC) of the figure, ``None`` for
    table and fixed values, which describe a year rather than a moment.
    """

    g_per_kwh: float
    region: str
    source: Source
    basis: Basis
    measured_at: datetime | None = None
