"""Tests of the generated Prometheus rules (deploy/prometheus/generate.py and its outputs)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from contract import CONTRACT_SERIES
from tools import require_tool

from deploy.prometheus.generate import (
    ALERT_NAMES,
    PRODUCTION,
    PROMETHEUS_RULE_PATH,
    RULES_PATH,
    RUNBOOK_URL_BASE,
    RuleTiming,
    format_duration,
    main,
    prometheus_rule_yaml,
    render_prometheus_rule,
    render_rules,
    rules_yaml,
)

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RUNBOOKS = REPO / "docs" / "runbooks.md"
ALERTMANAGER_EXAMPLE = PROMETHEUS_DIR / "alertmanager.example.yml"

CONTRACT_ALERTS = {
    "LLMEmissionsBudgetBurnFast",
    "LLMEmissionsBudgetBurnSlow",
    "LLMEmissionsBudgetExhausted",
    "LLMIdleEnergyShareHigh",
    "LLMEnergyPerTokenRegression",
    "LLMEnergySamplerStale",
    "LLMCarbonIntensityFallback",
}
# CONTRACT.md's metric table, plus the histogram's series and Prometheus' own `up`.
CONTRACT_METRICS = CONTRACT_SERIES | {"up"}
RECORD_NAME = re.compile(r"^[a-z_]*:[a-z_]+:[a-z0-9_]+$")
BUDGET_ALERTS = (
    "LLMEmissionsBudgetBurnFast",
    "LLMEmissionsBudgetBurnSlow",
    "LLMEmissionsBudgetExhausted",
)


def _rules(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alerts(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules(document) if "alert" in rule}


def _github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for headings: lower case, punctuation dropped, spaces to -."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


class TestGeneratedFiles:
    def test_rules_file_is_fresh(self) -> None:
        """deploy/prometheus/rules.yml is byte-identical to a fresh generation."""
        assert RULES_PATH.read_text(encoding="utf-8") == rules_yaml()

    def test_prometheus_rule_file_is_fresh(self) -> None:
        """deploy/prometheus/prometheusrule.yaml is byte-identical to a fresh generation."""
        assert PROMETHEUS_RULE_PATH.read_text(encoding="utf-8") == prometheus_rule_yaml()

    def test_prometheus_rule_carries_the_same_groups(self) -> None:
        """The PrometheusRule's spec.groups equal the groups of rules.yml."""
        rules = yaml.safe_load(RULES_PATH.read_text(encoding="utf-8"))
        manifest = yaml.safe_load(PROMETHEUS_RULE_PATH.read_text(encoding="utf-8"))
        assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
        assert manifest["kind"] == "PrometheusRule"
        assert manifest["spec"]["groups"] == rules["groups"]

    def test_check_mode_passes_on_fresh_files(self) -> None:
        """`python -m deploy.prometheus.generate --check` exits 0 when nothing changed."""
        assert main(["--check"]) == 0


class TestAlerts:
    def test_every_contract_alert_exists_once(self) -> None:
        """Each alert name of CONTRACT.md is defined exactly once, and no other."""
        names = [rule["alert"] for rule in _rules(render_rules()) if "alert" in rule]
        assert sorted(names) == sorted(CONTRACT_ALERTS)
        assert set(ALERT_NAMES) == CONTRACT_ALERTS

    @pytest.mark.parametrize("name", sorted(CONTRACT_ALERTS))
    def test_alert_has_for_severity_and_annotations(self, name: str) -> None:
        """An alert waits a `for`, carries a severity, and its description shows the value."""
        alert = _alerts(render_rules())[name]
        assert format_duration(0) != alert["for"]
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}
        assert annotations["summary"]
        assert "$value" in annotations["description"]

    @pytest.mark.parametrize("name", sorted(CONTRACT_ALERTS))
    def test_runbook_url_points_at_a_runbook_section(self, name: str) -> None:
        """runbook_url is RUNBOOK_URL_BASE plus the anchor of a heading in docs/runbooks.md."""
        url = _alerts(render_rules())[name]["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_URL_BASE
        assert base.endswith("/docs/runbooks.md")
        assert anchor in _github_anchors(RUNBOOKS.read_text(encoding="utf-8"))

    @pytest.mark.parametrize("name", BUDGET_ALERTS)
    def test_budget_alerts_aggregate_per_namespace_and_job(self, name: str) -> None:
        """Budget alerts match emissions and budget on (namespace, job), the budget's scope."""
        assert "on (namespace, job)" in _alerts(render_rules())[name]["expr"]

    def test_budget_compares_the_max_of_the_gauges_with_both_scopes(self) -> None:
        """The budget is the max over replicas; emissions are summed over both scopes."""
        rules = {rule.get("record"): rule["expr"] for rule in _rules(render_rules())}
        budget = rules["namespace_job:llm_energy_emissions_budget_grams_per_day:max"]
        assert budget == "max by (namespace, job) (llm_energy_emissions_budget_grams_per_day)"
        emitted = rules["namespace_job:llm_energy_emissions_grams:increase1d"]
        assert "scope" not in emitted
        assert "increase(llm_energy_emissions_grams_total[1d])" in emitted

    def test_regression_compares_with_a_week_ago(self) -> None:
        """LLMEnergyPerTokenRegression reads the same window one week earlier."""
        assert "offset 1w" in _alerts(render_rules())["LLMEnergyPerTokenRegression"]["expr"]


class TestRecordingRules:
    def test_names_follow_level_metric_operations(self) -> None:
        """Every recording rule is named level:metric:operations."""
        records = [rule["record"] for rule in _rules(render_rules()) if "record" in rule]
        assert records
        assert all(RECORD_NAME.match(name) for name in records), records
        assert len(records) == len(set(records))

    @pytest.mark.parametrize(
        "name",
        [
            "namespace_pod_model:llm_energy_attributed_joules_per_output_token:ratio_rate5m",
            "namespace_pod_model:llm_energy_attributed_joules_per_request:ratio_rate5m",
            "namespace_pod_model:llm_energy_attributed_grams_per_request:ratio_rate5m",
            "namespace_job_model:llm_energy_model_emissions_grams:increase1d",
            "model:llm_energy_attributed_joules_per_output_token:ratio_rate5m",
            "namespace_pod:llm_energy_all_in_joules_per_request:ratio_rate5m",
            "namespace_job:llm_energy_all_in_grams_per_request:ratio_rate5m",
            ":llm_energy_all_in_joules_per_output_token:ratio_rate5m",
            ":llm_energy_idle_share:ratio_rate5m",
            "namespace_job:llm_energy_idle_share:ratio_rate5m",
            "namespace_job:llm_energy_emissions_grams:increase1d",
            ":llm_energy_emissions_grams:increase1d",
        ],
    )
    def test_documented_series_exist(self, name: str) -> None:
        """The per-level series that dashboards and docs name are recorded."""
        assert name in {rule.get("record") for rule in _rules(render_rules())}

    def test_only_contract_metrics_are_read(self) -> None:
        """Rules read only metrics listed in CONTRACT.md (a typo would silently never match)."""
        text = rules_yaml()
        used = set(re.findall(r"\bllm_energy_[a-z_]+", text))
        recorded = {rule.get("record", "") for rule in _rules(render_rules())}
        metric_parts = {name.split(":")[1] for name in recorded if name}
        unknown = used - CONTRACT_METRICS - metric_parts
        assert not unknown


class TestTiming:
    def test_format_duration(self) -> None:
        """Durations are written the way Prometheus prints them."""
        assert format_duration(300) == "5m"
        assert format_duration(86400) == "1d"
        assert format_duration(604800) == "1w"
        assert format_duration(5400) == "1h30m"
        assert format_duration(0.25) == "250ms"
        assert format_duration(0) == "0s"

    def test_scaled_rules_keep_alert_names_and_shrink_windows(self) -> None:
        """A scaled rendering has the same alerts, with shorter `for` and windows."""
        timing = PRODUCTION.scaled(360, min_window_s=10, evaluation_interval_s=1)
        scaled = render_rules(timing)
        assert set(_alerts(scaled)) == CONTRACT_ALERTS
        assert all(group["interval"] == "1s" for group in scaled["groups"])
        assert _alerts(scaled)["LLMEmissionsBudgetBurnFast"]["for"] == "333ms"
        assert "increase4m" in _alerts(scaled)["LLMEmissionsBudgetExhausted"]["expr"]
        assert "offset 28m" in _alerts(scaled)["LLMEnergyPerTokenRegression"]["expr"]
        assert timing.rate_window_s == 10

    def test_production_groups_use_the_global_interval(self) -> None:
        """Production groups leave `interval` to Prometheus' evaluation_interval."""
        assert all("interval" not in group for group in render_rules()["groups"])

    def test_invalid_timing_is_refused(self) -> None:
        """A zero window or a negative factor is a programming error."""
        with pytest.raises(ValueError, match="rate_window_s"):
            RuleTiming(rate_window_s=0)
        with pytest.raises(ValueError, match="factor"):
            PRODUCTION.scaled(0)

    def test_prometheus_rule_labels_can_be_extended(self) -> None:
        """Extra labels (a ruleSelector's) are added to the manifest's metadata."""
        manifest = render_prometheus_rule(labels={"release": "kube-prometheus-stack"})
        assert manifest["metadata"]["labels"]["release"] == "kube-prometheus-stack"


class TestUnitTestFiles:
    def test_unit_tests_cover_every_alert_firing_and_silent(self) -> None:
        """Each alert has at least one test expecting it to fire and one expecting silence."""
        firing: set[str] = set()
        silent: set[str] = set()
        for path in PROMETHEUS_DIR.glob("rules_test*.yml"):
            for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
                for check in case.get("alert_rule_test", []):
                    (firing if check.get("exp_alerts") else silent).add(check["alertname"])
        assert firing == CONTRACT_ALERTS
        assert silent == CONTRACT_ALERTS


@pytest.mark.integration
class TestPromtool:
    def test_check_rules(self) -> None:
        """promtool check rules accepts rules.yml."""
        promtool = require_tool("promtool")
        result = subprocess.run(
            [promtool, "check", "rules", str(RULES_PATH)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_unit_tests(self) -> None:
        """promtool test rules passes every firing and non-firing case."""
        promtool = require_tool("promtool")
        tests = sorted(PROMETHEUS_DIR.glob("rules_test*.yml"))
        assert len(tests) >= 2
        result = subprocess.run(
            [promtool, "test", "rules", *map(str, tests)],
            capture_output=True,
            text=True,
            check=False,
            cwd=PROMETHEUS_DIR,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_check_scaled_rules(self, tmp_path: Path) -> None:
        """The shortened rules an end-to-end test loads are valid too."""
        promtool = require_tool("promtool")
        path = tmp_path / "rules.yml"
        timing = PRODUCTION.scaled(720, min_window_s=4, evaluation_interval_s=1)
        path.write_text(rules_yaml(timing), encoding="utf-8")
        result = subprocess.run(
            [promtool, "check", "rules", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
class TestDeployment:
    def test_kustomize_renders_the_prometheus_rule(self) -> None:
        """`kubectl kustomize deploy/prometheus/` renders the committed PrometheusRule."""
        kubectl = require_tool("kubectl")
        result = subprocess.run(
            [kubectl, "kustomize", str(PROMETHEUS_DIR)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        (manifest,) = list(yaml.safe_load_all(result.stdout))
        assert manifest == yaml.safe_load(PROMETHEUS_RULE_PATH.read_text(encoding="utf-8"))

    def test_alertmanager_example_is_valid(self) -> None:
        """amtool accepts the example Alertmanager configuration."""
        amtool = require_tool("amtool")
        result = subprocess.run(
            [amtool, "check-config", str(ALERTMANAGER_EXAMPLE)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.parametrize(
        ("alertname", "receiver"),
        [
            ("LLMEmissionsBudgetBurnFast", "llm-energy-page"),
            ("LLMEmissionsBudgetBurnSlow", "llm-energy-chat"),
            ("LLMEmissionsBudgetExhausted", "llm-energy-chat"),
            ("LLMIdleEnergyShareHigh", "llm-energy-tickets"),
            ("LLMEnergyPerTokenRegression", "llm-energy-chat"),
            ("LLMEnergySamplerStale", "llm-energy-chat"),
            ("LLMCarbonIntensityFallback", "llm-energy-chat"),
        ],
    )
    def test_alertmanager_example_routes_by_severity(self, alertname: str, receiver: str) -> None:
        """Each alert, with the severity the rules give it, reaches the intended receiver."""
        amtool = require_tool("amtool")
        severity = _alerts(render_rules())[alertname]["labels"]["severity"]
        result = subprocess.run(
            [
                amtool,
                "config",
                "routes",
                "test",
                f"--config.file={ALERTMANAGER_EXAMPLE}",
                f"--verify.receivers={receiver}",
                f"alertname={alertname}",
                f"severity={severity}",
                "namespace=llm",
                "job=llm/bloom",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


class TestRequireTool:
    def test_found_tool_returns_its_path(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """require_tool returns the executable's path when it is on PATH."""
        executable = Path(sys.executable)
        monkeypatch.setenv("PATH", str(executable.parent))
        assert Path(require_tool(executable.name)).samefile(executable)

    def test_missing_tool_skips_outside_ci(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without CI=true a missing tool skips the test."""
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.setenv("PATH", "")
        with pytest.raises(pytest.skip.Exception):
            require_tool("promtool")

    def test_missing_tool_fails_in_ci(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With CI=true a missing tool fails the test instead of hiding it."""
        monkeypatch.setenv("CI", "true")
        monkeypatch.setenv("PATH", "")
        with pytest.raises(pytest.fail.Exception, match="CI=true"):
            require_tool("promtool")
