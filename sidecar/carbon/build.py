"""Carbon settings → a ready :class:`CarbonIntensityTracker`, or one clear error line.

The CLI calls :func:`build_tracker` once at start-up with the validated settings
(credentials read from the environment by the settings layer, never here). Every
way the combination cannot work raises :class:`CarbonConfigError` or
:class:`~sidecar.carbon.regions.RegionError`, both ``ValueError`` whose ``str()`` is
one line naming the flag, for the contract's exit status 2.
"""

from __future__ import annotations

import math
from typing import Literal

from yarl import URL

from sidecar.carbon.intensity import LiveSource
from sidecar.carbon.providers import (
    DEFAULT_ELECTRICITYMAPS_URL,
    DEFAULT_TIMEOUT_S,
    DEFAULT_UK_URL,
    DEFAULT_WATTTIME_URL,
    ElectricityMapsProvider,
    IntensityProvider,
    UKProvider,
    WattTimeProvider,
)
from sidecar.carbon.regions import Region, RegionTable, bundled_table
from sidecar.carbon.tracker import CarbonIntensityTracker

__all__ = ["CarbonConfigError", "ProviderName", "build_tracker"]

ProviderName = Literal["static", "electricitymaps", "watttime", "uk"]


class CarbonConfigError(ValueError):
    """Carbon settings that cannot work together. ``str()`` is one line naming the flag."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}")


def build_tracker(
    *,
    region: str | None,
    provider: ProviderName = "static",
    fixed_g_per_kwh: float | None = None,
    zone: str | None = None,
    api_url: str | None = None,
    refresh_s: float = 300.0,
    electricitymaps_token: str | None = None,
    watttime_user: str | None = None,
    watttime_password: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    table: RegionTable | None = None,
) -> CarbonIntensityTracker:
    """Build the tracker for ``--region``, ``--carbon-provider`` and friends.

    ``--carbon-intensity`` (``fixed_g_per_kwh``) wins over any provider, as the
    contract says; ``--region`` is still checked so a typo never passes silently.
    A live provider's zone is ``--carbon-zone`` or derived from ``--region``; its
    fallback figure is the table's for the region, or for the zone when only a zone
    is given, or the world average.
    """
    table = table if table is not None else bundled_table()
    resolved = table.lookup(region)
    if fixed_g_per_kwh is not None:
        if not math.isfinite(fixed_g_per_kwh) or fixed_g_per_kwh < 0:
            raise CarbonConfigError(
                "--carbon-intensity", f"must be a non-negative number, got {fixed_g_per_kwh!r}"
            )
        return CarbonIntensityTracker.fixed(
            fixed_g_per_kwh, resolved.key if not resolved.is_world_average else "none"
        )
    if provider == "static":
        for flag, value in (("--carbon-zone", zone), ("--carbon-api-url", api_url)):
            if value:
                raise CarbonConfigError(flag, "needs a live --carbon-provider, not static")
        return CarbonIntensityTracker(resolved.static_intensity())
    if refresh_s <= 0 or not math.isfinite(refresh_s):
        raise CarbonConfigError("--carbon-refresh", f"must be positive seconds, got {refresh_s!r}")
    if timeout_s <= 0:
        raise ValueError(f"provider timeout must be positive, got {timeout_s!r} s")
    live_zone, fallback_region = _zone_and_fallback(provider, zone, resolved, table)
    base_url = _checked_url(api_url)
    live: IntensityProvider
    if provider == "electricitymaps":
        if not electricitymaps_token:
            raise CarbonConfigError(
                "LLM_ENERGY_CARBON_API_TOKEN", "required by --carbon-provider electricitymaps"
            )
        live = ElectricityMapsProvider(
            live_zone,
            electricitymaps_token,
            base_url=base_url or DEFAULT_ELECTRICITYMAPS_URL,
            timeout_s=timeout_s,
        )
    elif provider == "watttime":
        if not watttime_user or not watttime_password:
            raise CarbonConfigError(
                "LLM_ENERGY_WATTTIME_USER/LLM_ENERGY_WATTTIME_PASSWORD",
                "both required by --carbon-provider watttime",
            )
        live = WattTimeProvider(
            live_zone,
            watttime_user,
            watttime_password,
            base_url=base_url or DEFAULT_WATTTIME_URL,
            timeout_s=timeout_s,
        )
    else:
        live = UKProvider(base_url=base_url or DEFAULT_UK_URL, timeout_s=timeout_s)
    return CarbonIntensityTracker(fallback_region.static_intensity(), live, refresh_s=refresh_s)


def _zone_and_fallback(
    provider: LiveSource, zone: str | None, resolved: Region, table: RegionTable
) -> tuple[str, Region]:
    """The zone to ask the provider for, and the table region that backs it up."""
    if provider == "uk":
        if zone and zone.strip().upper() != "GB":
            raise CarbonConfigError("--carbon-zone", "the uk provider covers GB only")
        if resolved.is_world_average:
            return "GB", table.lookup("GB")
        if resolved.live_zone("uk") is None:
            raise CarbonConfigError(
                "--region",
                f"{resolved.key} is outside Great Britain, the only zone the uk provider covers",
            )
        return "GB", resolved
    if zone and zone.strip():
        zone = zone.strip()
        if resolved.is_world_average and zone in table:
            return zone, table.lookup(zone)
        return zone, resolved
    derived = resolved.live_zone(provider)
    if derived is None:
        where = "no --region given" if resolved.is_world_average else f"--region {resolved.key}"
        raise CarbonConfigError(
            "--carbon-zone",
            f"required by --carbon-provider {provider}: no zone is known for {where}",
        )
    return derived, resolved


def _checked_url(api_url: str | None) -> str | None:
    """``--carbon-api-url`` if given and usable; ``None`` means the provider's public URL."""
    if not api_url:
        return None
    try:
        url = URL(api_url)
    except ValueError as e:
        raise CarbonConfigError("--carbon-api-url", f"not a URL: {api_url!r}") from e
    if url.scheme not in ("http", "https") or not url.host:
        raise CarbonConfigError("--carbon-api-url", f"not an http(s) URL: {api_url!r}")
    return api_url
