"""The bundled intensity table and ``--region`` resolution."""

from __future__ import annotations

import csv
import io
from importlib import resources

import pytest

from sidecar.carbon.intensity import BASES
from sidecar.carbon.regions import (
    WORLD_KEY,
    RegionError,
    RegionTable,
    TableRow,
    ZoneRow,
    bundled_table,
)

DATA = resources.files("sidecar.carbon").joinpath("data")


def data_rows(name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(DATA.joinpath(name).read_text(encoding="utf-8"))))


@pytest.fixture(scope="module")
def table() -> RegionTable:
    return bundled_table()


def row(key: str, g: float = 100.0, grid: str | None = None) -> TableRow:
    return TableRow(key, key, grid or key, g, 2023, "lifecycle average", "test", "test")


class TestSeedFacts:
    @pytest.mark.parametrize(
        ("region", "g_per_kwh"), [("FR", 56), ("US", 369), ("DE", 381), ("GB", 238)]
    )
    def test_country_figures(self, table: RegionTable, region: str, g_per_kwh: float) -> None:
        """France about 56, USA 369, Germany 381, UK 238 g/kWh (2023, OWID/Ember)."""
        found = table.lookup(region)
        assert found.intensity_g_per_kwh == pytest.approx(g_per_kwh, abs=0.6)
        assert found.year == 2023
        assert found.basis == "lifecycle average"

    def test_no_region_is_labelled_world_average(self, table: RegionTable) -> None:
        """No --region gives the IEA 2019 world average of 475 g/kWh, labelled as such."""
        world = table.lookup(None)
        assert world.intensity_g_per_kwh == 475
        assert world.key == WORLD_KEY
        assert world.is_world_average
        assert "World average" in world.name
        assert "IEA" in world.source
        assert world.year == 2019
        assert world.static_intensity().region == WORLD_KEY

    def test_blank_region_is_world_average(self, table: RegionTable) -> None:
        """An empty --region (an unset variable) means no region."""
        assert table.lookup("  ").is_world_average


class TestCountries:
    def test_every_country_by_alpha2_and_alpha3(self, table: RegionTable) -> None:
        """Every country of CodeCarbon's data resolves by alpha-3 and by alpha-2, to one figure."""
        countries = [r for r in table.rows() if r.source.startswith("Our World in Data")]
        alpha3 = [r for r in countries if len(r.key) == 3]
        assert len(alpha3) == 213  # global_energy_mix.json's ISO3 keys
        for r in alpha3:
            by2, by3 = table.lookup(r.grid), table.lookup(r.key)
            assert len(r.grid) == 2
            assert by2.intensity_g_per_kwh == by3.intensity_g_per_kwh == r.intensity_g_per_kwh
            assert by2.grid == by3.grid == r.grid

    def test_case_insensitive(self, table: RegionTable) -> None:
        """Lookups ignore case and surrounding spaces; the key comes back canonical."""
        assert table.lookup(" fr ").key == "FR"
        assert table.lookup("fra").key == "FRA"
        assert table.lookup("AWS:US-EAST-1").key == "aws:us-east-1"

    def test_uk_means_gb(self, table: RegionTable) -> None:
        """UK, which people type for the United Kingdom, resolves to GB."""
        assert table.lookup("UK").key == "GB"

    def test_fra_and_fr_share_zone(self, table: RegionTable) -> None:
        """Both spellings of a country map to the same Electricity Maps zone (alpha-2)."""
        assert table.lookup("FRA").electricitymaps_zone == "FR"
        assert table.lookup("FR").electricitymaps_zone == "FR"


class TestSubNational:
    def test_us_states_from_egrid(self, table: RegionTable) -> None:
        """US states come from eGRID 2023 in lb/MWh, converted to g/kWh (direct average)."""
        california = table.lookup("US-CA")
        assert california.intensity_g_per_kwh == pytest.approx(394.769 * 0.45359237, abs=1e-3)
        assert california.basis == "direct average"
        assert "eGRID" in california.source
        assert len([r for r in table.rows() if r.key.startswith("US-")]) == 51

    def test_quebec_is_hydro(self, table: RegionTable) -> None:
        """Canadian provinces resolve; hydro-powered Quebec is under 10 g/kWh."""
        assert table.lookup("CA-QC").intensity_g_per_kwh < 10
        assert len([r for r in table.rows() if r.key.startswith("CA-")]) == 13

    def test_chinese_provinces(self, table: RegionTable) -> None:
        """Chinese provinces carry the MEE/NBS 2023 figures."""
        beijing = table.lookup("CN-BJ")
        assert beijing.intensity_g_per_kwh == 555.4
        assert beijing.year == 2023


class TestCloudRegions:
    def test_every_mapped_region_resolves(self, table: RegionTable) -> None:
        """Every AWS, Azure and GCP region of cloud_regions.csv resolves to a figure."""
        regions = data_rows("cloud_regions.csv")
        assert {r["provider"] for r in regions} == {"aws", "azure", "gcp"}
        for r in regions:
            found = table.lookup(f"{r['provider']}:{r['region']}")
            assert found.intensity_g_per_kwh >= 0
            assert found.grid == r["location"]
            assert r["source_url"].startswith("https://")

    def test_gcp_published_figure_wins(self, table: RegionTable) -> None:
        """GCP regions use Google's own published figure (2023), not their country's."""
        belgium = table.lookup("gcp:europe-west1")
        assert belgium.intensity_g_per_kwh == 122
        assert belgium.intensity_g_per_kwh != table.lookup("BE").intensity_g_per_kwh
        assert table.lookup("gcp:us-central1").intensity_g_per_kwh == 430

    def test_gcp_region_typo_fixed(self, table: RegionTable) -> None:
        """CodeCarbon's misspelt me-cenrtal1 is published as me-central1."""
        assert table.lookup("gcp:me-central1").grid == "QA"
        assert "gcp:me-cenrtal1" not in table

    def test_aws_and_azure_take_location_grid(self, table: RegionTable) -> None:
        """AWS and Azure regions take the grid of the location their provider publishes."""
        assert table.lookup("aws:us-east-1").grid == "US-VA"
        assert table.lookup("aws:us-east-1").intensity_g_per_kwh == (
            table.lookup("US-VA").intensity_g_per_kwh
        )
        westeurope = table.lookup("azure:westeurope")
        assert westeurope.grid == "NL"
        assert westeurope.intensity_g_per_kwh == table.lookup("NL").intensity_g_per_kwh
        assert table.lookup("aws:eu-west-3").intensity_g_per_kwh == pytest.approx(56, abs=0.6)


class TestUnknown:
    def test_close_matches_listed(self, table: RegionTable) -> None:
        """An unknown region is a one-line ValueError listing close matches."""
        with pytest.raises(RegionError) as info:
            table.lookup("aws:us-east-7")
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert "\n" not in message
        assert message.startswith("--region: unknown region 'aws:us-east-7'")
        assert "aws:us-east-1" in info.value.close_matches
        assert "aws:us-east-1" in message

    def test_country_typo(self, table: RegionTable) -> None:
        """A country-code typo suggests the codes it is close to."""
        with pytest.raises(RegionError, match="FRA"):
            table.lookup("FRX")

    def test_nothing_close(self, table: RegionTable) -> None:
        """With nothing close, the message says which kinds of code are accepted."""
        with pytest.raises(RegionError, match="aws:us-east-1") as info:
            table.lookup("qqqqqqqqqq")
        assert info.value.close_matches == ()


class TestLiveZones:
    def test_grid_zone_as_region(self, table: RegionTable) -> None:
        """A grid zone such as US-CAL-CISO is accepted, with California's static figure."""
        ciso = table.lookup("us-cal-ciso")
        assert ciso.key == "US-CAL-CISO"
        assert ciso.intensity_g_per_kwh == table.lookup("US-CA").intensity_g_per_kwh
        assert ciso.live_zone("electricitymaps") == "US-CAL-CISO"
        assert ciso.live_zone("watttime") == "CAISO_NORTH"

    def test_zone_derived_from_region(self, table: RegionTable) -> None:
        """--region derives the Electricity Maps zone where a mapping exists."""
        assert table.lookup("US-CA").live_zone("electricitymaps") == "US-CAL-CISO"
        assert table.lookup("aws:us-east-1").live_zone("electricitymaps") == "US-MIDA-PJM"
        assert table.lookup("gcp:us-central1").live_zone("electricitymaps") == "US-MIDW-MISO"
        assert table.lookup("gcp:europe-west1").live_zone("electricitymaps") == "BE"
        assert table.lookup("CA-QC").live_zone("electricitymaps") == "CA-QC"

    def test_no_zone_where_unknown(self, table: RegionTable) -> None:
        """No zone is guessed where none is known; the operator passes --carbon-zone."""
        assert table.lookup("US-WA").live_zone("electricitymaps") is None
        assert table.lookup("CN-BJ").live_zone("electricitymaps") is None
        assert table.lookup(None).live_zone("electricitymaps") is None
        assert table.lookup("FR").live_zone("watttime") is None

    def test_uk_provider_takes_gb_only(self, table: RegionTable) -> None:
        """The UK provider's zone exists for GB regions only."""
        for region in ("GB", "GBR", "aws:eu-west-2", "azure:uksouth", "gcp:europe-west2"):
            assert table.lookup(region).live_zone("uk") == "GB"
        assert table.lookup("FR").live_zone("uk") is None
        assert table.lookup("IE").live_zone("uk") is None

    def test_bidding_zone_takes_country_figure(self, table: RegionTable) -> None:
        """An Electricity Maps bidding zone (SE-SE3) stands on its country's figure."""
        assert table.lookup("SE-SE3").intensity_g_per_kwh == table.lookup("SE").intensity_g_per_kwh


class TestTableIntegrity:
    def test_every_row_has_provenance(self, table: RegionTable) -> None:
        """Every figure names its source, year, basis and licence, and is plausible."""
        for r in table.rows():
            assert r.source
            assert r.licence
            assert r.name
            assert 1990 <= r.year <= 2030
            assert r.basis in BASES
            assert 0 <= r.intensity_g_per_kwh < 1500

    def test_sources_document_beside_data(self) -> None:
        """SOURCES.md names each dataset and its licence."""
        text = DATA.joinpath("SOURCES.md").read_text(encoding="utf-8")
        for needle in ("Our World in Data", "eGRID", "MEE", "Google", "IEA", "CC BY 4.0", "MIT"):
            assert needle in text

    def test_loaded_once(self) -> None:
        """The bundled table is parsed once and shared."""
        assert bundled_table() is bundled_table()

    def test_duplicate_key_rejected(self) -> None:
        """A table with a key twice (in any case) is refused."""
        with pytest.raises(ValueError, match="twice"):
            RegionTable([row(WORLD_KEY), row("FR"), row("fr")])

    def test_zone_on_unknown_key_rejected(self) -> None:
        """A zone whose static row does not exist is refused."""
        zone = ZoneRow("XX-ZONE", "XX", (), None, "")
        with pytest.raises(ValueError, match="unknown"):
            RegionTable([row(WORLD_KEY)], [zone])

    def test_world_row_required(self) -> None:
        """A table without the world row is refused: no-region would have nothing to use."""
        with pytest.raises(ValueError, match="world"):
            RegionTable([row("FR")])
