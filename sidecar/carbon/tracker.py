"""The intensity in force, refreshed from a live provider, with a safe fallback.

:class:`CarbonIntensityTracker` holds one :class:`~sidecar.carbon.intensity.Intensity`
that anyone may read at any time (``tracker.current`` is an attribute read, cheap
enough for a Prometheus collector on the event loop). A background loop refreshes it
from the live provider every ``refresh_s``; each refresh retries transient failures
(5xx, timeouts, connection errors) with exponential backoff through ``stamina``,
and waits out a 429's Retry-After before its next try. Credentials and malformed
answers are not retried: they will not get better in a second.

When a refresh fails, the last good live figure stays in force until it is
``stale_after_s`` old; after that, or when no live figure has ever arrived, the
bundled table's figure is used with ``source="static-fallback"``, and one
``carbon.fallback`` warning says so, with the basis change (for instance WattTime's
"direct marginal" → the table's "lifecycle average"). Nothing a provider answers can
stop the loop.

Emissions must use the intensity in force when the energy was used. Every change is
kept (bounded) with the tracker's monotonic time, so energy booked after the fact can
ask :meth:`CarbonIntensityTracker.intensity_at`; code that books energy as it arrives
multiplies by ``current`` at that moment, or subscribes to changes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import stamina
import structlog

from sidecar.carbon.intensity import Basis, Intensity, Source
from sidecar.carbon.providers import (
    IntensityProvider,
    ProviderError,
    ProviderRateLimitedError,
    ProviderTransientError,
)

__all__ = ["CarbonIntensityTracker", "IntensityChange"]

log = structlog.get_logger("sidecar.carbon")


@dataclass(frozen=True, slots=True)
class IntensityChange:
    """The intensity that came into force at ``time_s`` (the tracker's monotonic clock)."""

    time_s: float
    intensity: Intensity


class CarbonIntensityTracker:
    """The grid intensity in force, from a fixed value, the table, or a live provider.

    Build one of three ways: ``CarbonIntensityTracker(static_figure)`` for the table
    (``source="static"``) or ``--carbon-intensity`` (``source="fixed"``), and
    ``CarbonIntensityTracker(table_figure, provider)`` for a live provider, which
    starts on the table figure labelled ``static-fallback`` until the first answer.

    Lifecycle: ``await start(session)`` spawns the refresh loop and returns at once
    (start-up never waits on a provider); ``await stop()`` cancels it. Or run
    ``run(session)`` as a task of your own. Without a provider both are no-ops.
    """

    __slots__ = (
        "_clock",
        "_current",
        "_fallback",
        "_fallback_reported",
        "_history",
        "_history_size",
        "_last_good_at_s",
        "_max_retry_after_s",
        "_not_before_s",
        "_provider",
        "_refresh_s",
        "_retry_attempts",
        "_retry_wait_initial_s",
        "_retry_wait_jitter_s",
        "_retry_wait_max_s",
        "_stale_after_s",
        "_subscribers",
        "_task",
        "refresh_errors",
    )

    def __init__(
        self,
        static: Intensity,
        provider: IntensityProvider | None = None,
        *,
        refresh_s: float = 300.0,
        stale_after_s: float | None = None,
        retry_attempts: int = 3,
        retry_wait_initial_s: float = 1.0,
        retry_wait_max_s: float = 30.0,
        retry_wait_jitter_s: float = 1.0,
        max_retry_after_s: float = 60.0,
        history_size: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``static`` is the table figure (or the fixed one without a provider).

        ``stale_after_s`` (default three refresh periods) bounds how long a last good
        live figure outlives failures. A Retry-After up to ``max_retry_after_s`` is
        waited out within the refresh; a longer one ends the refresh and delays the
        next one until it has passed. ``clock`` is monotonic seconds, the same clock
        as the callers' energy bookkeeping so :meth:`intensity_at` lines up.
        """
        if refresh_s <= 0:
            raise ValueError(f"refresh period must be positive, got {refresh_s!r} s")
        if retry_attempts < 1:
            raise ValueError(f"at least one attempt per refresh, got {retry_attempts!r}")
        if history_size < 1:
            raise ValueError(f"history must keep at least one entry, got {history_size!r}")
        self._provider = provider
        self._refresh_s = refresh_s
        self._stale_after_s = stale_after_s if stale_after_s is not None else 3 * refresh_s
        self._retry_attempts = retry_attempts
        self._retry_wait_initial_s = retry_wait_initial_s
        self._retry_wait_max_s = retry_wait_max_s
        self._retry_wait_jitter_s = retry_wait_jitter_s
        self._max_retry_after_s = max_retry_after_s
        self._history_size = history_size
        self._clock = clock
        self._fallback = dataclasses.replace(static, source="static-fallback")
        self._current = static if provider is None else self._fallback
        self._history = [IntensityChange(clock(), self._current)]
        self._subscribers: list[Callable[[Intensity], None]] = []
        self._last_good_at_s: float | None = None
        self._fallback_reported = False
        self._not_before_s = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self.refresh_errors: dict[str, int] = {}
        """Failed refreshes by provider name (``llm_energy_carbon_refresh_errors_total``)."""

    @classmethod
    def fixed(cls, g_per_kwh: float, region: str) -> CarbonIntensityTracker:
        """A tracker that always answers the operator's ``--carbon-intensity``."""
        if g_per_kwh < 0:
            raise ValueError(f"intensity cannot be negative, got {g_per_kwh!r} g/kWh")
        return cls(Intensity(g_per_kwh, region, "fixed", "as configured", None))

    @property
    def current(self) -> Intensity:
        """The intensity in force now. A plain attribute read: safe in collectors."""
        return self._current

    # The four fields of ``current``, so the tracker itself can be handed to code that
    # reads an intensity's fields (the meter's ``IntensitySource``) and always sees
    # the figure in force. Reads between awaits cannot straddle a change.
    @property
    def g_per_kwh(self) -> float:
        """``current.g_per_kwh``: grams CO2e per kWh in force now."""
        return self._current.g_per_kwh

    @property
    def region(self) -> str:
        """``current.region``: the ``region`` label of the figure in force."""
        return self._current.region

    @property
    def source(self) -> Source:
        """``current.source``: the ``source`` label of the figure in force."""
        return self._current.source

    @property
    def basis(self) -> Basis:
        """``current.basis``: what the figure in force counts."""
        return self._current.basis

    @property
    def provider(self) -> IntensityProvider | None:
        """The live provider, if any."""
        return self._provider

    @property
    def history(self) -> tuple[IntensityChange, ...]:
        """The retained changes, oldest first (at most ``history_size``)."""
        return tuple(self._history)

    def intensity_at(self, time_s: float) -> Intensity:
        """The intensity that was in force at monotonic ``time_s``.

        Times before the oldest retained change get that oldest change: with the
        default history this reaches back days at a 5-minute refresh.
        """
        index = bisect.bisect_right(self._history, time_s, key=lambda change: change.time_s)
        return self._history[max(0, index - 1)].intensity

    def subscribe(self, callback: Callable[[Intensity], None]) -> Callable[[], None]:
        """Call ``callback(new)`` on the event loop whenever the intensity changes.

        Returns a function that unsubscribes. A callback that raises is logged and
        kept; it cannot break the tracker.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Spawn the refresh loop on ``session`` (no-op without a provider)."""
        if self._provider is None or self._task is not None:
            return
        self._task = asyncio.create_task(self.run(session), name="carbon-intensity-refresh")

    async def stop(self) -> None:
        """Cancel the refresh loop and wait for it; safe to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Refresh now, then every ``refresh_s`` (later after a long Retry-After), forever."""
        if self._provider is None:
            return
        while True:
            await self.refresh(session)
            delay_s = max(self._refresh_s, self._not_before_s - self._clock())
            await asyncio.sleep(delay_s)

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        """One refresh with retries. True when a live figure is now in force.

        Never raises (cancellation aside): every failure ends in the last good
        figure or the static fallback.
        """
        provider = self._provider
        if provider is None:
            return False
        try:
            intensity = await self._fetch_with_retries(provider, session)
        except ProviderRateLimitedError as e:
            if e.retry_after_s is not None:
                self._not_before_s = self._clock() + e.retry_after_s
            self._on_failure(provider, e)
            return False
        except ProviderError as e:
            self._on_failure(provider, e)
            return False
        except Exception as e:  # a provider bug must cost a figure, never the sidecar
            log.exception("carbon.refresh_crashed", provider=provider.name, zone=provider.zone)
            self._on_failure(provider, e)
            return False
        self._on_success(intensity)
        return True

    async def _fetch_with_retries(
        self, provider: IntensityProvider, session: aiohttp.ClientSession
    ) -> Intensity:
        async for attempt in stamina.retry_context(
            on=self._backoff_hook,
            attempts=self._retry_attempts,
            timeout=self._refresh_s,
            wait_initial=self._retry_wait_initial_s,
            wait_max=self._retry_wait_max_s,
            wait_jitter=self._retry_wait_jitter_s,
        ):
            with attempt:
                return await provider.fetch(session)
        raise AssertionError("stamina ended without an attempt")  # pragma: no cover

    def _backoff_hook(self, error: Exception) -> bool | float:
        """Retry transient failures with backoff; a 429 after exactly its Retry-After.

        A Retry-After longer than ``max_retry_after_s`` ends this refresh instead:
        :meth:`run` then waits it out before the next one.
        """
        if isinstance(error, ProviderRateLimitedError):
            if error.retry_after_s is None:
                return True
            return error.retry_after_s if error.retry_after_s <= self._max_retry_after_s else False
        return isinstance(error, ProviderTransientError)

    def _on_success(self, intensity: Intensity) -> None:
        if self._fallback_reported:
            log.info(
                "carbon.recovered",
                provider=intensity.source,
                zone=intensity.region,
                intensity_g_per_kwh=intensity.g_per_kwh,
                old_basis=self._fallback.basis,
                new_basis=intensity.basis,
            )
            self._fallback_reported = False
        self._last_good_at_s = self._clock()
        self._set(intensity)

    def _on_failure(self, provider: IntensityProvider, error: Exception) -> None:
        self.refresh_errors[provider.name] = self.refresh_errors.get(provider.name, 0) + 1
        now_s = self._clock()
        reason = str(error) or type(error).__name__
        live = self._current.source == provider.name
        if (
            live
            and self._last_good_at_s is not None
            and now_s - self._last_good_at_s < self._stale_after_s
        ):
            log.warning(
                "carbon.refresh_failed",
                provider=provider.name,
                zone=provider.zone,
                reason=reason,
                kept="last good value",
                age_s=round(now_s - self._last_good_at_s, 1),
                intensity_g_per_kwh=self._current.g_per_kwh,
            )
            return
        if self._fallback_reported:
            log.debug("carbon.refresh_failed", provider=provider.name, reason=reason)
            return
        old_basis = self._current.basis if live else provider.basis
        log.warning(
            "carbon.fallback",
            provider=provider.name,
            zone=provider.zone,
            region=self._fallback.region,
            reason=reason,
            source="static-fallback",
            intensity_g_per_kwh=self._fallback.g_per_kwh,
            old_basis=old_basis,
            new_basis=self._fallback.basis,
            basis_changed=old_basis != self._fallback.basis,
        )
        self._fallback_reported = True
        self._set(self._fallback)

    def _set(self, intensity: Intensity) -> None:
        if intensity == self._current:
            return
        self._current = intensity
        self._history.append(IntensityChange(self._clock(), intensity))
        if len(self._history) > self._history_size:
            del self._history[0]  # changes come minutes apart: a short list shift is nothing
        for callback in list(self._subscribers):
            try:
                callback(intensity)
            except Exception:
                log.exception("carbon.subscriber_failed", callback=repr(callback))
