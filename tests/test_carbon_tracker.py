"""The intensity tracker: refresh, retries, last good value, fallback, history."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import structlog

from sidecar.carbon.intensity import Basis, Intensity, LiveSource
from sidecar.carbon.providers import (
    ProviderAuthError,
    ProviderRateLimitedError,
    ProviderResponseError,
    ProviderServerError,
    ProviderUnreachableError,
)
from sidecar.carbon.tracker import CarbonIntensityTracker

STATIC = Intensity(179.064, "US-CA", "static", "lifecycle average")
LIVE_1 = Intensity(
    400.0, "CAISO_NORTH", "watttime", "direct marginal", datetime(2024, 6, 18, 18, 40, tzinfo=UTC)
)
LIVE_2 = Intensity(
    300.0, "CAISO_NORTH", "watttime", "direct marginal", datetime(2024, 6, 18, 18, 45, tzinfo=UTC)
)


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class Scripted:
    """A provider answering from a script of figures and errors; the last one repeats."""

    name: LiveSource = "watttime"
    zone = "CAISO_NORTH"
    basis: Basis = "direct marginal"

    def __init__(self, *outcomes: Intensity | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[float] = []

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        self.calls.append(time.monotonic())
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def server_error() -> ProviderServerError:
    return ProviderServerError("watttime", 503)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def tracker(
    provider: Scripted | None, clock: Callable[[], float] | None = None, **kwargs: Any
) -> CarbonIntensityTracker:
    options: dict[str, Any] = {
        "refresh_s": 300.0,
        "retry_attempts": 3,
        "retry_wait_initial_s": 0.001,
        "retry_wait_max_s": 0.002,
        "retry_wait_jitter_s": 0.0,
        "clock": clock or Clock(),
    }
    options.update(kwargs)
    return CarbonIntensityTracker(STATIC, provider, **options)


def events(logs: Sequence[MutableMapping[str, Any]], level: str = "warning") -> list[str]:
    return [e["event"] for e in logs if e["log_level"] == level]


class TestWithoutProvider:
    async def test_static(self, session: aiohttp.ClientSession) -> None:
        """Without a provider the table figure is in force, labelled static, and nothing runs."""
        t = tracker(None)
        assert t.current == STATIC
        assert not await t.refresh(session)
        await t.start(session)
        await t.stop()
        await t.run(session)  # returns at once
        assert t.current == STATIC

    def test_fixed(self) -> None:
        """--carbon-intensity is labelled fixed, on the basis the operator chose."""
        t = CarbonIntensityTracker.fixed(42.0, "FR")
        assert t.current == Intensity(42.0, "FR", "fixed", "as configured", None)

    def test_fixed_negative_rejected(self) -> None:
        """A negative fixed intensity is refused."""
        with pytest.raises(ValueError, match="negative"):
            CarbonIntensityTracker.fixed(-1.0, "FR")


class TestRefresh:
    def test_starts_on_fallback_figure(self) -> None:
        """Until a live answer arrives the table figure is in force, labelled static-fallback."""
        t = tracker(Scripted(LIVE_1))
        assert t.current.source == "static-fallback"
        assert t.current.g_per_kwh == STATIC.g_per_kwh

    async def test_success(self, session: aiohttp.ClientSession) -> None:
        """A live answer comes into force."""
        t = tracker(Scripted(LIVE_1))
        assert await t.refresh(session)
        assert t.current == LIVE_1

    async def test_reads_like_an_intensity(self, session: aiohttp.ClientSession) -> None:
        """The tracker's own fields follow the figure in force, for code that holds it."""
        t = tracker(Scripted(LIVE_1))
        assert (t.g_per_kwh, t.source) == (STATIC.g_per_kwh, "static-fallback")
        await t.refresh(session)
        assert (t.g_per_kwh, t.region, t.source, t.basis) == (
            400.0,
            "CAISO_NORTH",
            "watttime",
            "direct marginal",
        )

    async def test_transient_errors_retried(self, session: aiohttp.ClientSession) -> None:
        """5xx and timeouts are retried within the refresh."""
        provider = Scripted(server_error(), ProviderUnreachableError("watttime", "timeout"), LIVE_1)
        t = tracker(provider)
        assert await t.refresh(session)
        assert len(provider.calls) == 3
        assert t.current == LIVE_1

    @pytest.mark.parametrize(
        "error",
        [
            ProviderAuthError("watttime", "refused"),
            ProviderResponseError("watttime", "percentile"),
        ],
    )
    async def test_permanent_errors_not_retried(
        self, session: aiohttp.ClientSession, error: Exception
    ) -> None:
        """Auth failures and malformed answers are not retried: one call, then fallback."""
        provider = Scripted(error)
        t = tracker(provider)
        assert not await t.refresh(session)
        assert len(provider.calls) == 1
        assert t.current.source == "static-fallback"

    async def test_attempts_bounded(self, session: aiohttp.ClientSession) -> None:
        """A provider that keeps failing is tried retry_attempts times per refresh."""
        provider = Scripted(server_error())
        t = tracker(provider)
        assert not await t.refresh(session)
        assert len(provider.calls) == 3

    async def test_provider_bug_never_crashes(self, session: aiohttp.ClientSession) -> None:
        """Even an unexpected exception from a provider only costs the live figure."""
        t = tracker(Scripted(RuntimeError("bug")))
        with structlog.testing.capture_logs() as logs:
            assert not await t.refresh(session)
        assert t.current.source == "static-fallback"
        assert "carbon.refresh_crashed" in events(logs, "error")


class TestRateLimit:
    async def test_waits_retry_after_before_next_try(self, session: aiohttp.ClientSession) -> None:
        """A 429's Retry-After is slept exactly before the next try."""
        provider = Scripted(ProviderRateLimitedError("watttime", 0.2), LIVE_1)
        t = tracker(provider)
        assert await t.refresh(session)
        assert provider.calls[1] - provider.calls[0] >= 0.19

    async def test_long_retry_after_delays_next_refresh(
        self, session: aiohttp.ClientSession
    ) -> None:
        """A Retry-After beyond max_retry_after_s ends the refresh; the loop waits it out."""
        provider = Scripted(ProviderRateLimitedError("watttime", 0.3), LIVE_1)
        t = tracker(provider, clock=time.monotonic, refresh_s=0.01, max_retry_after_s=0.05)
        task = asyncio.create_task(t.run(session))
        try:
            for _ in range(200):
                if len(provider.calls) >= 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert len(provider.calls) >= 2
        assert provider.calls[1] - provider.calls[0] >= 0.29
        assert t.current == LIVE_1

    async def test_no_retry_after_uses_backoff(self, session: aiohttp.ClientSession) -> None:
        """A 429 without Retry-After is retried with the normal backoff."""
        provider = Scripted(ProviderRateLimitedError("watttime", None), LIVE_1)
        assert await tracker(provider).refresh(session)
        assert len(provider.calls) == 2


class TestLastGoodAndFallback:
    async def test_keeps_last_good_then_falls_back(self, session: aiohttp.ClientSession) -> None:
        """After failures the last good value stays until stale, then the table takes over,
        logged once with the basis change; recovery is logged too."""
        clock = Clock()
        provider = Scripted(LIVE_1, server_error())
        t = tracker(provider, clock, refresh_s=10.0, retry_attempts=1)
        assert await t.refresh(session)

        clock.now_s += 10
        with structlog.testing.capture_logs() as logs:
            assert not await t.refresh(session)
        assert t.current == LIVE_1
        assert events(logs) == ["carbon.refresh_failed"]

        clock.now_s += 25  # 35 s old: past 3 x refresh_s
        with structlog.testing.capture_logs() as logs:
            assert not await t.refresh(session)
            clock.now_s += 10
            assert not await t.refresh(session)
        assert t.current.source == "static-fallback"
        assert t.current.g_per_kwh == STATIC.g_per_kwh
        assert events(logs) == ["carbon.fallback"]
        (fallback,) = [e for e in logs if e["event"] == "carbon.fallback"]
        assert fallback["old_basis"] == "direct marginal"
        assert fallback["new_basis"] == "lifecycle average"
        assert fallback["basis_changed"] is True
        assert "503" in fallback["reason"]

        provider.outcomes = [LIVE_2]
        with structlog.testing.capture_logs() as logs:
            assert await t.refresh(session)
        assert t.current == LIVE_2
        assert events(logs, "info") == ["carbon.recovered"]

    async def test_never_good_falls_back_with_provider_basis(
        self, session: aiohttp.ClientSession
    ) -> None:
        """With no live answer ever, the fallback log names the provider's basis as the old one."""
        t = tracker(Scripted(server_error()))
        with structlog.testing.capture_logs() as logs:
            await t.refresh(session)
        (fallback,) = [e for e in logs if e["event"] == "carbon.fallback"]
        assert fallback["old_basis"] == "direct marginal"
        assert fallback["region"] == "US-CA"

    async def test_stale_after_configurable(self, session: aiohttp.ClientSession) -> None:
        """stale_after_s bounds how long a last good value outlives failures."""
        clock = Clock()
        provider = Scripted(LIVE_1, server_error())
        t = tracker(provider, clock, stale_after_s=5.0, retry_attempts=1)
        await t.refresh(session)
        clock.now_s += 6
        await t.refresh(session)
        assert t.current.source == "static-fallback"


class TestHistoryAndSubscribers:
    async def test_intensity_in_force_at_a_time(self, session: aiohttp.ClientSession) -> None:
        """intensity_at answers the figure in force at a past moment of the shared clock."""
        clock = Clock()
        provider = Scripted(LIVE_1)
        t = tracker(provider, clock)
        clock.now_s = 200.0
        await t.refresh(session)
        provider.outcomes = [LIVE_2]
        clock.now_s = 500.0
        await t.refresh(session)
        assert t.intensity_at(150.0).source == "static-fallback"
        assert t.intensity_at(200.0) == LIVE_1
        assert t.intensity_at(499.9) == LIVE_1
        assert t.intensity_at(10_000.0) == LIVE_2
        assert t.intensity_at(0.0).source == "static-fallback"  # before history: oldest
        assert [c.time_s for c in t.history] == [100.0, 200.0, 500.0]

    async def test_unchanged_answer_not_recorded(self, session: aiohttp.ClientSession) -> None:
        """The same answer twice is one change, not two."""
        t = tracker(Scripted(LIVE_1))
        await t.refresh(session)
        await t.refresh(session)
        assert len(t.history) == 2

    async def test_history_bounded(self, session: aiohttp.ClientSession) -> None:
        """History keeps at most history_size changes."""
        clock = Clock()
        provider = Scripted(LIVE_1)
        t = tracker(provider, clock, history_size=3)
        for i in range(10):
            provider.outcomes = [Intensity(float(i), "Z", "watttime", "direct marginal")]
            clock.now_s += 1
            await t.refresh(session)
        assert len(t.history) == 3
        assert t.history[-1].intensity.g_per_kwh == 9.0

    async def test_subscribers(self, session: aiohttp.ClientSession) -> None:
        """Subscribers see each change; a failing one is logged and cannot break the tracker."""
        seen: list[Intensity] = []

        def broken(_: Intensity) -> None:
            raise RuntimeError("subscriber bug")

        t = tracker(Scripted(LIVE_1))
        t.subscribe(broken)
        unsubscribe = t.subscribe(seen.append)
        with structlog.testing.capture_logs() as logs:
            assert await t.refresh(session)
        assert seen == [LIVE_1]
        assert "carbon.subscriber_failed" in events(logs, "error")
        unsubscribe()
        unsubscribe()  # twice is harmless
        t.provider.outcomes = [LIVE_2]  # type: ignore[union-attr]
        await t.refresh(session)
        assert seen == [LIVE_1]


class TestLifecycle:
    async def test_periodic_refresh_and_stop(self, session: aiohttp.ClientSession) -> None:
        """The loop refreshes every refresh_s until stopped; starting twice runs one loop."""
        provider = Scripted(LIVE_1)
        t = tracker(provider, clock=time.monotonic, refresh_s=0.02)
        await t.start(session)
        await t.start(session)
        await asyncio.sleep(0.15)
        await t.stop()
        await t.stop()
        calls = len(provider.calls)
        assert 3 <= calls <= 10
        await asyncio.sleep(0.05)
        assert len(provider.calls) == calls

    @pytest.mark.parametrize(
        "kwargs", [{"refresh_s": 0.0}, {"retry_attempts": 0}, {"history_size": 0}]
    )
    def test_bad_settings_rejected(self, kwargs: dict[str, float]) -> None:
        """Nonsense settings are refused at construction."""
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            CarbonIntensityTracker(STATIC, None, **kwargs)  # type: ignore[arg-type]
