"""Tests of the Grafana dashboards generated with grafana-foundation-sdk (dashboards/)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from contract import CONTRACT_SERIES
from tools import require_tool

from dashboards.common import DEFAULT_SUBSTITUTIONS, substitute
from dashboards.generate import DASHBOARDS, JSON_DIR, iter_queries, main, render_all

# CONTRACT.md's metric table, with the histogram's series.
CONTRACT_METRICS = CONTRACT_SERIES
KNOWN_UNITS = {
    "watt",
    "joule",
    "massg",
    "percentunit",
    "reqps",
    "short",
    "suffix: tok/s",
    "suffix: gCO2e/kWh",
}
REPO = Path(__file__).resolve().parents[1]
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
VARIABLE_REF = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _documents() -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in render_all().items()}


def _panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in document["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def _all_panels() -> list[tuple[str, dict[str, Any]]]:
    return [(name, panel) for name, doc in _documents().items() for panel in _panels(doc)]


def _panel_id(item: tuple[str, dict[str, Any]]) -> str:
    return f"{item[0]}:{item[1]['title']}"


class TestGeneratedJson:
    def test_committed_json_is_fresh(self) -> None:
        """dashboards/json/*.json is byte-identical to a fresh generation, with nothing extra."""
        rendered = render_all()
        committed = {
            path.name: path.read_text(encoding="utf-8") for path in JSON_DIR.glob("*.json")
        }
        assert committed == rendered

    def test_check_mode_passes_on_fresh_files(self) -> None:
        """`python -m dashboards.generate --check` exits 0 when nothing changed."""
        assert main(["--check"]) == 0

    def test_json_is_sorted_indented_and_ends_with_a_newline(self) -> None:
        """Files use sorted keys, two-space indent and a trailing newline (stable diffs)."""
        for text in render_all().values():
            assert text.endswith("}\n")
            assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"

    def test_regeneration_is_deterministic(self) -> None:
        """Two generations in one process give the same bytes."""
        assert render_all() == render_all()

    def test_every_dashboard_targets_grafana_11(self) -> None:
        """The pinned SDK build writes Grafana 11 schema, with a uid matching the file name."""
        for name, document in _documents().items():
            assert document["schemaVersion"] >= 39
            assert f"{document['uid']}.json" == name
            assert set(DASHBOARDS) >= {document["uid"]}


class TestVariables:
    @pytest.mark.parametrize(
        ("uid", "expected"),
        [
            ("llm-energy-overview", ["datasource", "namespace", "pod", "model", "gpu"]),
            ("llm-energy-requests", ["datasource", "namespace", "pod", "model"]),
            ("llm-energy-fleet", ["datasource", "namespace", "model"]),
        ],
    )
    def test_template_variables(self, uid: str, expected: list[str]) -> None:
        """Each dashboard offers a Prometheus data source and the filters its panels use."""
        document = _documents()[f"{uid}.json"]
        variables = document["templating"]["list"]
        assert [v["name"] for v in variables] == expected
        assert variables[0]["type"] == "datasource"
        assert variables[0]["query"] == "prometheus"
        for variable in variables[1:]:
            assert variable["type"] == "query"
            assert variable["datasource"]["uid"] == "${datasource}"
            assert variable["includeAll"] is True
            assert variable["allValue"] == ".*"

    def test_variable_queries_only_reference_earlier_variables(self) -> None:
        """A variable's query narrows by variables defined before it in the same dashboard."""
        for document in _documents().values():
            seen: set[str] = set()
            for variable in document["templating"]["list"]:
                refs = {a or b for a, b in VARIABLE_REF.findall(str(variable.get("query", "")))}
                assert refs <= seen, (variable["name"], refs - seen)
                seen.add(variable["name"])

    def test_panel_queries_only_use_defined_variables(self) -> None:
        """Queries use only the dashboard's own variables and Grafana's built-in intervals."""
        for document in _documents().values():
            defined = {v["name"] for v in document["templating"]["list"]} | BUILTIN_VARIABLES
            for panel in _panels(document):
                for target in panel["targets"]:
                    refs = {a or b for a, b in VARIABLE_REF.findall(target["expr"])}
                    assert refs <= defined, (panel["title"], refs - defined)


@pytest.mark.parametrize("item", _all_panels(), ids=_panel_id)
class TestPanels:
    def test_has_a_description(self, item: tuple[str, dict[str, Any]]) -> None:
        """Every panel says what its number means."""
        description = item[1].get("description", "")
        assert len(description) >= 40

    def test_has_a_known_unit(self, item: tuple[str, dict[str, Any]]) -> None:
        """Every panel has a unit (for heatmaps: the y axis) from the expected set."""
        panel = item[1]
        unit = panel["fieldConfig"]["defaults"].get("unit")
        if panel["type"] == "heatmap":
            unit = panel["options"]["yAxis"]["unit"]
        assert unit in KNOWN_UNITS
        for override in panel["fieldConfig"].get("overrides", []):
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    assert prop["value"] in KNOWN_UNITS

    def test_queries_use_the_datasource_variable(self, item: tuple[str, dict[str, Any]]) -> None:
        """Panels and queries read the Prometheus chosen in the `datasource` variable."""
        panel = item[1]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip()

    def test_queries_read_contract_metrics_only(self, item: tuple[str, dict[str, Any]]) -> None:
        """Queries name only metrics from CONTRACT.md, never recording rules or other names."""
        for target in item[1]["targets"]:
            assert set(re.findall(r"\bllm_energy_[a-z_]+", target["expr"])) <= CONTRACT_METRICS
            assert "vector(0)" not in target["expr"]

    def test_ref_ids_are_unique(self, item: tuple[str, dict[str, Any]]) -> None:
        """Queries of one panel have distinct refIds (overrides and tables match on them)."""
        ref_ids = [target["refId"] for target in item[1]["targets"]]
        assert len(ref_ids) == len(set(ref_ids))


class TestLayout:
    def test_panel_ids_are_unique_and_grid_fits(self) -> None:
        """Panel ids are unique per dashboard and every panel fits the 24-column grid."""
        for document in _documents().values():
            ids = [panel["id"] for panel in document["panels"]]
            assert len(ids) == len(set(ids))
            for panel in document["panels"]:
                grid = panel["gridPos"]
                assert grid["x"] + grid["w"] <= 24
                assert grid["h"] > 0

    def test_required_panels_exist(self) -> None:
        """The panels the issue asks for are all there."""
        titles = {doc["uid"]: {p["title"] for p in _panels(doc)} for doc in _documents().values()}
        assert {
            "GPU power and idle baseline",
            "Energy by phase",
            "Idle share",
            "Energy per request (all-in)",
            "Energy per request (attributed)",
            "Energy per 1k output tokens",
            "gCO2e per request",
            "Emissions in the last 24 h against the budget",
            "Grid carbon intensity",
            "Carbon intensity source",
        } <= titles["llm-energy-overview"]
        assert {
            "Request energy distribution",
            "Request energy quantiles",
            "Tokens per second",
            "In-flight requests",
            "Status mix",
            "Attributed power by model",
        } <= titles["llm-energy-requests"]
        assert {
            "Emissions and budget per namespace and job (last 24 h)",
            "Models across the fleet",
            "Top emitting pods (last 24 h)",
            "Top emitting models (last 24 h)",
        } <= titles["llm-energy-fleet"]

    def test_idle_baseline_is_drawn_as_a_dashed_line(self) -> None:
        """The overview's power panel draws the idle baseline (query B) dashed and unfilled."""
        document = _documents()["llm-energy-overview.json"]
        panel = next(p for p in _panels(document) if p["title"] == "GPU power and idle baseline")
        assert "llm_energy_idle_baseline_watts" in panel["targets"][1]["expr"]
        override = next(
            o for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == "B"
        )
        props = {prop["id"]: prop["value"] for prop in override["properties"]}
        assert props["custom.lineStyle"]["fill"] == "dash"
        assert props["custom.fillOpacity"] == 0

    def test_energy_by_phase_is_stacked(self) -> None:
        """Energy by phase stacks the three phases."""
        document = _documents()["llm-energy-overview.json"]
        panel = next(p for p in _panels(document) if p["title"] == "Energy by phase")
        assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
        assert "by (phase)" in panel["targets"][0]["expr"]

    def test_request_heatmap_reads_histogram_buckets(self) -> None:
        """The heatmap reads the request-energy buckets pre-computed (no Grafana bucketing)."""
        document = _documents()["llm-energy-requests.json"]
        panel = next(p for p in _panels(document) if p["type"] == "heatmap")
        assert panel["options"]["calculate"] is False
        assert panel["targets"][0]["format"] == "heatmap"
        assert "llm_energy_request_joules_bucket" in panel["targets"][0]["expr"]


class TestQueries:
    def test_iter_queries_lists_every_target(self) -> None:
        """iter_queries yields one entry per panel query, across all dashboards."""
        queries = list(iter_queries())
        targets = sum(len(panel["targets"]) for _, panel in _all_panels())
        assert len(queries) == targets
        assert {q.dashboard_uid for q in queries} == set(DASHBOARDS)
        assert all(q.expr and q.ref_id for q in queries)

    def test_substitute_replaces_every_variable(self) -> None:
        """After substitution no Grafana variable is left in any query."""
        for q in iter_queries():
            assert "$" not in substitute(q.expr), q

    def test_substitute_forms(self) -> None:
        """Both $name and ${name} are replaced, longest names first, overrides win."""
        expr = 'rate(x{pod=~"$pod", ns=~"${namespace}"}[$__rate_interval]) [$__range]'
        assert substitute(expr, {"pod": "p-0"}) == (
            f'rate(x{{pod=~"p-0", ns=~".*"}}[{DEFAULT_SUBSTITUTIONS["__rate_interval"]}])'
            f" [{DEFAULT_SUBSTITUTIONS['__range']}]"
        )
        with pytest.raises(KeyError):
            substitute("$unknown")


@pytest.mark.integration
class TestQueriesParse:
    def test_every_query_parses(self, tmp_path: Path) -> None:
        """promtool accepts every substituted panel query (as a recording rule's expr)."""
        promtool = require_tool("promtool")
        rules = [
            {"record": f"dashboard_query:{index}", "expr": substitute(q.expr)}
            for index, q in enumerate(iter_queries())
        ]
        path = tmp_path / "queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
        result = subprocess.run(
            [promtool, "check", "rules", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


class TestDeployment:
    def test_kustomization_lists_every_dashboard(self) -> None:
        """dashboards/kustomization.yaml puts every generated JSON file in the ConfigMap."""
        kustomization = yaml.safe_load((REPO / "dashboards" / "kustomization.yaml").read_text())
        (generator,) = kustomization["configMapGenerator"]
        assert sorted(generator["files"]) == sorted(f"json/{name}" for name in render_all())
        assert kustomization["generatorOptions"]["labels"]["grafana_dashboard"] == "1"

    def test_docs_name_every_panel(self) -> None:
        """docs/dashboards.md lists every panel title of every dashboard."""
        docs = (REPO / "docs" / "dashboards.md").read_text(encoding="utf-8")
        titles = {panel["title"] for _, panel in _all_panels()}
        assert not {title for title in titles if f"| {title} |" not in docs}


@pytest.mark.integration
class TestKustomize:
    def test_configmap_holds_the_committed_json(self) -> None:
        """`kubectl kustomize dashboards/` renders one ConfigMap with the committed JSON."""
        kubectl = require_tool("kubectl")
        result = subprocess.run(
            [kubectl, "kustomize", str(REPO / "dashboards")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        (configmap,) = list(yaml.safe_load_all(result.stdout))
        assert configmap["kind"] == "ConfigMap"
        assert configmap["metadata"]["name"] == "llm-energy-dashboards"
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["data"] == render_all()
