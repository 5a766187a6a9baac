"""A capped exponential backoff with jitter, kept as a schedule rather than a sleep.

The NVML re-initialisation and the dcgm start-up wait both retry something that
may take minutes to come right (a driver reload, the kubelet mapping the pod).
They must not sleep inside a read or spin: they ask :meth:`Backoff.due` on every
poll and try again only when it says so. Full jitter in the upper half of each
delay keeps many sidecars of one node from retrying in step.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """When to try next: ``base_s``, doubling per failure, capped at ``cap_s``, jittered.

    ``clock`` is the monotonic clock in seconds; ``rand`` returns a float in
    [0, 1) (tests pin it). The first attempt is due at once.
    """

    def __init__(
        self,
        *,
        base_s: float = 1.0,
        cap_s: float = 60.0,
        clock: Callable[[], float],
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError(f"backoff needs 0 < base_s <= cap_s, got {base_s} and {cap_s}")
        self._base_s = base_s
        self._cap_s = cap_s
        self._clock = clock
        self._rand = rand
        self.failures = 0
        self.next_s = float("-inf")

    def due(self) -> bool:
        """Whether the next attempt may run now."""
        return self._clock() >= self.next_s

    def failed(self) -> float:
        """Record a failed attempt; returns the delay in seconds until the next one."""
        ceiling_s = min(self._cap_s, self._base_s * 2.0 ** min(self.failures, 32))
        delay_s = ceiling_s * (0.5 + 0.5 * self._rand())
        self.failures += 1
        self.next_s = self._clock() + delay_s
        return delay_s

    def succeeded(self) -> None:
        """Reset: the next failure starts again from ``base_s``."""
        self.failures = 0
        self.next_s = float("-inf")
