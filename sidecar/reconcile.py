"""Reconciles instant power with a GPU's hardware energy counter, window by window.

On A100 and H100 the power sensor sees about a quarter of the runtime, so the
integral of polled power can be off by tens of percent, while the energy
counter is the ground truth for totals. We keep the *shape* of power in time
from the instant readings and scale each window so the integral of the line
the ledger will draw through the emitted points equals the counter's
increase exactly. Pure: the sampler and ``attribute`` share it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Final

from sidecar.power.base import PowerSample

MIN_WINDOW_S: Final = 1.0
MAX_HOLD_S: Final = 10.0
"""A counter that has not moved for this long is stuck: pass power through unscaled."""


class Reconciler:
    """One GPU's reconciliation; ``push`` returns the samples ready for the ledger."""

    def __init__(
        self, *, min_window_s: float = MIN_WINDOW_S, max_hold_s: float = MAX_HOLD_S
    ) -> None:
        self._min_window_s = min_window_s
        self._max_hold_s = max_hold_s
        self._anchor: PowerSample | None = None  # last emitted sample that carried a counter
        self._held: list[PowerSample] = []
        self.last_scale: float | None = None

    def push(self, sample: PowerSample) -> list[PowerSample]:
        """Take one raw sample (time-ordered); emit zero or more reconciled ones."""
        anchor = self._anchor
        if anchor is None or anchor.energy_j is None:
            if sample.energy_j is None:
                return [sample]
            self._anchor = sample
            return [sample]
        self._held.append(sample)
        if sample.energy_j is None:
            return self._release_if_stuck(sample.time_s)
        delta_j = sample.energy_j - anchor.energy_j
        if delta_j < 0:  # driver reload: the counter restarted; begin a new window
            return self._release(scale=None, new_anchor=sample)
        if delta_j == 0 or sample.time_s - anchor.time_s < self._min_window_s:
            return self._release_if_stuck(sample.time_s)
        return self._release(scale=self._scale(anchor, delta_j), new_anchor=sample)

    def flush(self) -> list[PowerSample]:
        """Emit what is held, unscaled (shutdown or end of a trace)."""
        out, self._held = self._held, []
        return out

    def _scale(self, anchor: PowerSample, delta_j: float) -> float | None:
        """k such that the line through anchor and k-scaled held points integrates to delta."""
        first = self._held[0]
        fixed = anchor.power_w * (first.time_s - anchor.time_s) / 2.0
        scaled = first.power_w * (first.time_s - anchor.time_s) / 2.0
        for prev, cur in zip(self._held, self._held[1:], strict=False):
            scaled += (prev.power_w + cur.power_w) / 2.0 * (cur.time_s - prev.time_s)
        if scaled <= 0.0:
            return None
        return max(0.0, (delta_j - fixed) / scaled)

    def _release(self, *, scale: float | None, new_anchor: PowerSample) -> list[PowerSample]:
        held, self._held = self._held, []
        self.last_scale = scale
        if scale is not None:
            held = [replace(s, power_w=s.power_w * scale) for s in held]
        self._anchor = held[-1] if held else new_anchor
        return held

    def _release_if_stuck(self, now_s: float) -> list[PowerSample]:
        anchor = self._anchor
        if anchor is None or now_s - anchor.time_s < self._max_hold_s:
            return []
        held, self._held = self._held, []
        with_counter = [s for s in held if s.energy_j is not None]
        if with_counter:
            self._anchor = with_counter[-1]
        return held


def reconcile_all(samples: Iterable[PowerSample]) -> list[PowerSample]:
    """Reconcile a whole recorded trace, GPU by GPU, keeping each GPU's order."""
    per_gpu: dict[str, Reconciler] = {}
    out: list[PowerSample] = []
    for s in samples:
        out.extend(per_gpu.setdefault(s.gpu, Reconciler()).push(s))
    for rec in per_gpu.values():
        out.extend(rec.flush())
    return out
