"""Every Grafana panel query runs on a real Prometheus that scraped a real sidecar, and has data.

One Prometheus (Debian's ``prometheus``, 127.0.0.1) scrapes one loaded sidecar (simulated GPU,
stand-in upstream, ``--emissions-budget``, ``--region FR``) for the whole module. Each query of
``dashboards.generate.iter_queries()`` is sent as Grafana would send it: template variables
substituted (all on "All", then on one concrete value each), instant panels as instant queries
at the end of the run, the others as range queries over the run. It must parse and return at
least one finite value; an ``or vector(0)`` pad is stripped first, so a pad cannot pass for data.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Final

import pytest
import pytest_asyncio
from promstack import NAMESPACE, POD, ScrapedRun, scraped_sidecar

from dashboards.common import PanelQuery, substitute
from dashboards.generate import iter_queries, render_all

pytestmark = pytest.mark.integration
SHARED_LOOP: Final = pytest.mark.asyncio(loop_scope="module")
"""Async tests run on the module's event loop, where the shared stack lives."""

MODELS: Final = ("llama-small", "llama-large")
"""The models :func:`promstack.drive_load` sends by default."""

VARIABLE_CHOICES: Final[Mapping[str, Mapping[str, str]]] = {
    "all": {},
    "one each": {"namespace": NAMESPACE, "pod": POD, "model": MODELS[0], "gpu": "0"},
}
"""Template-variable values a user may pick: every variable on "All", or one value each."""

PAD: Final = re.compile(r"\s*\bor\b\s*(?:on\s*\([^)]*\)\s*)?vector\s*\(\s*[-+0-9.eE]+\s*\)")
"""``or vector(0)`` (or ``or on() vector(0)``): makes an empty result look like data."""

QUERIES: Final = tuple(iter_queries())


def _query_id(q: PanelQuery) -> str:
    return f"{q.dashboard_uid}/{q.panel_title}/{q.ref_id}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ScrapedRun]:
    """One Prometheus and one loaded sidecar shared by every query of every dashboard."""
    directory: Path = tmp_path_factory.mktemp("dashboard-queries")
    async with scraped_sidecar(
        directory,
        "--emissions-budget",
        "500",
        "--region",
        "FR",
        "--pue",
        "1.2",
        "--tenant-header",
        "x-tenant-id",
    ) as scraped:
        yield scraped


def test_dashboards_have_queries() -> None:
    """The dashboards yield queries from all three dashboards, so the loop below is not empty."""
    assert {q.dashboard_uid for q in QUERIES} == {
        "llm-energy-overview",
        "llm-energy-requests",
        "llm-energy-fleet",
    }


def test_no_query_is_padded_with_a_constant() -> None:
    """No panel query hides missing data behind ``or vector(...)``."""
    padded = [_query_id(q) for q in QUERIES if PAD.search(q.expr)]
    assert not padded


@SHARED_LOOP
@pytest.mark.parametrize("panel_query", [pytest.param(q, id=_query_id(q)) for q in QUERIES])
async def test_panel_query_returns_data(run: ScrapedRun, panel_query: PanelQuery) -> None:
    """The panel's query parses and returns finite data, with "All" and with one value each."""
    prom = run.prometheus
    for choice, values in VARIABLE_CHOICES.items():
        expr = PAD.sub("", substitute(panel_query.expr, values))
        if panel_query.instant:
            rows = await prom.query(expr, run.last_scrape_s)
            points = [float(row["value"][1]) for row in rows]
        else:
            series = await prom.query_range(expr, run.first_scrape_s, run.last_scrape_s, 1.0)
            points = [float(v) for s in series for _, v in s["values"]]
        assert any(math.isfinite(p) for p in points), (
            f"variables {choice!r}: no finite data from {expr!r} (got {points[:10]})"
        )


_LABEL_VALUES: Final = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def _variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, variable name, query) of every query variable of every dashboard."""
    found: list[tuple[str, str, str]] = []
    for name, text in render_all().items():
        for variable in json.loads(text)["templating"]["list"]:
            if variable.get("type") == "query":
                found.append((name, str(variable["name"]), str(variable["query"])))
    return found


@SHARED_LOOP
@pytest.mark.parametrize(
    ("board", "variable", "query"),
    [pytest.param(*v, id=f"{v[0]}/{v[1]}") for v in _variable_queries()],
)
async def test_template_variable_lists_the_run(
    run: ScrapedRun, board: str, variable: str, query: str
) -> None:
    """Each template variable's ``label_values`` query offers the labels the run produced."""
    match = _LABEL_VALUES.match(query)
    assert match, f"{board}: {variable} is not a label_values query: {query!r}"
    assert match["label"] == variable
    values = await run.prometheus.api(
        f"label/{variable}/values",
        {
            "match[]": substitute(match["selector"]),
            "start": f"{run.first_scrape_s:.3f}",
            "end": f"{run.last_scrape_s:.3f}",
        },
    )
    expected = {"namespace": {NAMESPACE}, "pod": {POD}, "model": set(MODELS), "gpu": {"0"}}
    assert set(values) == expected[variable]
