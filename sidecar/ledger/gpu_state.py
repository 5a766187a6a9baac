"""One GPU's state in the ledger: its last reading, its baseline, what waits to be assigned."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sidecar.ledger.baseline import BaselineEstimator, Basis
from sidecar.ledger.requests import INF

if TYPE_CHECKING:
    from sidecar.ledger.pieces import Interval


@dataclass(slots=True)
class GpuState:
    """Kept per GPU because GPUs read and lag independently; the grid is shared."""

    baseline: BaselineEstimator
    fixed_idle_w: float | None
    last: tuple[float, float] | None = None  # (time_s, power_w)
    last_counter_j: float | None = None
    pending: deque[Interval] = field(default_factory=deque)
    assigned_s: float = -INF
    energy_j: float = 0.0
    gap_s: float = 0.0

    @property
    def basis(self) -> Basis:
        return "configured" if self.fixed_idle_w is not None else self.baseline.basis

    @property
    def idle_w(self) -> float:
        if self.fixed_idle_w is not None:
            return self.fixed_idle_w
        value = self.baseline.value_w
        return 0.0 if value is None else value
