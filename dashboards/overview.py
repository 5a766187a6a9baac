"""Overview dashboard: power, energy by phase, efficiency and emissions of selected sidecars."""

from __future__ import annotations

from typing import Final

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.models.common import BigValueTextMode

from dashboards.common import (
    BUDGET_THRESHOLDS,
    IDLE_PHASES,
    IDLE_THRESHOLDS,
    PanelBuilder,
    Units,
    bargauge_panel,
    dashboard,
    query,
    sel,
    stat_panel,
    timeseries_panel,
)

__all__ = ["UID", "overview_dashboard"]

UID: Final = "llm-energy-overview"

_POD: Final = sel(pod=True)
_MODEL: Final = sel('model=~"$model"', pod=True)
_GPU: Final = sel('gpu=~"$gpu"', pod=True)
_INFERENCE: Final = sel('endpoint!="other"', pod=True)
_COMPLETION: Final = sel('kind="completion"', pod=True)
_COMPLETION_MODEL: Final = sel('model=~"$model"', 'kind="completion"', pod=True)


def _sum(fn: str, metric: str, selector: str, window: str, by: str = "") -> str:
    """``sum [by (..)] (fn(metric{selector}[window]))``."""
    group = f" by ({by}) " if by else ""
    return f"sum{group}({fn}({metric}{{{selector}}}[{window}]))"


def _ratio(numerator: str, denominator: str, scale: str = "") -> str:
    """``[scale *] numerator / (denominator > 0)``: no value rather than +Inf on zero."""
    prefix = f"{scale} * " if scale else ""
    return f"{prefix}{numerator}\n/\n({denominator} > 0)"


def _now_row() -> list[PanelBuilder]:
    rng = "$__range"
    return [
        stat_panel(
            "GPU power now",
            "Power drawn right now by the selected GPUs, summed over GPUs and pods, as last "
            "sampled by the sidecars (NVML, DCGM or the simulated GPU).",
            Units.WATT,
            [query(f"sum(llm_energy_gpu_power_watts{{{_GPU}}})", "power", instant=True)],
        ),
        stat_panel(
            "Idle share",
            "Share of the measured GPU energy over the dashboard's time range that went to the "
            "idle baseline: idle_serving (baseline while requests are in flight) plus "
            "idle_standby (the whole draw while none is). The BLOOM API deployment spent about "
            "75 % this way. Ignores the model filter: idle standby belongs to no model.",
            Units.RATIO,
            [
                query(
                    _ratio(
                        _sum("increase", "llm_energy_joules_total", f"{_POD}, {IDLE_PHASES}", rng),
                        _sum("increase", "llm_energy_joules_total", _POD, rng),
                    ),
                    "idle share",
                    instant=True,
                )
            ],
            thresholds=IDLE_THRESHOLDS,
        ),
        stat_panel(
            "Energy per request (all-in)",
            "All GPU energy over the time range (idle standby included) divided by the "
            "inference requests finished in it (chat, completion, embedding, generate; any "
            "status). The BLOOM study's 3.96 Wh (14.3 kJ) per request is this figure.",
            Units.JOULE,
            [
                query(
                    _ratio(
                        _sum("increase", "llm_energy_joules_total", _POD, rng),
                        _sum("increase", "llm_energy_requests_total", _INFERENCE, rng),
                    ),
                    "all-in",
                    instant=True,
                )
            ],
        ),
        stat_panel(
            "Energy per request (attributed)",
            "Mean energy attributed to one finished request of the selected models: its "
            "dynamic share plus its share of the idle baseline while it was in flight. "
            "Excludes idle standby, so it is what a request itself costs.",
            Units.JOULE,
            [
                query(
                    _ratio(
                        _sum("increase", "llm_energy_request_joules_sum", _MODEL, rng),
                        _sum("increase", "llm_energy_request_joules_count", _MODEL, rng),
                    ),
                    "attributed",
                    instant=True,
                )
            ],
        ),
        stat_panel(
            "Energy per 1k output tokens (all-in)",
            "All GPU energy over the time range divided by the completion tokens generated in "
            "it, times 1,000 (the SCI-for-AI functional unit is the token).",
            Units.JOULE,
            [
                query(
                    _ratio(
                        _sum("increase", "llm_energy_joules_total", _POD, rng),
                        _sum("increase", "llm_energy_tokens_total", _COMPLETION, rng),
                        scale="1000",
                    ),
                    "all-in",
                    instant=True,
                )
            ],
        ),
        stat_panel(
            "gCO2e per request (all-in)",
            "Grams of CO2-equivalent per finished inference request over the time range: "
            "operational (energy x grid intensity x PUE) plus embodied (hardware manufacturing "
            "amortised over its life), i.e. the SCI per request. BLOOM's API: 1.56 g.",
            Units.GRAMS,
            [
                query(
                    _ratio(
                        _sum("increase", "llm_energy_emissions_grams_total", _POD, rng),
                        _sum("increase", "llm_energy_requests_total", _INFERENCE, rng),
                    ),
                    "all-in",
                    instant=True,
                )
            ],
        ),
    ]


def _power_row() -> list[PanelBuilder]:
    return [
        timeseries_panel(
            "GPU power and idle baseline",
            "Solid: power drawn by the selected GPUs of each pod. Dashed: the pod's idle "
            "baseline (the memory-resident draw with no work, estimated or --idle-watts; total "
            "over all of the pod's GPUs, whatever the GPU filter). Dotted: mean power over the "
            "time range. Power near the baseline means the GPUs hold a model and wait.",
            Units.WATT,
            [
                query(
                    f"sum by (namespace, pod) (llm_energy_gpu_power_watts{{{_GPU}}})",
                    "{{pod}} power",
                    ref_id="A",
                ),
                query(
                    f"sum by (namespace, pod) (llm_energy_idle_baseline_watts{{{_POD}}})",
                    "{{pod}} idle baseline",
                    ref_id="B",
                ),
                query(
                    "sum by (namespace, pod) "
                    f"(avg_over_time(llm_energy_gpu_power_watts{{{_GPU}}}[$__range] @ end()))",
                    "{{pod}} mean over the range",
                    ref_id="C",
                ),
            ],
            dashed_refs=["B"],
            dotted_refs=["C"],
            height=9,
        ),
        timeseries_panel(
            "Energy by phase",
            "Measured GPU energy per second (so in watts), split by phase and stacked: the area "
            "is energy. dynamic = power above the idle baseline while requests are in flight; "
            "idle_serving = the baseline while requests are in flight; idle_standby = all power "
            "while none is (the cost of keeping the model loaded and ready).",
            Units.WATT,
            [
                query(
                    f"sum by (phase) (rate(llm_energy_joules_total{{{_POD}}}[$__rate_interval]))",
                    "{{phase}}",
                )
            ],
            stacked=True,
            fill_opacity=60,
            height=9,
        ),
    ]


def _efficiency_row() -> list[PanelBuilder]:
    ri = "$__rate_interval"
    return [
        timeseries_panel(
            "Energy per request",
            "all-in: all GPU energy (idle standby included) per finished inference request. "
            "attributed: mean energy of a request of the selected models (its dynamic and "
            "idle_serving shares). The gap between them is the standby cost per request.",
            Units.JOULE,
            [
                query(
                    _ratio(
                        _sum("rate", "llm_energy_joules_total", _POD, ri),
                        _sum("rate", "llm_energy_requests_total", _INFERENCE, ri),
                    ),
                    "all-in",
                    ref_id="A",
                ),
                query(
                    _ratio(
                        _sum("rate", "llm_energy_request_joules_sum", _MODEL, ri),
                        _sum("rate", "llm_energy_request_joules_count", _MODEL, ri),
                    ),
                    "attributed",
                    ref_id="B",
                ),
            ],
            width=6,
        ),
        timeseries_panel(
            "Energy per 1k output tokens",
            "Joules per 1,000 completion tokens. all-in: all GPU energy of the selected pods. "
            "attributed: energy attributed to the selected models (dynamic + idle_serving).",
            Units.JOULE,
            [
                query(
                    _ratio(
                        _sum("rate", "llm_energy_joules_total", _POD, ri),
                        _sum("rate", "llm_energy_tokens_total", _COMPLETION, ri),
                        scale="1000",
                    ),
                    "all-in",
                    ref_id="A",
                ),
                query(
                    _ratio(
                        _sum("rate", "llm_energy_model_joules_total", _MODEL, ri),
                        _sum("rate", "llm_energy_tokens_total", _COMPLETION_MODEL, ri),
                        scale="1000",
                    ),
                    "attributed",
                    ref_id="B",
                ),
            ],
            width=6,
        ),
        timeseries_panel(
            "gCO2e per request",
            "Grams of CO2e per finished inference request, stacked by scope: operational "
            "(all energy x grid intensity x PUE) and embodied (manufacturing share). The top "
            "of the stack is the SCI per request.",
            Units.GRAMS,
            [
                query(
                    _sum("rate", "llm_energy_emissions_grams_total", _POD, ri, by="scope")
                    + "\n/ ignoring (scope) group_left ()\n"
                    + f"({_sum('rate', 'llm_energy_requests_total', _INFERENCE, ri)} > 0)",
                    "{{scope}}",
                )
            ],
            stacked=True,
            fill_opacity=40,
            width=6,
        ),
        timeseries_panel(
            "Idle share",
            "idle share: (idle_serving + idle_standby) / all energy. standby share: "
            "idle_standby / all energy, the part no request used at all. High and flat means "
            "the replicas mostly wait: scale down or consolidate models.",
            Units.RATIO,
            [
                query(
                    _ratio(
                        _sum("rate", "llm_energy_joules_total", f"{_POD}, {IDLE_PHASES}", ri),
                        _sum("rate", "llm_energy_joules_total", _POD, ri),
                    ),
                    "idle share",
                    ref_id="A",
                ),
                query(
                    _ratio(
                        _sum(
                            "rate",
                            "llm_energy_joules_total",
                            f'{_POD}, phase="idle_standby"',
                            ri,
                        ),
                        _sum("rate", "llm_energy_joules_total", _POD, ri),
                    ),
                    "standby share",
                    ref_id="B",
                ),
            ],
            max_value=1,
            thresholds=IDLE_THRESHOLDS,
            width=6,
        ),
    ]


def _carbon_row() -> list[PanelBuilder]:
    ns = sel()
    emitted = f"sum by (namespace, job) (increase(llm_energy_emissions_grams_total{{{ns}}}[24h]))"
    budget = f"max by (namespace, job) (llm_energy_emissions_budget_grams_per_day{{{ns}}})"
    return [
        timeseries_panel(
            "Emissions in the last 24 h against the budget",
            "Solid: grams CO2e (operational + embodied) emitted over the preceding 24 h by all "
            "replicas of each job in the selected namespaces (the pod filter does not apply: a "
            "budget covers a whole job). Dashed: the job's budget in grams per day (the largest "
            "--emissions-budget among its replicas). The alerts compare exactly these two.",
            Units.GRAMS,
            [
                query(emitted, "{{namespace}}/{{job}} last 24 h", ref_id="A"),
                query(budget, "{{namespace}}/{{job}} budget", ref_id="B"),
            ],
            dashed_refs=["B"],
        ),
        bargauge_panel(
            "Budget used (last 24 h)",
            "Emissions of the last 24 h as a share of each job's daily budget; 100 % means the "
            "budget is spent (LLMEmissionsBudgetExhausted). Jobs without a budget are absent.",
            Units.RATIO,
            [
                query(
                    f"{emitted}\n/ on (namespace, job)\n{budget}",
                    "{{namespace}}/{{job}}",
                    instant=True,
                )
            ],
            thresholds=BUDGET_THRESHOLDS,
            max_value=1.5,
            width=6,
        ),
        stat_panel(
            "Carbon intensity source",
            "Grid carbon intensity in use now, per region, and where it comes from: fixed "
            "(--carbon-intensity), static (built-in table), electricitymaps, watttime or uk "
            "(live), or static-fallback when the live provider failed (LLMCarbonIntensityFallback).",
            Units.GRAMS_PER_KWH,
            [
                query(
                    "max by (region, source) "
                    f"(llm_energy_carbon_intensity_grams_per_kwh{{{_POD}}})",
                    "{{region}}: {{source}}",
                    instant=True,
                )
            ],
            text_mode=BigValueTextMode.VALUE_AND_NAME,
            width=6,
            height=8,
        ),
        timeseries_panel(
            "Grid carbon intensity",
            "Grams CO2e per kWh of the grid feeding the selected pods, by region and source, as "
            "the sidecars use it to turn energy into operational emissions (before PUE).",
            Units.GRAMS_PER_KWH,
            [
                query(
                    "max by (region, source) "
                    f"(llm_energy_carbon_intensity_grams_per_kwh{{{_POD}}})",
                    "{{region}} ({{source}})",
                )
            ],
            width=24,
            height=7,
        ),
    ]


def overview_dashboard() -> Dashboard:
    """The overview dashboard (uid ``llm-energy-overview``)."""
    return dashboard(
        UID,
        "LLM energy: overview",
        "Power, energy by phase, energy and emissions per request and per token, and the "
        "emissions budget of LLM inference measured by llm-energy-sidecar.",
        ["namespace", "pod", "model", "gpu"],
        [
            ("At a glance", _now_row()),
            ("Power and energy", _power_row()),
            ("Efficiency", _efficiency_row()),
            ("Carbon", _carbon_row()),
        ],
    )
