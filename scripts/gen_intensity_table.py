#!/usr/bin/env python3
"""Generate the bundled grid carbon-intensity table behind ``--region``.

Writes ``sidecar/carbon/data/intensity.csv`` and ``sidecar/carbon/data/SOURCES.md``
from public datasets that reach us through package registries, so anyone can
rebuild the table offline and check every figure against its source:

* the data files inside the ``codecarbon`` wheel (MIT): countries from Our World in
  Data / Ember (CC BY 4.0), US states from EPA eGRID, Canadian provinces' generation
  mix, Chinese provinces from the MEE/NBS announcement, GCP regions from Google's
  published per-region figures, and the IEA world average;
* ISO 3166-1 alpha-3 to alpha-2 codes from the ``pycountry`` wheel (Debian
  iso-codes data, LGPL-2.1), because Python's standard library has no ISO table;
* ``sidecar/carbon/data/cloud_regions.csv`` (kept by hand in this repository): where
  each AWS, Azure and GCP region sits, from the providers' own region lists, so a
  cloud region without a published figure takes the grid of its location.

Usage (both wheels from ``pip download --no-deps codecarbon pycountry -d /tmp/w``)::

    python scripts/gen_intensity_table.py \\
        --codecarbon-wheel /tmp/w/codecarbon-3.3.2-py3-none-any.whl \\
        --pycountry-wheel /tmp/w/pycountry-26.2.16-py3-none-any.whl

The output is deterministic for given wheels, so a regenerated table diffs cleanly.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parents[1] / "sidecar" / "carbon" / "data"

# 1 lb/MWh = 453.59237 g / 1000 kWh.
G_PER_KWH_PER_LB_PER_MWH = 0.45359237

# Google's yearly figures are not dated inside CodeCarbon's impact.csv; its values
# are identical, region for region, to Google's region-carbon-info data/yearly/2023.csv.
GCP_FIGURES_YEAR = 2023

# CodeCarbon ships a misspelt GCP region name; the region is me-central1 (Doha).
GCP_REGION_FIXES = {"me-cenrtal1": "me-central1"}

# Canada's provincial file gives a generation mix in percent, not an intensity.
# CodeCarbon turns it into an intensity from the fossil shares alone (coal,
# petroleum, natural gas) with combustion factors; we do the same with the factors
# of its carbon_intensity_per_source.json, so the result is a direct average.
CANADA_FOSSIL_SOURCES = {"coal": "coal", "petroleum": "petroleum", "naturalGas": "natural_gas"}
CANADA_PROVINCES = {
    "alberta": "AB",
    "british columbia": "BC",
    "manitoba": "MB",
    "new brunswick": "NB",
    "newfoundland and labrador": "NL",
    "northwest territories": "NT",
    "nova scotia": "NS",
    "nunavut": "NU",
    "ontario": "ON",
    "prince edward island": "PE",
    "quebec": "QC",
    "saskatchewan": "SK",
    "yukon": "YT",
}

CC = "codecarbon/data"
WORLD_KEY = "world"
HEADER = ("key", "name", "grid", "intensity_g_per_kwh", "year", "basis", "source", "licence")

LICENCE_OWID = "CC BY 4.0 (OWID/Ember data); MIT (CodeCarbon packaging)"
LICENCE_EGRID = "public domain (US EPA eGRID); MIT (CodeCarbon packaging)"
LICENCE_MEE = "official statistics (MEE/NBS China); MIT (CodeCarbon packaging)"
LICENCE_CC = "MIT (CodeCarbon)"
LICENCE_GCP = "no licence stated (Google figures); MIT (CodeCarbon packaging)"


class GenerationError(Exception):
    """An input file is missing or does not look as expected: one line for the user."""


@dataclass(frozen=True, slots=True)
class Row:
    """One row of intensity.csv: a figure, what it describes, and where it comes from."""

    key: str
    name: str
    grid: str  # key of the grid location the figure describes (FR for FRA, US-VA for aws:us-east-1)
    intensity_g_per_kwh: float
    year: int
    basis: str
    source: str
    licence: str

    def cells(self) -> list[str]:
        """The CSV cells, numbers rounded to the milligram so files diff cleanly."""
        return [
            self.key,
            self.name,
            self.grid,
            _fmt(self.intensity_g_per_kwh),
            str(self.year),
            self.basis,
            self.source,
            self.licence,
        ]


@dataclass(frozen=True, slots=True)
class CloudRegion:
    """One row of the hand-kept cloud_regions.csv."""

    provider: str
    region: str
    location: str
    place: str
    source_url: str


@dataclass(frozen=True, slots=True)
class WheelInfo:
    """A wheel file we read, recorded in SOURCES.md so the build can be repeated."""

    filename: str
    sha256: str


def _fmt(value: float) -> str:
    text = f"{round(value, 3):.3f}".rstrip("0").rstrip(".")
    return text if text != "-0" else "0"


class Wheel:
    """Read-only access to the files of one downloaded wheel, never installed or imported."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise GenerationError(f"{path}: no such wheel file")
        self.path = path
        self._zip = zipfile.ZipFile(path)
        self.info = WheelInfo(path.name, hashlib.sha256(path.read_bytes()).hexdigest())

    def text(self, member: str) -> str:
        """A member's text, without the byte-order mark some CodeCarbon files carry."""
        try:
            raw = self._zip.read(member)
        except KeyError as e:
            raise GenerationError(f"{self.path.name}: no member {member}") from e
        return raw.decode("utf-8-sig")

    def json(self, member: str) -> Any:
        return json.loads(self.text(member))

    def version(self) -> str:
        match = re.match(r"[^-]+-([^-]+)-", self.path.name)
        return match.group(1) if match else "unknown"


def alpha3_to_alpha2(pycountry: Wheel) -> dict[str, str]:
    """ISO 3166-1 alpha-3 → alpha-2 from pycountry's copy of Debian's iso-codes."""
    entries = pycountry.json("pycountry/databases/iso3166-1.json")["3166-1"]
    return {e["alpha_3"]: e["alpha_2"] for e in entries}


def world_row(codecarbon: Wheel) -> Row:
    """The IEA world average CodeCarbon falls back to: used when no --region is given."""
    data = codecarbon.json(f"{CC}/private_infra/carbon_intensity_per_source.json")
    return Row(
        key=WORLD_KEY,
        name="World average (no --region given)",
        grid=WORLD_KEY,
        intensity_g_per_kwh=float(data["world_average"]),
        year=2019,
        basis="direct average",
        source=(
            "IEA Global Energy & CO2 Status Report 2019 "
            "(world_average in CodeCarbon carbon_intensity_per_source.json)"
        ),
        licence=LICENCE_CC,
    )


def country_rows(codecarbon: Wheel, iso: Mapping[str, str]) -> list[Row]:
    """Every country of global_energy_mix.json, once by alpha-2 and once by alpha-3."""
    data: dict[str, dict[str, Any]] = codecarbon.json(f"{CC}/private_infra/global_energy_mix.json")
    rows: list[Row] = []
    for alpha3, entry in sorted(data.items()):
        intensity = entry.get("carbon_intensity")
        if intensity is None:
            continue
        alpha2 = iso.get(alpha3)
        if alpha2 is None:
            raise GenerationError(f"global_energy_mix.json: {alpha3} is not an ISO 3166-1 code")
        for key in (alpha2, alpha3):
            rows.append(
                Row(
                    key=key,
                    name=str(entry["country_name"]),
                    grid=alpha2,
                    intensity_g_per_kwh=float(intensity),
                    year=int(entry["year"]),
                    basis="lifecycle average",
                    source="Our World in Data / Ember via CodeCarbon global_energy_mix.json",
                    licence=LICENCE_OWID,
                )
            )
    return rows


def us_state_rows(codecarbon: Wheel) -> list[Row]:
    """US states (and DC) from eGRID's state CO2e output emission rate, lb/MWh → g/kWh."""
    data: dict[str, Any] = codecarbon.json(f"{CC}/private_infra/2023/usa_emissions.json")
    meta = data["_source"]
    if data["_unit"]["emissions"] != "lbs/MWh":
        raise GenerationError("usa_emissions.json: emissions are no longer in lbs/MWh")
    rows = []
    for name, entry in sorted(data.items()):
        code = entry.get("regionCode") if isinstance(entry, dict) else None
        if name.startswith("_") or not isinstance(code, str) or len(code) != 2:
            continue  # metadata and the national "usa" row (the country row is OWID's)
        rows.append(
            Row(
                key=f"US-{code}",
                name=f"{name.title()}, United States",
                grid=f"US-{code}",
                intensity_g_per_kwh=float(entry["emissions"]) * G_PER_KWH_PER_LB_PER_MWH,
                year=int(meta["year"]),
                basis="direct average",
                source=f"EPA eGRID{meta['year']} {meta['field']} via CodeCarbon usa_emissions.json",
                licence=LICENCE_EGRID,
            )
        )
    return rows


def canada_rows(codecarbon: Wheel) -> list[Row]:
    """Canadian provinces: fossil generation shares x combustion factors (CodeCarbon's method)."""
    mix: dict[str, dict[str, float]] = codecarbon.json(
        f"{CC}/private_infra/2023/canada_energy_mix.json"
    )
    factors = codecarbon.json(f"{CC}/private_infra/carbon_intensity_per_source.json")
    rows = []
    for name, shares in sorted(mix.items()):
        code = CANADA_PROVINCES.get(name)
        if code is None:
            raise GenerationError(f"canada_energy_mix.json: unknown province {name!r}")
        intensity = sum(
            shares[src] / shares["total"] * float(factors[factor])
            for src, factor in CANADA_FOSSIL_SOURCES.items()
        )
        rows.append(
            Row(
                key=f"CA-{code}",
                name=f"{name.title()}, Canada",
                grid=f"CA-{code}",
                intensity_g_per_kwh=intensity,
                year=2023,
                basis="direct average",
                source=(
                    "CodeCarbon 2023/canada_energy_mix.json generation shares x "
                    "carbon_intensity_per_source.json fossil factors"
                ),
                licence=LICENCE_CC,
            )
        )
    return rows


def china_rows(codecarbon: Wheel) -> list[Row]:
    """Chinese provinces from the official MEE/NBS 2023 provincial factors (CO2 only)."""
    data = codecarbon.json(f"{CC}/private_infra/2023/china_provincial_emissions.json")
    meta = data["metadata"]
    rows = []
    for code, entry in sorted(data["data"].items()):
        if entry["unit"] != "gCO2/kWh":
            raise GenerationError(f"china_provincial_emissions.json: {code} unit {entry['unit']}")
        rows.append(
            Row(
                key=code,
                name=f"{entry['description']}, China",
                grid=code,
                intensity_g_per_kwh=float(entry["emission_factor"]),
                year=int(entry["year"]),
                basis="direct average",
                source=(
                    f"MEE/NBS announcement {meta['announcement']} via CodeCarbon "
                    "china_provincial_emissions.json"
                ),
                licence=LICENCE_MEE,
            )
        )
    return rows


def read_cloud_regions(path: Path) -> list[CloudRegion]:
    """The hand-kept region → location mapping, checked for duplicates."""
    with path.open(newline="", encoding="utf-8") as f:
        regions = [CloudRegion(**row) for row in csv.DictReader(f)]
    seen: set[tuple[str, str]] = set()
    for r in regions:
        if (r.provider, r.region) in seen:
            raise GenerationError(f"{path.name}: {r.provider}:{r.region} listed twice")
        seen.add((r.provider, r.region))
    return regions


def gcp_published(codecarbon: Wheel) -> dict[str, float]:
    """GCP's own per-region grid figures, keyed by (corrected) region name."""
    reader = csv.DictReader(io.StringIO(codecarbon.text(f"{CC}/cloud/impact.csv")))
    published: dict[str, float] = {}
    for row in reader:
        if row["provider"] != "gcp":
            continue
        region = GCP_REGION_FIXES.get(row["region"], row["region"])
        published[region] = float(row["impact"])
    return published


def cloud_rows(
    regions: Sequence[CloudRegion], grid_rows: Iterable[Row], gcp: Mapping[str, float]
) -> list[Row]:
    """A row per cloud region: Google's published figure for GCP, else the location's grid."""
    by_key = {row.key: row for row in grid_rows}
    listed_gcp = {r.region for r in regions if r.provider == "gcp"}
    if missing := sorted(set(gcp) - listed_gcp):
        raise GenerationError(f"cloud_regions.csv: GCP regions without a location: {missing}")
    rows = []
    for r in sorted(regions, key=lambda r: (r.provider, r.region)):
        grid = by_key.get(r.location)
        if grid is None:
            raise GenerationError(
                f"cloud_regions.csv: {r.provider}:{r.region} sits in {r.location}, "
                "which has no intensity row"
            )
        label = {"aws": "AWS", "azure": "Azure", "gcp": "GCP"}[r.provider]
        if r.provider == "gcp" and r.region in gcp:
            rows.append(
                Row(
                    key=f"gcp:{r.region}",
                    name=f"GCP {r.region} ({r.place})",
                    grid=r.location,
                    intensity_g_per_kwh=gcp[r.region],
                    year=GCP_FIGURES_YEAR,
                    basis="lifecycle average",
                    source="Google Cloud region carbon data via CodeCarbon cloud/impact.csv",
                    licence=LICENCE_GCP,
                )
            )
            continue
        rows.append(
            Row(
                key=f"{r.provider}:{r.region}",
                name=f"{label} {r.region} ({r.place}): grid of {grid.name}",
                grid=r.location,
                intensity_g_per_kwh=grid.intensity_g_per_kwh,
                year=grid.year,
                basis=grid.basis,
                source=f"{grid.source}; location from {label}'s region list",
                licence=grid.licence,
            )
        )
    return rows


def build_rows(codecarbon: Wheel, pycountry: Wheel, regions: Sequence[CloudRegion]) -> list[Row]:
    """Every row of the table, in a stable order: world, countries, sub-national, cloud."""
    iso = alpha3_to_alpha2(pycountry)
    countries = country_rows(codecarbon, iso)
    subnational = us_state_rows(codecarbon) + canada_rows(codecarbon) + china_rows(codecarbon)
    grids = countries + subnational
    rows = [world_row(codecarbon), *countries, *subnational]
    rows += cloud_rows(regions, grids, gcp_published(codecarbon))
    keys = [row.key.casefold() for row in rows]
    if dupes := sorted({k for k in keys if keys.count(k) > 1}):
        raise GenerationError(f"duplicate keys: {dupes}")
    return rows


def write_table(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(row.cells() for row in rows)


def sources_markdown(
    rows: Sequence[Row], codecarbon: Wheel, pycountry: Wheel, regions: Sequence[CloudRegion]
) -> str:
    """SOURCES.md: each dataset with its origin, year, basis, licence and row count."""

    def count(prefix: str) -> int:
        # Cloud rows borrow their location's source text; count only the dataset's own rows.
        return sum(1 for r in rows if r.source.startswith(prefix) and ":" not in r.key)

    years = sorted({r.year for r in rows if r.source.startswith("Our World in Data")})
    by_provider = {p: sum(1 for r in regions if r.provider == p) for p in ("aws", "azure", "gcp")}
    return f"""# Sources of the bundled carbon-intensity table

Generated by `scripts/gen_intensity_table.py`; do not edit `intensity.csv` by hand.
Rebuild offline from the two wheels below (`pip download --no-deps codecarbon pycountry`).

| wheel | sha256 |
| --- | --- |
| `{codecarbon.info.filename}` | `{codecarbon.info.sha256}` |
| `{pycountry.info.filename}` | `{pycountry.info.sha256}` |

Columns of `intensity.csv`: `key` (what `--region` accepts, case-insensitive), `name`,
`grid` (the grid location the figure describes), `intensity_g_per_kwh` (gCO2e/kWh),
`year`, `basis`, `source`, `licence`.
Basis: *lifecycle* figures include upstream emissions (fuel supply, plant construction),
*direct* ones only what the stacks emit; *average* is the whole generation mix.
The live providers' bases differ (Electricity Maps lifecycle or direct average, WattTime
direct marginal, UK direct average): the sidecar logs a basis change on fallback.

## Datasets

| rows | dataset | year | basis | licence |
| --- | --- | --- | --- | --- |
| 1 (`world`) | IEA *Global Energy & CO2 Status Report 2019*, world average 475 g/kWh, as CodeCarbon's `carbon_intensity_per_source.json` `world_average` | 2019 | direct average | {LICENCE_CC} |
| {count("Our World in Data")} (countries, alpha-2 and alpha-3) | Our World in Data *carbon intensity of electricity* (Ember yearly electricity data and Energy Institute), as CodeCarbon's `private_infra/global_energy_mix.json` `carbon_intensity`; latest year per country | {years[0]}–{years[-1]} | lifecycle average (production-based) | {LICENCE_OWID} |
| {count("EPA eGRID")} (`US-XX`, states and DC) | US EPA eGRID2023, state annual CO2-equivalent total output emission rate (`STC2ERTA`, lb/MWh x {G_PER_KWH_PER_LB_PER_MWH}), as CodeCarbon's `private_infra/2023/usa_emissions.json` | 2023 | direct average (generation-based, no imports) | {LICENCE_EGRID} |
| {count("CodeCarbon 2023/canada")} (`CA-XX`, provinces and territories) | CodeCarbon's `private_infra/2023/canada_energy_mix.json` generation shares (CodeCarbon names no upstream source) x the coal 995, petroleum 816, natural gas 743 g/kWh combustion factors of `carbon_intensity_per_source.json`; non-fossil generation counts as zero, as in CodeCarbon | 2023 | direct average (fossil combustion only) | {LICENCE_CC} |
| {count("MEE/NBS")} (`CN-XX`, provinces) | Ministry of Ecology and Environment and National Bureau of Statistics of China, 2023 provincial average electricity CO2 factors, as CodeCarbon's `private_infra/2023/china_provincial_emissions.json` (CO2 only; Tibet, Hong Kong, Macao and Taiwan not in it) | 2023 | direct average (CO2 only, consumption-based) | {LICENCE_MEE} |
| {sum(1 for r in rows if r.source.startswith("Google Cloud region"))} (`gcp:…` with a published figure) | Google Cloud *Carbon free energy for Google Cloud regions*, grid carbon intensity per region, as CodeCarbon's `cloud/impact.csv` (values identical to Google's `region-carbon-info` `data/yearly/{GCP_FIGURES_YEAR}.csv`; `me-cenrtal1` corrected to `me-central1`). Google's page calls it the average lifecycle gross emissions of the local grid (its README says "operational") | {GCP_FIGURES_YEAR} | lifecycle average | {LICENCE_GCP} |
| {len(regions)} (`aws:…` {by_provider["aws"]}, `azure:…` {by_provider["azure"]}, `gcp:…` {by_provider["gcp"]}) | `cloud_regions.csv` (kept by hand): each region's location as its provider publishes it (URL per row); a region without a published figure takes its location's row above | per location | per location | per location; the mapping itself is this project's |
| — | ISO 3166-1 alpha-3 → alpha-2 codes from pycountry's copy of Debian's *iso-codes* (`pycountry/databases/iso3166-1.json`, pycountry {pycountry.version()}) | — | — | LGPL-2.1 (iso-codes, pycountry) |

CodeCarbon {codecarbon.version()}: <https://github.com/mlco2/codecarbon>, MIT licence, Copyright (c) 2019
Mila, BCG Gamma, CometML, Haverford College; (c) 2023 Code Carbon NGO.
Our World in Data: <https://ourworldindata.org/grapher/carbon-intensity-electricity> (CC BY 4.0).
EPA eGRID: <https://www.epa.gov/egrid/download-data>.
Google Cloud: <https://cloud.google.com/sustainability/region-carbon>.

## Left out, and why
- CodeCarbon's `nordic_emissions.json` (Swedish and Norwegian bidding zones): it mixes lifecycle
  factors for low-carbon sources with combustion factors for fossil ones and counts uncovered
  generation as zero, so its basis is neither; Sweden, Norway and Finland come from OWID/Ember.
  Electricity Maps bidding-zone codes (`SE-SE3`, `NO-NO1`) are accepted through `zones.csv`
  with their country's figure.
- eGRID's national `usa` row: the country row `US`/`USA` is OWID/Ember's, on the same basis as
  every other country.
- AWS GovCloud, Azure Government and sovereign clouds other than China: their published
  locations are too coarse to pick a grid.

## Hand-kept companions (not generated)
- `cloud_regions.csv`: provider, region, location (a key of this table), place, source URL.
- `zones.csv`: live-provider zone codes (Electricity Maps zones, WattTime regions) and which
  static row stands in for each; which `--region` keys derive which Electricity Maps zone.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--codecarbon-wheel", type=Path, required=True)
    parser.add_argument("--pycountry-wheel", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    try:
        codecarbon = Wheel(args.codecarbon_wheel)
        pycountry = Wheel(args.pycountry_wheel)
        regions = read_cloud_regions(args.out_dir / "cloud_regions.csv")
        rows = build_rows(codecarbon, pycountry, regions)
    except (GenerationError, OSError, KeyError, ValueError) as e:
        print(f"gen_intensity_table: {e}", file=sys.stderr)
        return 1
    write_table(rows, args.out_dir / "intensity.csv")
    (args.out_dir / "SOURCES.md").write_text(
        sources_markdown(rows, codecarbon, pycountry, regions), encoding="utf-8"
    )
    print(f"wrote {len(rows)} rows to {args.out_dir / 'intensity.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
