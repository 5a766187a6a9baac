"""Reconciles instant power with a GPU's hardware energy counter, window by window.

On A100 and H100 the power sensor sees about a quarter of the runtime, so the
integral of polled power can be off by tens of percent, while the energy
counter is the ground truth for totals. We keep the *shape* of power in time
from the instant readings and scale each window so the integral of the line
the ledger will draw through the emitted points equals the counter's
increase exactly. Pure: the sampler and ``attribute`` share it.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from typing import Final

from sidecar.power.base import PowerSample

MIN_WINDOW_S: Final = 1.0
MAX_HOLD_S: Final = 10.0
"""A counter that has not moved for this long is stuck: pass power through unscaled."""
MIN_CUT_WINDOW_S: Final = 0.2
"""A window closed early for a receipt (:meth:`Reconciler.cut`) still spans this long:
two refreshes of a counter that updates at 10 Hz, so its lag stays a part of the window."""
MAX_CUTS: Final = 1024
"""Pending cuts kept per GPU (bounded memory); past it a new one is not kept."""


class Reconciler:
    """One GPU's reconciliation; ``push`` returns the samples ready for the ledger.

    A window runs from the *anchor* (the last emitted sample whose counter value
    starts the window) to the next sample whose counter has moved, at least
    ``min_window_s`` later. Samples are held meanwhile; a counter that refreshes
    slowly (dcgm-exporter: every 30 s) makes them wait at most ``max_hold_s``,
    after which they go out unscaled and their energy is taken off the window's
    counter increase when it finally comes, so the total still matches.

    A silence longer than ``gap_after_s`` (three sample periods) is a gap: the
    ledger books the counter's increase over it evenly, not along a line, so no
    window may reach across it (scaling the first sample after a busy gap would
    put the gap's energy into that one reading). A gap ends the window: what is
    held goes out unscaled and a fresh window starts after it.

    :meth:`cut` closes a window early, at the first sample from a given time on
    whose counter moved, once the window spans ``min_cut_window_s``: an energy
    receipt waits for its request's energy, which is final only once reconciled
    samples past the request's end are in, and a 1 s window would hold them
    longer than the receipt may wait. The counter still scales every window.
    """

    def __init__(
        self,
        *,
        min_window_s: float = MIN_WINDOW_S,
        max_hold_s: float = MAX_HOLD_S,
        gap_after_s: float | None = None,
        min_cut_window_s: float = MIN_CUT_WINDOW_S,
    ) -> None:
        self._min_window_s = min_window_s
        self._min_cut_s = min(min_cut_window_s, min_window_s)
        self._cuts: list[float] = []  # sorted times past which a window may close early
        self._max_hold_s = max_hold_s
        self._gap_after_s = gap_after_s
        self._last_in_s: float | None = None
        self._anchor: PowerSample | None = None
        self._last_out: PowerSample | None = None  # the last sample emitted
        self._released_j = 0.0  # energy of the line emitted since the anchor
        self._carry_j = 0.0  # surplus emitted in the last window, owed by the next
        self._held: list[PowerSample] = []
        self.last_scale: float | None = None

    def push(self, sample: PowerSample) -> list[PowerSample]:
        """Take one raw sample (time-ordered); emit zero or more reconciled ones."""
        before: list[PowerSample] = []
        last_in, self._last_in_s = self._last_in_s, sample.time_s
        gap = self._gap_after_s
        if gap is not None and last_in is not None and sample.time_s - last_in > gap:
            before = self.flush()
            self._anchor = None
            self._carry_j = 0.0
        anchor = self._anchor
        if anchor is None or anchor.energy_j is None:
            if sample.energy_j is not None:
                self._start_window(sample)
            self._emitted(sample)
            return [*before, sample]
        self._held.append(sample)
        if sample.energy_j is None:
            return self._release_if_stuck(sample.time_s)
        delta_j = sample.energy_j - anchor.energy_j
        if delta_j < 0:  # driver reload: the counter restarted; begin a new window
            self._carry_j = 0.0
            return self._release(scale=None)
        if delta_j == 0 or (
            sample.time_s - anchor.time_s < self._min_window_s and not self._cut_due(sample, anchor)
        ):
            return self._release_if_stuck(sample.time_s)
        return self._release(scale=self._scale(delta_j))

    def cut(self, after_s: float) -> None:
        """Close the window at the first sample from ``after_s`` on whose counter
        moved, though it be shorter than ``min_window_s`` (see the class)."""
        if len(self._cuts) < MAX_CUTS:
            bisect.insort(self._cuts, after_s)

    def _cut_due(self, sample: PowerSample, anchor: PowerSample) -> bool:
        cuts = self._cuts
        return (
            bool(cuts)
            and sample.time_s >= cuts[0]
            and (sample.time_s - anchor.time_s >= self._min_cut_s)
        )

    def flush(self) -> list[PowerSample]:
        """Emit what is held, unscaled (shutdown or end of a trace)."""
        out, self._held = self._held, []
        if out:
            self._emitted(out[-1])
        return out

    def _emitted(self, last: PowerSample) -> None:
        """``last`` went out: cuts up to it are served."""
        self._last_out = last
        if self._cuts:
            del self._cuts[: bisect.bisect_right(self._cuts, last.time_s)]

    def _start_window(self, sample: PowerSample) -> None:
        self._anchor = sample
        self._released_j, self._carry_j = self._carry_j, 0.0

    def _scale(self, delta_j: float) -> float | None:
        """k such that the emitted line, from the anchor on, integrates to ``delta_j``."""
        prev = self._last_out if self._last_out is not None else self._anchor
        assert prev is not None
        first = self._held[0]
        fixed = self._released_j + prev.power_w * (first.time_s - prev.time_s) / 2.0
        scaled = first.power_w * (first.time_s - prev.time_s) / 2.0 + _trapezoid(self._held)
        if scaled <= 0.0:
            return None
        if delta_j < fixed:
            # More was already emitted than the counter grew (a burst shorter than the
            # window at a low rate): emit nothing more, and carry the surplus over.
            self._carry_j = fixed - delta_j
            return 0.0
        return (delta_j - fixed) / scaled

    def _release(self, *, scale: float | None) -> list[PowerSample]:
        held, self._held = self._held, []
        self.last_scale = scale
        if scale is not None:
            # built directly: dataclasses.replace was 7 % of the sampler's CPU at 8 GPUs
            held = [
                PowerSample(
                    time_s=s.time_s, gpu=s.gpu, power_w=s.power_w * scale, energy_j=s.energy_j
                )
                for s in held
            ]
        self._emitted(held[-1])
        self._start_window(held[-1])
        return held

    def _release_if_stuck(self, now_s: float) -> list[PowerSample]:
        prev = self._last_out if self._last_out is not None else self._anchor
        if prev is None or now_s - prev.time_s < self._max_hold_s:
            return []
        held, self._held = self._held, []
        self._released_j += _trapezoid([prev, *held])
        self._emitted(held[-1])
        return held


def _trapezoid(samples: list[PowerSample]) -> float:
    return sum(
        (a.power_w + b.power_w) / 2.0 * (b.time_s - a.time_s)
        for a, b in itertools.pairwise(samples)
    )


def reconcile_all(
    samples: Iterable[PowerSample], *, gap_after_s: float | None = None
) -> list[PowerSample]:
    """Reconcile a whole recorded trace, GPU by GPU, keeping each GPU's order."""
    per_gpu: dict[str, Reconciler] = {}
    out: list[PowerSample] = []
    for s in samples:
        rec = per_gpu.get(s.gpu)
        if rec is None:
            rec = per_gpu[s.gpu] = Reconciler(gap_after_s=gap_after_s)
        out.extend(rec.push(s))
    for rec in per_gpu.values():
        out.extend(rec.flush())
    return out
