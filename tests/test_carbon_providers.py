"""Live intensity clients against a local server speaking the providers' documented shapes."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from sidecar.carbon.intensity import Intensity
from sidecar.carbon.providers import (
    ElectricityMapsProvider,
    ProviderAuthError,
    ProviderRateLimitedError,
    ProviderRequestError,
    ProviderResponseError,
    ProviderServerError,
    ProviderUnreachableError,
    UKProvider,
    WattTimeProvider,
    parse_retry_after,
    parse_timestamp,
)
from sidecar.carbon.tracker import CarbonIntensityTracker

# Response shapes from the providers' documentation (see shared/REFERENCE.md).
EM_LATEST: dict[str, Any] = {
    "zone": "DE",
    "carbonIntensity": 322,
    "datetime": "2019-05-21T00:00:00.000Z",
    "updatedAt": "2019-05-21T00:30:00.000Z",
    "createdAt": "2019-05-18T00:35:00.000Z",
    "emissionFactorType": "lifecycle",
    "isEstimated": False,
    "estimationMethod": None,
}
WT_FORECAST: dict[str, Any] = {
    "data": [
        {"point_time": "2024-06-18T18:40:00+00:00", "value": 1000.0},
        {"point_time": "2024-06-18T18:45:00+00:00", "value": 900.0},
    ],
    "meta": {
        "data_point_period_seconds": 300,
        "region": "CAISO_NORTH",
        "signal_type": "co2_moer",
        "units": "lbs_co2_per_mwh",
        "warnings": [],
        "generated_at": "2024-06-18T18:40:00+00:00",
    },
}
WT_SIGNAL_INDEX: dict[str, Any] = {
    "data": [{"point_time": "2024-06-18T18:40:00+00:00", "value": 96.0}],
    "meta": {
        "data_point_period_seconds": 300,
        "region": "PSCO",
        "signal_type": "co2_moer",
        "units": "percentile",
        "warnings": [],
        "model": {"date": "2022-10-01"},
    },
}
UK_INTENSITY: dict[str, Any] = {
    "data": [
        {
            "from": "2018-01-20T12:00Z",
            "to": "2018-01-20T12:30Z",
            "intensity": {"forecast": 266, "actual": 263, "index": "moderate"},
        }
    ]
}


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer: a JSON body (or raw text), status, headers, delay."""

    body: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class FakeApi:
    """A local HTTP server answering each path from a script; the last reply repeats."""

    def __init__(self) -> None:
        self.script: dict[str, list[Reply]] = {}
        self.seen: list[Seen] = []
        self.base_url = ""

    def on(self, path: str, *replies: Reply) -> None:
        self.script[path] = list(replies)

    def calls(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.path, dict(request.query), dict(request.headers)))
        replies = self.script.get(request.path)
        if not replies:
            return web.json_response({"error": "not found"}, status=404)
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.raw is not None:
            return web.Response(text=reply.raw, status=reply.status, headers=reply.headers)
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handle)
        return app


@pytest.fixture
async def api(aiohttp_server: AiohttpServer) -> FakeApi:
    fake = FakeApi()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def em(api: FakeApi, **kwargs: Any) -> ElectricityMapsProvider:
    return ElectricityMapsProvider("DE", "secret-token", base_url=api.base_url, **kwargs)


def wt(api: FakeApi, clock: Clock | None = None) -> WattTimeProvider:
    return WattTimeProvider(
        "CAISO_NORTH", "user", "pass", base_url=api.base_url, clock=clock or Clock()
    )


EM_PATH = "/v3/carbon-intensity/latest"


class TestElectricityMaps:
    async def test_latest(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """The documented answer gives its intensity, zone, time and lifecycle basis."""
        api.on(EM_PATH, Reply(EM_LATEST))
        got = await em(api).fetch(session)
        assert got == Intensity(
            322.0, "DE", "electricitymaps", "lifecycle average", datetime(2019, 5, 21, tzinfo=UTC)
        )
        (call,) = api.calls(EM_PATH)
        assert call.query == {"zone": "DE"}
        assert call.headers["auth-token"] == "secret-token"

    async def test_direct_basis(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """Asking for direct factors sends emissionFactorType and records a direct basis."""
        api.on(EM_PATH, Reply({**EM_LATEST, "emissionFactorType": "direct"}))
        provider = em(api, emission_factor_type="direct")
        got = await provider.fetch(session)
        assert got.basis == provider.basis == "direct average"
        assert api.calls(EM_PATH)[0].query["emissionFactorType"] == "direct"

    async def test_missing_factor_type_is_lifecycle(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """Older answers without emissionFactorType are lifecycle, the API's default."""
        body = {k: v for k, v in EM_LATEST.items() if k != "emissionFactorType"}
        api.on(EM_PATH, Reply(body))
        assert (await em(api).fetch(session)).basis == "lifecycle average"

    @pytest.mark.parametrize("status", [401, 403])
    async def test_auth(self, api: FakeApi, session: aiohttp.ClientSession, status: int) -> None:
        """A refused token is an auth error, and the token never appears in it."""
        api.on(EM_PATH, Reply({"error": "Invalid token"}, status=status))
        with pytest.raises(ProviderAuthError) as info:
            await em(api).fetch(session)
        assert "secret-token" not in str(info.value)
        assert "secret-token" not in repr(em(api))

    async def test_rate_limited(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """429 carries the Retry-After seconds."""
        api.on(EM_PATH, Reply({"error": "slow down"}, status=429, headers={"Retry-After": "7"}))
        with pytest.raises(ProviderRateLimitedError) as info:
            await em(api).fetch(session)
        assert info.value.retry_after_s == 7.0

    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_server_error(
        self, api: FakeApi, session: aiohttp.ClientSession, status: int
    ) -> None:
        """5xx is a (retryable) server error with its status."""
        api.on(EM_PATH, Reply(raw="<html>oops</html>", status=status))
        with pytest.raises(ProviderServerError) as info:
            await em(api).fetch(session)
        assert info.value.status == status

    async def test_bad_zone(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """Another 4xx is a request error quoting the provider's message."""
        api.on(EM_PATH, Reply({"error": "Zone 'XX' does not exist"}, status=400))
        with pytest.raises(ProviderRequestError, match="does not exist"):
            await em(api).fetch(session)

    async def test_malformed_json(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """A body that is not JSON is a response error."""
        api.on(EM_PATH, Reply(raw='{"zone": "DE", "carbonInt'))
        with pytest.raises(ProviderResponseError, match="not JSON"):
            await em(api).fetch(session)

    @pytest.mark.parametrize(
        ("value", "match"), [(None, "null"), ("322", "not a number"), (-5, "not a valid")]
    )
    async def test_bad_values(
        self, api: FakeApi, session: aiohttp.ClientSession, value: object, match: str
    ) -> None:
        """Null, string or negative intensities are refused, never read as zero."""
        api.on(EM_PATH, Reply({**EM_LATEST, "carbonIntensity": value}))
        with pytest.raises(ProviderResponseError, match=match):
            await em(api).fetch(session)

    async def test_missing_field(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """An answer without carbonIntensity is a response error."""
        api.on(EM_PATH, Reply({"zone": "DE"}))
        with pytest.raises(ProviderResponseError, match="missing"):
            await em(api).fetch(session)

    async def test_not_an_object(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """A JSON array where an object belongs is a response error."""
        api.on(EM_PATH, Reply([1, 2, 3]))
        with pytest.raises(ProviderResponseError, match="not an object"):
            await em(api).fetch(session)

    async def test_timeout(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """A slow answer past the per-request timeout is an unreachable error."""
        api.on(EM_PATH, Reply(EM_LATEST, delay_s=0.5))
        with pytest.raises(ProviderUnreachableError, match="no answer within"):
            await em(api, timeout_s=0.05).fetch(session)

    async def test_connection_refused(self, session: aiohttp.ClientSession) -> None:
        """Nobody listening is an unreachable error."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        provider = ElectricityMapsProvider("DE", "t", base_url=f"http://127.0.0.1:{port}")
        with pytest.raises(ProviderUnreachableError):
            await provider.fetch(session)

    async def test_codecarbon_fixture(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """CodeCarbon's FR fixture reads 58.765 g/kWh."""
        api.on(EM_PATH, Reply({**EM_LATEST, "zone": "FR", "carbonIntensity": 58.765}))
        got = await ElectricityMapsProvider("FR", "t", base_url=api.base_url).fetch(session)
        assert (got.g_per_kwh, got.region) == (58.765, "FR")


class TestWattTime:
    def login_ok(self, api: FakeApi, *tokens: str) -> None:
        api.on("/login", *(Reply({"token": t}) for t in (tokens or ("tok-1",))))

    async def test_moer(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """Logs in with Basic auth, reads the first forecast point, converts lb/MWh to g/kWh."""
        self.login_ok(api)
        api.on("/v3/forecast", Reply(WT_FORECAST))
        got = await wt(api).fetch(session)
        assert got.g_per_kwh == pytest.approx(453.59237)
        assert (got.source, got.basis, got.region) == ("watttime", "direct marginal", "CAISO_NORTH")
        assert got.measured_at == datetime(2024, 6, 18, 18, 40, tzinfo=UTC)
        (login,) = api.calls("/login")
        assert login.headers["Authorization"] == "Basic " + base64.b64encode(b"user:pass").decode()
        (forecast,) = api.calls("/v3/forecast")
        assert forecast.headers["Authorization"] == "Bearer tok-1"
        assert forecast.query == {"region": "CAISO_NORTH", "signal_type": "co2_moer"}

    async def test_token_reused_then_renewed(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """The token is reused within its 30 minutes and renewed before it runs out."""
        self.login_ok(api, "tok-1", "tok-2")
        api.on("/v3/forecast", Reply(WT_FORECAST))
        clock = Clock()
        provider = wt(api, clock)
        await provider.fetch(session)
        clock.now_s += 20 * 60
        await provider.fetch(session)
        assert len(api.calls("/login")) == 1
        clock.now_s += 10 * 60
        await provider.fetch(session)
        assert len(api.calls("/login")) == 2
        assert api.calls("/v3/forecast")[-1].headers["Authorization"] == "Bearer tok-2"

    async def test_relogin_on_401(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """A 401 on data (token revoked early) triggers one fresh login, then succeeds."""
        self.login_ok(api, "tok-1", "tok-2")
        api.on("/v3/forecast", Reply({"error": "expired"}, status=401), Reply(WT_FORECAST))
        got = await wt(api).fetch(session)
        assert got.g_per_kwh == pytest.approx(453.59237)
        assert len(api.calls("/login")) == 2
        assert api.calls("/v3/forecast")[-1].headers["Authorization"] == "Bearer tok-2"

    async def test_401_twice_is_auth_error(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """If the fresh token is refused too, it is an auth error (no login loop)."""
        self.login_ok(api)
        api.on("/v3/forecast", Reply({"error": "no access"}, status=401))
        with pytest.raises(ProviderAuthError):
            await wt(api).fetch(session)
        assert len(api.calls("/login")) == 2

    async def test_login_refused(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """A refused login is an auth error that does not echo the password."""
        api.on("/login", Reply({"error": "bad credentials"}, status=401))
        with pytest.raises(ProviderAuthError) as info:
            await wt(api).fetch(session)
        assert "pass" not in str(info.value).replace("password", "")

    async def test_percentile_rejected(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """The 0-100 signal index is never taken for an emission rate."""
        self.login_ok(api)
        api.on("/v3/forecast", Reply(WT_SIGNAL_INDEX))
        with pytest.raises(ProviderResponseError, match="percentile"):
            await wt(api).fetch(session)

    async def test_other_units_rejected(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """Units other than lbs_co2_per_mwh are refused rather than guessed."""
        self.login_ok(api)
        body = {**WT_FORECAST, "meta": {**WT_FORECAST["meta"], "units": "kg_co2_per_mwh"}}
        api.on("/v3/forecast", Reply(body))
        with pytest.raises(ProviderResponseError, match="units"):
            await wt(api).fetch(session)

    async def test_null_value(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """A null MOER is refused."""
        self.login_ok(api)
        body = {**WT_FORECAST, "data": [{"point_time": "2024-06-18T18:40:00Z", "value": None}]}
        api.on("/v3/forecast", Reply(body))
        with pytest.raises(ProviderResponseError, match="null"):
            await wt(api).fetch(session)

    async def test_no_points(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """An empty forecast is refused."""
        self.login_ok(api)
        api.on("/v3/forecast", Reply({**WT_FORECAST, "data": []}))
        with pytest.raises(ProviderResponseError, match="no data"):
            await wt(api).fetch(session)

    async def test_rate_limited_http_date(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """429 with an HTTP-date Retry-After gives the seconds until then."""
        self.login_ok(api)
        when = datetime.now(UTC) + timedelta(seconds=120)
        header = when.strftime("%a, %d %b %Y %H:%M:%S GMT")
        api.on("/v3/forecast", Reply({}, status=429, headers={"Retry-After": header}))
        with pytest.raises(ProviderRateLimitedError) as info:
            await wt(api).fetch(session)
        assert info.value.retry_after_s == pytest.approx(120, abs=3)

    async def test_login_without_token(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """A login answer without a token is a response error."""
        api.on("/login", Reply({"message": "ok"}))
        with pytest.raises(ProviderResponseError, match="token"):
            await wt(api).fetch(session)


class TestUK:
    async def test_actual(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """The half-hour's actual is used, timed by its minute-precision start."""
        api.on("/intensity", Reply(UK_INTENSITY))
        got = await UKProvider(base_url=api.base_url).fetch(session)
        assert got == Intensity(
            263.0, "GB", "uk", "direct average", datetime(2018, 1, 20, 12, 0, tzinfo=UTC)
        )

    async def test_forecast_when_actual_null(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """A null actual (not yet published) falls back to the forecast."""
        period = {**UK_INTENSITY["data"][0]}
        period["intensity"] = {"forecast": 266, "actual": None, "index": "moderate"}
        api.on("/intensity", Reply({"data": [period]}))
        assert (await UKProvider(base_url=api.base_url).fetch(session)).g_per_kwh == 266.0

    async def test_both_null(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """Null actual and forecast is a response error."""
        period = {**UK_INTENSITY["data"][0]}
        period["intensity"] = {"forecast": None, "actual": None, "index": "moderate"}
        api.on("/intensity", Reply({"data": [period]}))
        with pytest.raises(ProviderResponseError, match="forecast is null"):
            await UKProvider(base_url=api.base_url).fetch(session)

    async def test_empty(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """No periods is a response error."""
        api.on("/intensity", Reply({"data": []}))
        with pytest.raises(ProviderResponseError):
            await UKProvider(base_url=api.base_url).fetch(session)

    async def test_bad_time(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """An unparseable period start is a response error."""
        period = {**UK_INTENSITY["data"][0], "from": "yesterday noon"}
        api.on("/intensity", Reply({"data": [period]}))
        with pytest.raises(ProviderResponseError, match="date-time"):
            await UKProvider(base_url=api.base_url).fetch(session)

    async def test_server_error(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """5xx is a server error."""
        api.on("/intensity", Reply(raw="down", status=503))
        with pytest.raises(ProviderServerError):
            await UKProvider(base_url=api.base_url).fetch(session)

    async def test_timeout(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """A slow answer past the timeout is an unreachable error."""
        api.on("/intensity", Reply(UK_INTENSITY, delay_s=0.5))
        with pytest.raises(ProviderUnreachableError):
            await UKProvider(base_url=api.base_url, timeout_s=0.05).fetch(session)


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("2018-01-20T12:00Z", datetime(2018, 1, 20, 12, 0, tzinfo=UTC)),
            ("2019-05-21T00:00:00.000Z", datetime(2019, 5, 21, tzinfo=UTC)),
            ("2024-06-18T19:40:00+01:00", datetime(2024, 6, 18, 18, 40, tzinfo=UTC)),
            ("2024-06-18T18:40:00", datetime(2024, 6, 18, 18, 40, tzinfo=UTC)),
        ],
    )
    def test_timestamps(self, text: str, expected: datetime) -> None:
        """Minute precision, milliseconds, offsets and zone-less times all become aware UTC."""
        parsed = parse_timestamp(text, provider="uk", field="from")
        assert parsed == expected
        assert parsed.utcoffset() == timedelta(0)

    @pytest.mark.parametrize("text", ["2018-01-20", "noon", "", None, 1516449600])
    def test_bad_timestamps(self, text: object) -> None:
        """Dates without a time, numbers and nonsense are refused."""
        with pytest.raises(ProviderResponseError):
            parse_timestamp(text, provider="uk", field="from")

    @pytest.mark.parametrize(
        ("header", "expected"),
        [
            ("7", 7.0),
            (" 0 ", 0.0),
            ("-3", 0.0),
            ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
            ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),
            ("soon", None),
            ("nan", None),
            (None, None),
        ],
    )
    def test_retry_after(self, header: str | None, expected: float | None) -> None:
        """Retry-After as seconds or an HTTP date; past dates are 0, nonsense is None."""
        now = datetime(2015, 10, 21, 7, 27, tzinfo=UTC)
        assert parse_retry_after(header, now=now) == expected


class TestTrackerOverHttp:
    def tracker(self, api: FakeApi) -> CarbonIntensityTracker:
        static = Intensity(380.95, "DE", "static", "lifecycle average")
        return CarbonIntensityTracker(
            static,
            em(api, timeout_s=0.2),
            refresh_s=5.0,
            retry_attempts=3,
            retry_wait_initial_s=0.001,
            retry_wait_max_s=0.002,
            retry_wait_jitter_s=0.0,
        )

    async def test_retries_server_errors(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """Two 5xx then a good answer: the refresh retries and the live figure is in force."""
        api.on(EM_PATH, Reply(status=500), Reply(status=503), Reply(EM_LATEST))
        tracker = self.tracker(api)
        assert await tracker.refresh(session)
        assert tracker.current.source == "electricitymaps"
        assert len(api.calls(EM_PATH)) == 3

    async def test_honours_short_retry_after(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """A 429 with Retry-After 0 is retried within the refresh."""
        api.on(EM_PATH, Reply(status=429, headers={"Retry-After": "0"}), Reply(EM_LATEST))
        tracker = self.tracker(api)
        assert await tracker.refresh(session)
        assert len(api.calls(EM_PATH)) == 2

    async def test_auth_failure_not_retried(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """A 401 is not retried: one call, then the static fallback, logged."""
        api.on(EM_PATH, Reply({"error": "bad token"}, status=401))
        tracker = self.tracker(api)
        with structlog.testing.capture_logs() as logs:
            assert not await tracker.refresh(session)
        assert len(api.calls(EM_PATH)) == 1
        assert tracker.current.source == "static-fallback"
        assert tracker.current.g_per_kwh == 380.95
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["carbon.fallback"]

    async def test_timeouts_fall_back(self, api: FakeApi, session: aiohttp.ClientSession) -> None:
        """Timeouts on every try end in the static fallback, never an exception."""
        api.on(EM_PATH, Reply(EM_LATEST, delay_s=0.5))
        tracker = self.tracker(api)
        assert not await tracker.refresh(session)
        assert tracker.current.source == "static-fallback"
        assert len(api.calls(EM_PATH)) == 3

    async def test_loop_picks_up_live_value(
        self, api: FakeApi, session: aiohttp.ClientSession
    ) -> None:
        """start() runs the loop in the background; stop() ends it."""
        api.on(EM_PATH, Reply(EM_LATEST))
        tracker = self.tracker(api)
        await tracker.start(session)
        try:
            for _ in range(100):
                if tracker.current.source == "electricitymaps":
                    break
                await asyncio.sleep(0.01)
        finally:
            await tracker.stop()
        assert tracker.current.g_per_kwh == 322.0
