"""Carbon settings → tracker, and the one-line errors for combinations that cannot work."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.carbon.build import CarbonConfigError, build_tracker
from sidecar.carbon.providers import ElectricityMapsProvider, UKProvider, WattTimeProvider
from sidecar.carbon.regions import RegionError

EM_TOKEN: dict[str, Any] = {"electricitymaps_token": "tok"}
WT_CREDS: dict[str, Any] = {"watttime_user": "u", "watttime_password": "p"}


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


class TestStaticAndFixed:
    def test_static_region(self) -> None:
        """--region FR with the static provider gives France's table figure."""
        t = build_tracker(region="FR")
        assert (t.current.g_per_kwh, t.current.source, t.current.region) == (56.039, "static", "FR")
        assert t.provider is None

    def test_no_region(self) -> None:
        """No --region gives the world average, labelled world."""
        t = build_tracker(region=None)
        assert (t.current.g_per_kwh, t.current.region) == (475.0, "world")

    def test_fixed_wins_over_provider(self) -> None:
        """--carbon-intensity overrides any provider and needs no credentials."""
        t = build_tracker(region="FR", provider="electricitymaps", fixed_g_per_kwh=12.5)
        assert (t.current.g_per_kwh, t.current.source, t.current.region) == (12.5, "fixed", "FR")
        assert t.provider is None

    def test_fixed_still_checks_region(self) -> None:
        """A mistyped --region is reported even when a fixed intensity is given."""
        with pytest.raises(RegionError):
            build_tracker(region="FRX", fixed_g_per_kwh=10.0)

    @pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
    def test_bad_fixed(self, value: float) -> None:
        """A negative or non-finite --carbon-intensity is refused, naming the flag."""
        with pytest.raises(CarbonConfigError) as info:
            build_tracker(region=None, fixed_g_per_kwh=value)
        assert one_line(info.value).startswith("--carbon-intensity:")

    @pytest.mark.parametrize(
        ("kwargs", "flag"),
        [({"zone": "FR"}, "--carbon-zone"), ({"api_url": "http://x"}, "--carbon-api-url")],
    )
    def test_live_options_need_live_provider(self, kwargs: dict[str, Any], flag: str) -> None:
        """Zone or API URL with the static provider is a mistake, reported as such."""
        with pytest.raises(CarbonConfigError, match=flag):
            build_tracker(region="FR", **kwargs)


class TestLive:
    def test_electricitymaps_zone_derived(self) -> None:
        """--region US-CA asks Electricity Maps for US-CAL-CISO; the table figure backs it up."""
        t = build_tracker(region="US-CA", provider="electricitymaps", **EM_TOKEN)
        assert isinstance(t.provider, ElectricityMapsProvider)
        assert t.provider.zone == "US-CAL-CISO"
        assert t.current.source == "static-fallback"
        assert t.current.region == "US-CA"

    def test_electricitymaps_needs_token(self) -> None:
        """Electricity Maps without a token names the environment variable to set."""
        with pytest.raises(CarbonConfigError, match="LLM_ENERGY_CARBON_API_TOKEN"):
            build_tracker(region="FR", provider="electricitymaps")

    def test_zone_not_derivable(self) -> None:
        """Where no zone is known for the region, --carbon-zone is asked for."""
        with pytest.raises(CarbonConfigError) as info:
            build_tracker(region="US-WA", provider="electricitymaps", **EM_TOKEN)
        assert one_line(info.value).startswith("--carbon-zone:")

    def test_explicit_zone_wins(self) -> None:
        """--carbon-zone overrides the derived zone; the region still gives the fallback."""
        t = build_tracker(region="US-WA", provider="electricitymaps", zone="US-NW-SCL", **EM_TOKEN)
        assert t.provider is not None
        assert t.provider.zone == "US-NW-SCL"
        assert t.current.region == "US-WA"

    def test_zone_alone_gives_its_fallback(self) -> None:
        """With only --carbon-zone, the fallback figure is the zone's table figure."""
        t = build_tracker(region=None, provider="electricitymaps", zone="US-CAL-CISO", **EM_TOKEN)
        assert t.current.region == "US-CAL-CISO"
        assert t.current.g_per_kwh == build_tracker(region="US-CA").current.g_per_kwh

    def test_watttime(self) -> None:
        """WattTime takes its own region names (CAISO_NORTH) and needs both credentials."""
        t = build_tracker(region="US-CAL-CISO", provider="watttime", **WT_CREDS)
        assert isinstance(t.provider, WattTimeProvider)
        assert t.provider.zone == "CAISO_NORTH"
        with pytest.raises(CarbonConfigError, match="LLM_ENERGY_WATTTIME"):
            build_tracker(region="US-CAL-CISO", provider="watttime", watttime_user="u")

    def test_uk_gb_only(self) -> None:
        """The UK provider serves GB regions, and GB when no region is given; not France."""
        assert isinstance(build_tracker(region="aws:eu-west-2", provider="uk").provider, UKProvider)
        t = build_tracker(region=None, provider="uk")
        assert t.current.region == "GB"
        with pytest.raises(CarbonConfigError, match="outside Great Britain"):
            build_tracker(region="FR", provider="uk")
        with pytest.raises(CarbonConfigError, match="GB only"):
            build_tracker(region="GB", provider="uk", zone="FR")

    def test_api_url_used(self) -> None:
        """--carbon-api-url replaces the public URL."""
        t = build_tracker(region="GB", provider="uk", api_url="http://127.0.0.1:9/mirror")
        assert "127.0.0.1:9/mirror" in repr(t.provider)

    @pytest.mark.parametrize("url", ["ftp://x", "not a url", "http://"])
    def test_bad_api_url(self, url: str) -> None:
        """A URL that is not http(s) is refused, naming the flag."""
        with pytest.raises(CarbonConfigError, match="--carbon-api-url"):
            build_tracker(region="GB", provider="uk", api_url=url)

    def test_bad_refresh(self) -> None:
        """A non-positive refresh period is refused, naming the flag."""
        with pytest.raises(CarbonConfigError, match="--carbon-refresh"):
            build_tracker(region="GB", provider="uk", refresh_s=0)
