"""Budget alerts end to end: sidecar -> Prometheus rules -> Alertmanager -> webhook.

Prometheus (Debian's ``prometheus``) evaluates the rules of ``deploy/prometheus/generate.py``
rendered with every window and ``for`` divided by 1440 (a budget "day" becomes one minute),
never a hand-written copy. It scrapes a loaded sidecar whose ``--emissions-budget`` is tiny and
sends its alerts to a real Alertmanager (``prometheus-alertmanager``), which posts them to a
webhook receiver in this test. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio
from promstack import (
    JOB,
    NAMESPACE,
    ScrapedRun,
    WebhookReceiver,
    running_alertmanager,
    running_webhook,
    sample_value,
    scraped_sidecar,
)

from deploy.prometheus.generate import (
    ALERT_NAMES,
    PRODUCTION,
    budget_series,
    rules_yaml,
    runbook_url,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

SCALE: Final = 1440.0
"""24 h become 60 s; windows shorter than 10 s (ten scrapes) are clamped to 10 s."""
TIMING: Final = PRODUCTION.scaled(SCALE, evaluation_interval_s=1.0)
BUDGET_G: Final = 0.05
"""Grams per scaled budget period (60 s): the idle simulated GPU alone emits ~0.8 g per minute
at 394 g/kWh, so the burn rate is over 10x and the budget is gone within seconds."""
ALERT_TIMEOUT_S: Final = 40.0


@dataclass(frozen=True, slots=True)
class AlertingStack:
    run: ScrapedRun
    webhook: WebhookReceiver


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AlertingStack]:
    """Webhook, Alertmanager, Prometheus with the scaled rules, and a loaded sidecar."""
    directory: Path = tmp_path_factory.mktemp("alerting-e2e")
    async with (
        running_webhook() as webhook,
        running_alertmanager(directory / "alertmanager", webhook.url) as alertmanager,
        scraped_sidecar(
            directory / "prometheus",
            "--emissions-budget",
            str(BUDGET_G),
            "--carbon-intensity",
            "394",
            rules=rules_yaml(TIMING),
            alertmanager=alertmanager,
            requests=30,
            duration_s=6.0,
            settle_scrapes=1,
        ) as run,
    ):
        yield AlertingStack(run, webhook)


def _named(name: str) -> Any:
    return lambda alert: alert.get("labels", {}).get("alertname") == name


class TestBudgetAlertsReachWebhook:
    async def test_budget_exhausted_is_delivered(self, stack: AlertingStack) -> None:
        """LLMEmissionsBudgetExhausted reaches the webhook with severity, namespace and job."""
        payload, alert = await stack.webhook.wait_for(
            _named("LLMEmissionsBudgetExhausted"), ALERT_TIMEOUT_S
        )
        assert payload["version"] == "4"
        assert payload["receiver"] == "test-webhook"
        assert payload["status"] == "firing"
        assert payload["groupLabels"] == {
            "alertname": "LLMEmissionsBudgetExhausted",
            "namespace": NAMESPACE,
            "job": JOB,
        }
        assert alert["status"] == "firing"
        assert alert["labels"] == {
            "alertname": "LLMEmissionsBudgetExhausted",
            "severity": "warning",
            "namespace": NAMESPACE,
            "job": JOB,
        }
        annotations = alert["annotations"]
        assert annotations["runbook_url"] == runbook_url("LLMEmissionsBudgetExhausted")
        assert f"{NAMESPACE}/{JOB}" in annotations["summary"]
        # The description's template queries the recorded budget: 0.05 g humanizes to "50m".
        assert "budget of 50mg per 1m" in annotations["description"]

    async def test_fast_burn_is_delivered(self, stack: AlertingStack) -> None:
        """LLMEmissionsBudgetBurnFast reaches the webhook as a critical alert for the job."""
        _, alert = await stack.webhook.wait_for(
            _named("LLMEmissionsBudgetBurnFast"), ALERT_TIMEOUT_S
        )
        assert alert["labels"] == {
            "alertname": "LLMEmissionsBudgetBurnFast",
            "severity": "critical",
            "namespace": NAMESPACE,
            "job": JOB,
        }
        assert alert["annotations"]["runbook_url"] == runbook_url("LLMEmissionsBudgetBurnFast")

    async def test_rules_evaluate_cleanly(self, stack: AlertingStack) -> None:
        """Every scaled rule evaluates without error and the budget series hold what was sent."""
        prom = stack.run.prometheus
        data = await prom.api("rules")
        rules = [rule for group in data["groups"] for rule in group["rules"]]
        broken = {r["name"]: r.get("lastError") for r in rules if r.get("health") == "err"}
        assert not broken
        assert {r["name"] for r in rules if r["type"] == "alerting"} == set(ALERT_NAMES)

        names = budget_series(TIMING)
        budget = await prom.query(names["budget"])
        assert [(r["metric"], sample_value(r)) for r in budget] == [
            ({"__name__": names["budget"], "namespace": NAMESPACE, "job": JOB}, BUDGET_G)
        ]
        burn = await prom.value(names["burn_fast_long"])
        assert burn > 6

        # No sampler or carbon-source fault in this run: those alerts stay silent.
        alerts = await prom.api("alerts")
        active = {a["labels"]["alertname"] for a in alerts["alerts"]}
        assert not active & {"LLMEnergySamplerStale", "LLMCarbonIntensityFallback"}
