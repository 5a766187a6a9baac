"""The sidecar's own health in /metrics: process series, observer scrape and carbon refresh errors."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.carbon.intensity import Basis, Intensity, LiveSource
from sidecar.carbon.providers import ProviderServerError
from sidecar.carbon.tracker import CarbonIntensityTracker
from sidecar.metrics import HealthCollector, make_registry
from sidecar.tracking.observer import SCRAPE_ERROR_REASONS, Observer, scrape_error_reason


def families(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(registry).decode()
    return {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }


def test_registry_carries_process_metrics() -> None:
    """The sidecar's registry exports process_* (resident memory, CPU) for its own cost."""
    got = families(make_registry(HealthCollector(observer_errors=dict, carbon_errors=dict)))
    assert got["process_resident_memory_bytes"][0][1] > 0
    assert "process_cpu_seconds" in got


def test_health_counters_by_reason_and_provider() -> None:
    """Observer scrape errors are counted by reason, carbon refresh errors by provider."""
    collector = HealthCollector(
        observer_errors=lambda: {"timeout": 2, "connect": 1},
        carbon_errors=lambda: {"electricitymaps": 3},
    )
    got = families(make_registry(collector))
    assert sorted(
        (labels["reason"], v) for labels, v in got["llm_energy_observer_scrape_errors"]
    ) == [("connect", 1.0), ("timeout", 2.0)]
    assert got["llm_energy_carbon_refresh_errors"] == [({"provider": "electricitymaps"}, 3.0)]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (TimeoutError(), "timeout"),
        (aiohttp.ClientConnectionError(), "connect"),
        (ConnectionRefusedError(), "connect"),
        (ValueError("bad line"), "parse"),
        (RuntimeError("?"), "unknown"),
    ],
)
def test_scrape_error_reasons_are_bounded(error: Exception, reason: str) -> None:
    """Every scrape failure maps to one of a few reasons (a bounded label)."""
    assert scrape_error_reason(error) == reason
    assert reason in SCRAPE_ERROR_REASONS


async def test_observer_counts_failed_scrapes_by_reason(aiohttp_server: object) -> None:
    """A 500 and an unreachable server are counted as http_status and connect."""

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_get("/metrics", broken)
    server = await aiohttp_server(app)  # type: ignore[operator]
    observer = Observer(str(server.make_url("/metrics")), default_model="d")
    try:
        assert await observer.scrape_once() is None
    finally:
        await observer.close()
    gone = Observer("http://127.0.0.1:9/metrics", default_model="d")
    try:
        assert await gone.scrape_once() is None
    finally:
        await gone.close()
    assert observer.errors_by_reason == {"http_status": 1}
    assert gone.errors_by_reason == {"connect": 1}


async def test_carbon_refresh_failures_counted_by_provider() -> None:
    """Each failed live refresh adds one to its provider's count; the fallback stays in force."""

    class Down:
        name: LiveSource = "electricitymaps"
        zone = "FR"
        basis: Basis = "lifecycle average"

        async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
            raise ProviderServerError("electricitymaps", 503)

    static = Intensity(50.0, "FR", "static", "lifecycle average")
    tracker = CarbonIntensityTracker(
        static,
        Down(),
        retry_attempts=1,
        retry_wait_initial_s=0.0,
        retry_wait_max_s=0.0,
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            assert not await tracker.refresh(session)
    assert tracker.refresh_errors == {"electricitymaps": 2}
