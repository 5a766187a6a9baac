"""Live grid carbon intensity clients behind one small async protocol.

Each client makes plain HTTP calls on a session it is handed (so the application
owns connection pooling and shutdown), applies a per-request timeout, and turns
every way a call can go wrong into one of this module's :class:`ProviderError`
subclasses at the boundary. Callers (the tracker) therefore decide what to retry
from the exception type alone and never see aiohttp's or json's exceptions.

Shapes follow the providers' public documentation:

* Electricity Maps v3: ``GET {base}/v3/carbon-intensity/latest?zone=Z`` with header
  ``auth-token``; ``carbonIntensity`` in gCO2e/kWh, ``emissionFactorType``
  ``lifecycle`` (the default) or ``direct``.
* WattTime v3: ``GET {base}/login`` with HTTP Basic auth gives a bearer token valid
  30 minutes; ``GET {base}/v3/forecast?region=R&signal_type=co2_moer`` gives the
  marginal operating emission rate in lb/MWh (first point = now). The
  ``/v3/signal-index`` value is a 0-100 percentile, not an emission rate: a
  response in ``percentile`` units is rejected, never converted.
* UK National Grid: ``GET {base}/intensity``; ``data[0].intensity.actual``, else the
  ``forecast``, in gCO2/kWh, with minute-precision times (``2018-01-20T12:00Z``).
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal, Protocol

import aiohttp
from yarl import URL

from sidecar.carbon.emissions import G_PER_KWH_PER_LB_PER_MWH
from sidecar.carbon.intensity import Basis, Intensity, LiveSource

__all__ = [
    "DEFAULT_ELECTRICITYMAPS_URL",
    "DEFAULT_UK_URL",
    "DEFAULT_WATTTIME_URL",
    "ElectricityMapsProvider",
    "IntensityProvider",
    "ProviderAuthError",
    "ProviderError",
    "ProviderRateLimitedError",
    "ProviderRequestError",
    "ProviderResponseError",
    "ProviderServerError",
    "ProviderTransientError",
    "ProviderUnreachableError",
    "UKProvider",
    "WattTimeProvider",
    "parse_retry_after",
    "parse_timestamp",
]

DEFAULT_ELECTRICITYMAPS_URL: Final = "https://api.electricitymaps.com"
DEFAULT_WATTTIME_URL: Final = "https://api.watttime.org"
DEFAULT_UK_URL: Final = "https://api.carbonintensity.org.uk"

DEFAULT_TIMEOUT_S: Final = 10.0
# The answers we read are a few kB (a WattTime 24 h forecast is about 20 kB); a
# body past this is not the API we expect, and must not fill memory.
MAX_BODY_BYTES: Final = 1 << 20
# Log in again this long before WattTime's 30-minute token runs out, so a
# request never races the expiry.
_TOKEN_MARGIN_S: Final = 60.0


class ProviderError(Exception):
    """A live provider gave no usable figure. ``str()`` is one line, without secrets."""

    def __init__(self, provider: LiveSource, message: str) -> None:
        self.provider = provider
        super().__init__(f"{provider}: {message}")


class ProviderAuthError(ProviderError):
    """401/403, or a login refused: retrying will not help until credentials change."""


class ProviderRateLimitedError(ProviderError):
    """429. ``retry_after_s`` is the provider's Retry-After in seconds, if it sent one."""

    def __init__(self, provider: LiveSource, retry_after_s: float | None) -> None:
        self.retry_after_s = retry_after_s
        wait = "no Retry-After" if retry_after_s is None else f"Retry-After {retry_after_s:g} s"
        super().__init__(provider, f"rate limited (HTTP 429, {wait})")


class ProviderTransientError(ProviderError):
    """A failure that may pass on its own: worth a retry with backoff."""


class ProviderServerError(ProviderTransientError):
    """HTTP 5xx."""

    def __init__(self, provider: LiveSource, status: int) -> None:
        self.status = status
        super().__init__(provider, f"server error (HTTP {status})")


class ProviderUnreachableError(ProviderTransientError):
    """Timeout, refused connection, DNS failure, connection cut mid-answer."""


class ProviderRequestError(ProviderError):
    """Any other 4xx (unknown zone, no access to the region): our request is wrong."""

    def __init__(self, provider: LiveSource, status: int, detail: str) -> None:
        self.status = status
        super().__init__(provider, f"request refused (HTTP {status}){detail}")


class ProviderResponseError(ProviderError):
    """The answer is not the documented shape: bad JSON, null or negative values,
    missing fields, unparseable times, or units that are not an emission rate."""


class IntensityProvider(Protocol):
    """A live source of grid carbon intensity for one zone.

    ``basis`` is what its figures count, known before any answer, so a fallback
    that happens before the first success can still log the basis change.
    """

    @property
    def name(self) -> LiveSource: ...

    @property
    def zone(self) -> str: ...

    @property
    def basis(self) -> Basis: ...

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        """One figure, now. Raises :class:`ProviderError` subclasses only."""
        ...


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date.

    Unparseable values give ``None`` (the caller's own backoff applies); dates in
    the past give 0.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def parse_timestamp(value: object, *, provider: LiveSource, field: str) -> datetime:
    """An ISO 8601 date-time as aware UTC; minute precision (``2018-01-20T12:00Z``),
    milliseconds and ``Z`` accepted. Times without a zone are taken as UTC."""
    if not isinstance(value, str) or "T" not in value:
        raise ProviderResponseError(provider, f"{field} is not a date-time: {value!r:.60}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        raise ProviderResponseError(provider, f"{field} is not a date-time: {value!r:.60}") from e
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _field(obj: object, key: str, *, provider: LiveSource, where: str) -> Any:
    if not isinstance(obj, Mapping):
        raise ProviderResponseError(provider, f"{where} is not an object")
    if key not in obj:
        raise ProviderResponseError(provider, f"{where}.{key} is missing")
    return obj[key]


def _rate(value: object, *, provider: LiveSource, field: str) -> float:
    """A finite, non-negative number; null, strings, booleans and NaN are malformed."""
    if value is None:
        raise ProviderResponseError(provider, f"{field} is null")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProviderResponseError(provider, f"{field} is not a number: {value!r:.60}")
    rate = float(value)
    if not math.isfinite(rate) or rate < 0:
        raise ProviderResponseError(provider, f"{field} is not a valid intensity: {rate!r}")
    return rate


def _error_detail(body: bytes) -> str:
    """The provider's own ``error``/``message`` text from a refusal, shortened."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if isinstance(data, Mapping):
        for key in ("error", "message", "detail"):
            if isinstance(data.get(key), str):
                return f": {data[key][:200]}"
    return ""


async def _get_json(
    session: aiohttp.ClientSession,
    url: URL,
    *,
    provider: LiveSource,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """GET ``url`` and decode its JSON body, translating every failure at this edge."""
    try:
        async with session.get(
            url,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            body = await _read_capped(response, provider)
            status = response.status
            if status in (401, 403):
                raise ProviderAuthError(provider, f"credentials refused (HTTP {status})")
            if status == 429:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                raise ProviderRateLimitedError(provider, retry_after)
            if status >= 500:
                raise ProviderServerError(provider, status)
            if status >= 400:
                raise ProviderRequestError(provider, status, _error_detail(body))
            if status != 200:
                raise ProviderResponseError(provider, f"unexpected HTTP {status}")
    except TimeoutError as e:
        raise ProviderUnreachableError(provider, f"no answer within {timeout_s:g} s") from e
    except aiohttp.ClientError as e:
        raise ProviderUnreachableError(provider, f"{type(e).__name__}: {e}"[:300]) from e
    try:
        return json.loads(body)
    except ValueError as e:
        raise ProviderResponseError(provider, "body is not JSON") from e


def _basic_auth(username: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value (RFC 7617, UTF-8), built here because
    aiohttp's helpers for it differ across the versions we support."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


async def _read_capped(response: aiohttp.ClientResponse, provider: LiveSource) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ProviderResponseError(provider, f"body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class ElectricityMapsProvider:
    """Electricity Maps v3 latest carbon intensity for one zone (``FR``, ``US-CAL-CISO``).

    The basis follows the answer's ``emissionFactorType`` (lifecycle unless the
    account or request asks for direct); ``emission_factor_type="direct"`` asks for
    direct figures explicitly.
    """

    __slots__ = ("_base_url", "_emission_factor_type", "_timeout_s", "_token", "_zone")

    def __init__(
        self,
        zone: str,
        token: str,
        *,
        base_url: str = DEFAULT_ELECTRICITYMAPS_URL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        emission_factor_type: Literal["lifecycle", "direct"] = "lifecycle",
    ) -> None:
        self._zone = zone
        self._token = token
        self._base_url = URL(base_url)
        self._timeout_s = timeout_s
        self._emission_factor_type = emission_factor_type

    def __repr__(self) -> str:
        return f"ElectricityMapsProvider(zone={self._zone!r}, base_url={str(self._base_url)!r})"

    @property
    def name(self) -> LiveSource:
        return "electricitymaps"

    @property
    def zone(self) -> str:
        return self._zone

    @property
    def basis(self) -> Basis:
        return "direct average" if self._emission_factor_type == "direct" else "lifecycle average"

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        query = {"zone": self._zone}
        if self._emission_factor_type != "lifecycle":  # lifecycle is the API's default
            query["emissionFactorType"] = self._emission_factor_type
        url = (self._base_url / "v3/carbon-intensity/latest").with_query(query)
        data = await _get_json(
            session,
            url,
            provider=self.name,
            timeout_s=self._timeout_s,
            headers={"auth-token": self._token},
        )
        where = "answer"
        g_per_kwh = _rate(
            _field(data, "carbonIntensity", provider=self.name, where=where),
            provider=self.name,
            field="carbonIntensity",
        )
        measured_at = parse_timestamp(
            _field(data, "datetime", provider=self.name, where=where),
            provider=self.name,
            field="datetime",
        )
        factor = data.get("emissionFactorType") or "lifecycle"
        if factor not in ("lifecycle", "direct"):
            raise ProviderResponseError(self.name, f"unknown emissionFactorType {factor!r:.40}")
        zone = data.get("zone")
        return Intensity(
            g_per_kwh=g_per_kwh,
            region=zone if isinstance(zone, str) and zone else self._zone,
            source=self.name,
            basis="lifecycle average" if factor == "lifecycle" else "direct average",
            measured_at=measured_at,
        )


class WattTimeProvider:
    """WattTime v3 marginal operating emission rate (MOER) for one region (``CAISO_NORTH``).

    Logs in with HTTP Basic auth for a bearer token, reuses it until shortly before
    its 30 minutes run out, and logs in again once on a 401 (tokens can be revoked
    early). Reads the first point of ``/v3/forecast``: the MOER now, in lb/MWh.
    """

    __slots__ = (
        "_base_url",
        "_clock",
        "_password",
        "_region",
        "_timeout_s",
        "_token",
        "_token_at_s",
        "_token_ttl_s",
        "_username",
    )

    def __init__(
        self,
        region: str,
        username: str,
        password: str,
        *,
        base_url: str = DEFAULT_WATTTIME_URL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        token_ttl_s: float = 30 * 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._region = region
        self._username = username
        self._password = password
        self._base_url = URL(base_url)
        self._timeout_s = timeout_s
        self._token_ttl_s = token_ttl_s
        self._clock = clock
        self._token: str | None = None
        self._token_at_s = 0.0

    def __repr__(self) -> str:
        return f"WattTimeProvider(region={self._region!r}, base_url={str(self._base_url)!r})"

    @property
    def name(self) -> LiveSource:
        return "watttime"

    @property
    def zone(self) -> str:
        return self._region

    @property
    def basis(self) -> Basis:
        return "direct marginal"

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        token = await self._valid_token(session)
        try:
            data = await self._forecast(session, token)
        except ProviderAuthError:
            self._token = None  # revoked or expired early: one fresh login, then give up
            data = await self._forecast(session, await self._valid_token(session))
        return self._parse(data)

    async def _valid_token(self, session: aiohttp.ClientSession) -> str:
        age_s = self._clock() - self._token_at_s
        if self._token is not None and age_s < self._token_ttl_s - _TOKEN_MARGIN_S:
            return self._token
        data = await _get_json(
            session,
            self._base_url / "login",
            provider=self.name,
            timeout_s=self._timeout_s,
            headers={"Authorization": _basic_auth(self._username, self._password)},
        )
        token = _field(data, "token", provider=self.name, where="login answer")
        if not isinstance(token, str) or not token:
            raise ProviderResponseError(self.name, "login answer has no token")
        self._token, self._token_at_s = token, self._clock()
        return token

    async def _forecast(self, session: aiohttp.ClientSession, token: str) -> Any:
        url = (self._base_url / "v3/forecast").with_query(
            {"region": self._region, "signal_type": "co2_moer"}
        )
        return await _get_json(
            session,
            url,
            provider=self.name,
            timeout_s=self._timeout_s,
            headers={"Authorization": f"Bearer {token}"},
        )

    def _parse(self, data: object) -> Intensity:
        meta = _field(data, "meta", provider=self.name, where="answer")
        units = _field(meta, "units", provider=self.name, where="meta")
        if units == "percentile":
            raise ProviderResponseError(
                self.name, "answer is a 0-100 percentile (signal index), not an emission rate"
            )
        if units != "lbs_co2_per_mwh":
            raise ProviderResponseError(self.name, f"unexpected units {units!r:.40}")
        signal = meta.get("signal_type", "co2_moer")
        if signal != "co2_moer":
            raise ProviderResponseError(self.name, f"unexpected signal_type {signal!r:.40}")
        points = _field(data, "data", provider=self.name, where="answer")
        if not isinstance(points, list) or not points:
            raise ProviderResponseError(self.name, "answer has no data points")
        first = points[0]
        lb_per_mwh = _rate(
            _field(first, "value", provider=self.name, where="data[0]"),
            provider=self.name,
            field="data[0].value",
        )
        measured_at = parse_timestamp(
            _field(first, "point_time", provider=self.name, where="data[0]"),
            provider=self.name,
            field="data[0].point_time",
        )
        region = meta.get("region")
        return Intensity(
            g_per_kwh=lb_per_mwh * G_PER_KWH_PER_LB_PER_MWH,
            region=region if isinstance(region, str) and region else self._region,
            source=self.name,
            basis="direct marginal",
            measured_at=measured_at,
        )


class UKProvider:
    """GB national carbon intensity from the UK Carbon Intensity API (no key).

    Uses the half-hour's ``actual`` when published, else its ``forecast``. The API
    counts generation CO2 only, hence a direct average.
    """

    __slots__ = ("_base_url", "_timeout_s")

    def __init__(
        self, *, base_url: str = DEFAULT_UK_URL, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self._base_url = URL(base_url)
        self._timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"UKProvider(base_url={str(self._base_url)!r})"

    @property
    def name(self) -> LiveSource:
        return "uk"

    @property
    def zone(self) -> str:
        return "GB"

    @property
    def basis(self) -> Basis:
        return "direct average"

    async def fetch(self, session: aiohttp.ClientSession) -> Intensity:
        data = await _get_json(
            session, self._base_url / "intensity", provider=self.name, timeout_s=self._timeout_s
        )
        periods = _field(data, "data", provider=self.name, where="answer")
        if not isinstance(periods, list) or not periods:
            raise ProviderResponseError(self.name, "answer has no data")
        period = periods[0]
        figures = _field(period, "intensity", provider=self.name, where="data[0]")
        if not isinstance(figures, Mapping):
            raise ProviderResponseError(self.name, "data[0].intensity is not an object")
        actual, forecast = figures.get("actual"), figures.get("forecast")
        value, field = (actual, "actual") if actual is not None else (forecast, "forecast")
        g_per_kwh = _rate(value, provider=self.name, field=f"data[0].intensity.{field}")
        measured_at = parse_timestamp(
            _field(period, "from", provider=self.name, where="data[0]"),
            provider=self.name,
            field="data[0].from",
        )
        return Intensity(
            g_per_kwh=g_per_kwh,
            region="GB",
            source=self.name,
            basis="direct average",
            measured_at=measured_at,
        )
