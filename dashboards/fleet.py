"""Fleet dashboard: totals and budgets per namespace and model, and the top emitters."""

from __future__ import annotations

from typing import Final

from grafana_foundation_sdk.builders.dashboard import Dashboard

from dashboards.common import (
    IDLE_PHASES,
    IDLE_THRESHOLDS,
    PanelBuilder,
    Units,
    bargauge_panel,
    dashboard,
    query,
    sel,
    stat_panel,
    table_panel,
    timeseries_panel,
)

__all__ = ["UID", "fleet_dashboard"]

UID: Final = "llm-energy-fleet"

_NS: Final = sel()
_MODEL: Final = sel('model=~"$model"')
_INFERENCE: Final = sel('endpoint!="other"')
_RANGE: Final = "$__range"

_EMITTED_24H: Final = (
    f"sum by (namespace, job) (increase(llm_energy_emissions_grams_total{{{_NS}}}[24h]))"
)
_BUDGET: Final = f"max by (namespace, job) (llm_energy_emissions_budget_grams_per_day{{{_NS}}})"


def _totals_row() -> list[PanelBuilder]:
    return [
        stat_panel(
            "Fleet GPU power now",
            "Power drawn right now by every GPU that a sidecar in the selected namespaces "
            "monitors.",
            Units.WATT,
            [query(f"sum(llm_energy_gpu_power_watts{{{_NS}}})", "power", instant=True)],
        ),
        stat_panel(
            "Energy over the time range",
            "GPU energy measured over the dashboard's time range, all phases.",
            Units.JOULE,
            [
                query(
                    f"sum(increase(llm_energy_joules_total{{{_NS}}}[{_RANGE}]))",
                    "energy",
                    instant=True,
                )
            ],
        ),
        stat_panel(
            "Emissions in the last 24 h",
            "Grams CO2e emitted over the preceding 24 h, operational plus embodied, whatever "
            "the dashboard's time range: the window the budgets use.",
            Units.GRAMS,
            [
                query(
                    f"sum(increase(llm_energy_emissions_grams_total{{{_NS}}}[24h]))",
                    "emissions",
                    instant=True,
                )
            ],
        ),
        stat_panel(
            "Inference requests over the time range",
            "Inference requests finished over the time range, any status.",
            Units.COUNT,
            [
                query(
                    f"sum(increase(llm_energy_requests_total{{{_INFERENCE}}}[{_RANGE}]))",
                    "requests",
                    instant=True,
                )
            ],
        ),
        stat_panel(
            "Fleet idle share",
            "Share of all GPU energy over the time range spent on the idle baseline "
            "(idle_serving + idle_standby) rather than on work.",
            Units.RATIO,
            [
                query(
                    f"sum(increase(llm_energy_joules_total{{{_NS}, {IDLE_PHASES}}}[{_RANGE}]))"
                    f"\n/\n(sum(increase(llm_energy_joules_total{{{_NS}}}[{_RANGE}])) > 0)",
                    "idle share",
                    instant=True,
                )
            ],
            thresholds=IDLE_THRESHOLDS,
        ),
        stat_panel(
            "Fleet gCO2e per request",
            "Grams CO2e (operational + embodied) per finished inference request over the time "
            "range, across the fleet: the SCI per request.",
            Units.GRAMS,
            [
                query(
                    f"sum(increase(llm_energy_emissions_grams_total{{{_NS}}}[{_RANGE}]))"
                    "\n/\n"
                    f"(sum(increase(llm_energy_requests_total{{{_INFERENCE}}}[{_RANGE}])) > 0)",
                    "per request",
                    instant=True,
                )
            ],
        ),
    ]


def _budget_row() -> list[PanelBuilder]:
    return [
        table_panel(
            "Emissions and budget per namespace and job (last 24 h)",
            "For every job (the PodMonitor's job, shared by a deployment's replicas): grams "
            "CO2e emitted by all its replicas over the last 24 h, its daily budget (the "
            "largest --emissions-budget among them), and the share used. Jobs without a "
            "budget show no budget.",
            Units.GRAMS,
            [
                query(_EMITTED_24H, ref_id="A", instant=True, table_format=True),
                query(_BUDGET, ref_id="B", instant=True, table_format=True),
                query(
                    f"{_EMITTED_24H}\n/ on (namespace, job)\n{_BUDGET}",
                    ref_id="C",
                    instant=True,
                    table_format=True,
                ),
            ],
            columns={
                "Value #A": ("Emitted, last 24 h", Units.GRAMS),
                "Value #B": ("Budget per day", Units.GRAMS),
                "Value #C": ("Budget used", Units.RATIO),
            },
            sort_by="Emitted, last 24 h",
            width=12,
        ),
        timeseries_panel(
            "Emission rate per namespace",
            "Grams CO2e per day at the current pace (operational + embodied), by namespace.",
            Units.GRAMS,
            [
                query(
                    "86400 * sum by (namespace) "
                    f"(rate(llm_energy_emissions_grams_total{{{_NS}}}[$__rate_interval]))",
                    "{{namespace}}",
                )
            ],
            stacked=True,
            fill_opacity=30,
        ),
    ]


def _models_row() -> list[PanelBuilder]:
    return [
        table_panel(
            "Models across the fleet",
            "Per model over the time range: attributed energy (dynamic + idle_serving), "
            "energy per finished request, energy per 1,000 completion tokens, and grams CO2e "
            "of the attributed energy (operational).",
            Units.JOULE,
            [
                query(
                    "sum by (model) "
                    f"(increase(llm_energy_model_joules_total{{{_MODEL}}}[{_RANGE}]))",
                    ref_id="A",
                    instant=True,
                    table_format=True,
                ),
                query(
                    "sum by (model) "
                    f"(increase(llm_energy_request_joules_sum{{{_MODEL}}}[{_RANGE}]))\n/\n"
                    "(sum by (model) "
                    f"(increase(llm_energy_request_joules_count{{{_MODEL}}}[{_RANGE}])) > 0)",
                    ref_id="B",
                    instant=True,
                    table_format=True,
                ),
                query(
                    "1000 * sum by (model) "
                    f"(increase(llm_energy_model_joules_total{{{_MODEL}}}[{_RANGE}]))\n/\n"
                    "(sum by (model) (increase(llm_energy_tokens_total"
                    f'{{{_MODEL}, kind="completion"}}[{_RANGE}])) > 0)',
                    ref_id="C",
                    instant=True,
                    table_format=True,
                ),
                query(
                    "sum by (model) "
                    f"(increase(llm_energy_model_emissions_grams_total{{{_MODEL}}}[{_RANGE}]))",
                    ref_id="D",
                    instant=True,
                    table_format=True,
                ),
            ],
            columns={
                "Value #A": ("Attributed energy", Units.JOULE),
                "Value #B": ("Energy per request", Units.JOULE),
                "Value #C": ("Energy per 1k output tokens", Units.JOULE),
                "Value #D": ("Attributed gCO2e", Units.GRAMS),
            },
            sort_by="Attributed energy",
            width=24,
        ),
    ]


def _tenants_row() -> list[PanelBuilder]:
    return [
        table_panel(
            "Energy by tenant (last 24 h)",
            "Showback (sidecars run with --tenant-header or --tenant-from-api-key): attributed "
            "energy of each tenant's finished requests over the last 24 h, and its grams CO2e "
            "(operational). `none` is traffic that named no tenant, `invalid` a header value "
            "that is not a plain name, `other` tenants past --max-tenants.",
            Units.JOULE,
            [
                query(
                    f"sum by (tenant) (increase(llm_energy_tenant_joules_total{{{_NS}}}[24h]))",
                    ref_id="A",
                    instant=True,
                    table_format=True,
                ),
                query(
                    "sum by (tenant) "
                    f"(increase(llm_energy_tenant_emissions_grams_total{{{_NS}}}[24h]))",
                    ref_id="B",
                    instant=True,
                    table_format=True,
                ),
            ],
            columns={
                "Value #A": ("Attributed energy", Units.JOULE),
                "Value #B": ("Attributed gCO2e", Units.GRAMS),
            },
            sort_by="Attributed energy",
            width=24,
        ),
    ]


def _top_row() -> list[PanelBuilder]:
    return [
        bargauge_panel(
            "Top emitting pods (last 24 h)",
            "The ten pods that emitted the most grams CO2e (operational + embodied) over the "
            "last 24 h.",
            Units.GRAMS,
            [
                query(
                    "topk(10, sum by (namespace, pod) "
                    f"(increase(llm_energy_emissions_grams_total{{{_NS}}}[24h])))",
                    "{{namespace}}/{{pod}}",
                    instant=True,
                )
            ],
        ),
        bargauge_panel(
            "Top emitting models (last 24 h)",
            "The ten models whose attributed energy emitted the most grams CO2e (operational) "
            "over the last 24 h, across pods.",
            Units.GRAMS,
            [
                query(
                    "topk(10, sum by (model) "
                    f"(increase(llm_energy_model_emissions_grams_total{{{_MODEL}}}[24h])))",
                    "{{model}}",
                    instant=True,
                )
            ],
        ),
        bargauge_panel(
            "Idle share per job",
            "Share of each job's GPU energy over the time range spent on the idle baseline. "
            "Jobs near the top are candidates for fewer replicas, scale to zero or "
            "consolidating models (LLMIdleEnergyShareHigh).",
            Units.RATIO,
            [
                query(
                    "sort_desc(sum by (namespace, job) "
                    f"(increase(llm_energy_joules_total{{{_NS}, {IDLE_PHASES}}}[{_RANGE}]))\n/\n"
                    "(sum by (namespace, job) "
                    f"(increase(llm_energy_joules_total{{{_NS}}}[{_RANGE}])) > 0))",
                    "{{namespace}}/{{job}}",
                    instant=True,
                )
            ],
            thresholds=IDLE_THRESHOLDS,
            max_value=1,
        ),
    ]


def fleet_dashboard() -> Dashboard:
    """The fleet dashboard (uid ``llm-energy-fleet``)."""
    return dashboard(
        UID,
        "LLM energy: fleet",
        "Energy, emissions and budgets of every llm-energy-sidecar deployment, per namespace, "
        "job and model, and the largest emitters.",
        ["namespace", "model"],
        [
            ("Fleet totals", _totals_row()),
            ("Budgets", _budget_row()),
            ("Models", _models_row()),
            ("Tenants", _tenants_row()),
            ("Top emitters", _top_row()),
        ],
    )
