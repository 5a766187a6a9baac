"""scripts/gen_intensity_table.py on small stand-in wheels with the real files' shapes."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sidecar.carbon.regions import RegionTable

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gen_intensity_table.py"

GLOBAL_MIX = {
    "FRA": {"carbon_intensity": 56.039, "country_name": "France", "iso_code": "FRA", "year": 2023},
    "USA": {
        "carbon_intensity": 369.473,
        "country_name": "United States",
        "iso_code": "USA",
        "year": 2023,
    },
    "QAT": {"carbon_intensity": 490.0, "country_name": "Qatar", "iso_code": "QAT", "year": 2022},
}
PER_SOURCE = {"world_average": 475, "coal": 995, "petroleum": 816, "natural_gas": 743}
USA = {
    "_unit": {"emissions": "lbs/MWh", "regionCode": "2 digit state/region code"},
    "_source": {"name": "EPA eGRID2023", "url": "u", "field": "STC2ERTA", "year": 2023},
    "virginia": {"emissions": 1000.0, "regionCode": "VA"},
    "usa": {"emissions": 770.884, "regionCode": "usa"},
}
CANADA = {
    "quebec": {
        "naturalGas": 1.0,
        "petroleum": 0.0,
        "coal": 0.0,
        "hydro": 99.0,
        "total": 100.0,
    }
}
CHINA = {
    "data": {
        "CN-BJ": {
            "emission_factor": 555.4,
            "unit": "gCO2/kWh",
            "description": "Beijing",
            "year": 2023,
        }
    },
    "metadata": {"announcement": "2025 No. 47", "year": 2023},
}
IMPACT = (
    "\ufeffprovider,providerName,offsetRatio,region,regionName,country_name,countryIsoCode,"
    "state,city,impact,source,comment\n"
    "gcp,Google Cloud Platform,100,europe-west9,,France,FRA,,Paris,34,https://x,\n"
    "gcp,Google Cloud Platform,100,me-cenrtal1,,Qatar,QAT,,Doha,575,https://x,\n"
)
ISO = {
    "3166-1": [
        {"alpha_2": "FR", "alpha_3": "FRA", "name": "France"},
        {"alpha_2": "US", "alpha_3": "USA", "name": "United States"},
        {"alpha_2": "QA", "alpha_3": "QAT", "name": "Qatar"},
    ]
}
CLOUD_REGIONS = [
    ("aws", "eu-west-3", "FR", "Europe (Paris)"),
    ("aws", "us-east-1", "US-VA", "US East (N. Virginia)"),
    ("gcp", "europe-west9", "FR", "Paris"),
    ("gcp", "me-central1", "QA", "Doha"),
]


@functools.cache
def load_script() -> ModuleType:
    """Import the script by path, once (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_intensity_table", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def wheel(path: Path, files: dict[str, Any]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content if isinstance(content, str) else json.dumps(content))
    return path


def write_regions(out: Path, regions: list[tuple[str, str, str, str]]) -> None:
    with (out / "cloud_regions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["provider", "region", "location", "place", "source_url"])
        w.writerows([*r, "https://example.test/regions"] for r in regions)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    pi = "codecarbon/data/private_infra"
    codecarbon = wheel(
        tmp_path / "codecarbon-9.9.9-py3-none-any.whl",
        {
            f"{pi}/global_energy_mix.json": GLOBAL_MIX,
            f"{pi}/carbon_intensity_per_source.json": PER_SOURCE,
            f"{pi}/2023/usa_emissions.json": USA,
            f"{pi}/2023/canada_energy_mix.json": CANADA,
            f"{pi}/2023/china_provincial_emissions.json": CHINA,
            "codecarbon/data/cloud/impact.csv": IMPACT,
        },
    )
    pycountry = wheel(
        tmp_path / "pycountry-1.0-py3-none-any.whl",
        {"pycountry/databases/iso3166-1.json": ISO},
    )
    out = tmp_path / "data"
    out.mkdir()
    write_regions(out, CLOUD_REGIONS)
    return codecarbon, pycountry, out


def run(inputs: tuple[Path, Path, Path]) -> int:
    codecarbon, pycountry, out = inputs
    argv = ["--codecarbon-wheel", str(codecarbon), "--pycountry-wheel", str(pycountry)]
    code = load_script().main([*argv, "--out-dir", str(out)])
    assert isinstance(code, int)
    return code


def table(out: Path) -> RegionTable:
    return RegionTable.from_csv((out / "intensity.csv").read_text(encoding="utf-8"))


class TestGenerate:
    def test_rows(self, inputs: tuple[Path, Path, Path]) -> None:
        """Countries by both codes, states in g/kWh, provinces, GCP figures, cloud locations."""
        assert run(inputs) == 0
        t = table(inputs[2])
        assert t.lookup("FR").intensity_g_per_kwh == t.lookup("FRA").intensity_g_per_kwh == 56.039
        assert t.lookup("US-VA").intensity_g_per_kwh == pytest.approx(453.592, abs=1e-3)
        assert t.lookup("CA-QC").intensity_g_per_kwh == pytest.approx(7.43)
        assert t.lookup("CN-BJ").intensity_g_per_kwh == 555.4
        assert t.lookup("gcp:europe-west9").intensity_g_per_kwh == 34
        assert t.lookup("aws:eu-west-3").intensity_g_per_kwh == 56.039
        assert t.lookup("aws:us-east-1").basis == "direct average"
        assert t.lookup(None).intensity_g_per_kwh == 475

    def test_national_egrid_row_left_out(self, inputs: tuple[Path, Path, Path]) -> None:
        """eGRID's national row does not replace the country's OWID figure."""
        run(inputs)
        t = table(inputs[2])
        assert t.lookup("US").intensity_g_per_kwh == 369.473
        assert "US-usa" not in t

    def test_gcp_typo_fixed(self, inputs: tuple[Path, Path, Path]) -> None:
        """CodeCarbon's me-cenrtal1 is written as me-central1 with Google's figure."""
        run(inputs)
        assert table(inputs[2]).lookup("gcp:me-central1").intensity_g_per_kwh == 575

    def test_sources_written(self, inputs: tuple[Path, Path, Path]) -> None:
        """SOURCES.md records both wheels by name and sha256, and each dataset's licence."""
        run(inputs)
        text = (inputs[2] / "SOURCES.md").read_text(encoding="utf-8")
        assert "codecarbon-9.9.9-py3-none-any.whl" in text
        assert "pycountry-1.0-py3-none-any.whl" in text
        assert "CC BY 4.0" in text
        assert "LGPL-2.1" in text

    def test_deterministic(self, inputs: tuple[Path, Path, Path]) -> None:
        """Two runs on the same wheels write identical files."""
        run(inputs)
        first = (inputs[2] / "intensity.csv").read_bytes()
        run(inputs)
        assert (inputs[2] / "intensity.csv").read_bytes() == first

    def test_location_without_data_fails(
        self, inputs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A cloud region whose location has no row stops the script with one line."""
        write_regions(inputs[2], [*CLOUD_REGIONS, ("azure", "atlantis", "AT", "Atlantis")])
        assert run(inputs) == 1
        assert "azure:atlantis sits in AT" in capsys.readouterr().err

    def test_gcp_region_without_location_fails(
        self, inputs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A GCP region with a figure but no mapped location stops the script."""
        write_regions(inputs[2], CLOUD_REGIONS[:3])
        assert run(inputs) == 1
        assert "me-central1" in capsys.readouterr().err

    def test_missing_wheel_fails(
        self, inputs: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A wrong wheel path is one line, not a traceback."""
        assert run((inputs[0].with_name("nope.whl"), inputs[1], inputs[2])) == 1
        assert "no such wheel" in capsys.readouterr().err
