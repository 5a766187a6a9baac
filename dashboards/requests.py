"""Requests dashboard: energy distribution of requests, traffic and energy per model."""

from __future__ import annotations

from typing import Final

from grafana_foundation_sdk.builders.dashboard import Dashboard

from dashboards.common import (
    PanelBuilder,
    Units,
    bargauge_panel,
    dashboard,
    heatmap_panel,
    piechart_panel,
    query,
    sel,
    timeseries_panel,
)

__all__ = ["UID", "requests_dashboard"]

UID: Final = "llm-energy-requests"

_MODEL: Final = sel('model=~"$model"', pod=True)
_INFERENCE_MODEL: Final = sel('model=~"$model"', 'endpoint!="other"', pod=True)
_RI: Final = "$__rate_interval"
_RANGE: Final = "$__range"


def _quantile(q: float) -> str:
    return (
        f"histogram_quantile({q}, sum by (le) "
        f"(rate(llm_energy_request_joules_bucket{{{_MODEL}}}[{_RI}])))"
    )


def _energy_row() -> list[PanelBuilder]:
    return [
        heatmap_panel(
            "Request energy distribution",
            "How many requests finished with each attributed energy (dynamic + idle_serving "
            "share, in joules), per time bucket, from the llm_energy_request_joules histogram "
            "(buckets 1 J to 100 kJ). Darker cells hold more requests.",
            Units.JOULE,
            [
                query(
                    f"sum by (le) (increase(llm_energy_request_joules_bucket{{{_MODEL}}}[{_RI}]))",
                    "{{le}}",
                    heatmap_format=True,
                )
            ],
        ),
        timeseries_panel(
            "Request energy quantiles",
            "Attributed energy of one request: median (p50), p90 and p99, estimated from the "
            "histogram buckets (so only as precise as the buckets), and the exact mean.",
            Units.JOULE,
            [
                query(_quantile(0.5), "p50", ref_id="A"),
                query(_quantile(0.9), "p90", ref_id="B"),
                query(_quantile(0.99), "p99", ref_id="C"),
                query(
                    f"sum(rate(llm_energy_request_joules_sum{{{_MODEL}}}[{_RI}]))\n/\n"
                    f"(sum(rate(llm_energy_request_joules_count{{{_MODEL}}}[{_RI}])) > 0)",
                    "mean",
                    ref_id="D",
                ),
            ],
            height=9,
        ),
    ]


def _traffic_row() -> list[PanelBuilder]:
    return [
        timeseries_panel(
            "Tokens per second",
            "Prompt tokens read and completion tokens generated per second, by model, from the "
            "usage the model server reports (estimated from the request body when it reports "
            "none).",
            Units.TOKENS_PER_S,
            [
                query(
                    f"sum by (model, kind) (rate(llm_energy_tokens_total{{{_MODEL}}}[{_RI}]))",
                    "{{model}} {{kind}}",
                )
            ],
            width=6,
        ),
        timeseries_panel(
            "In-flight requests",
            "Inference requests between arrival and the last byte of their response, by model. "
            "While it is zero all GPU power counts as idle_standby.",
            Units.COUNT,
            [
                query(
                    f"sum by (model) (llm_energy_inflight_requests{{{_MODEL}}})",
                    "{{model}}",
                )
            ],
            width=6,
        ),
        timeseries_panel(
            "Requests per second by status",
            "Finished inference requests per second, stacked by outcome: ok, error (the server "
            "or the proxy failed) or cancelled (the client went away). All of them used energy.",
            Units.REQUESTS_PER_S,
            [
                query(
                    "sum by (status) "
                    f"(rate(llm_energy_requests_total{{{_INFERENCE_MODEL}}}[{_RI}]))",
                    "{{status}}",
                )
            ],
            stacked=True,
            fill_opacity=40,
            width=6,
        ),
        piechart_panel(
            "Status mix",
            "Share of the inference requests finished over the time range by status (ok, "
            "error, cancelled).",
            Units.COUNT,
            [
                query(
                    "sum by (status) "
                    f"(increase(llm_energy_requests_total{{{_INFERENCE_MODEL}}}[{_RANGE}]))",
                    "{{status}}",
                    instant=True,
                )
            ],
        ),
    ]


def _model_row() -> list[PanelBuilder]:
    return [
        timeseries_panel(
            "Attributed power by model",
            "Energy per second (watts) attributed to each model's requests (dynamic + "
            "idle_serving), stacked. The gap to the GPU power is idle standby, which belongs "
            "to no model.",
            Units.WATT,
            [
                query(
                    f"sum by (model) (rate(llm_energy_model_joules_total{{{_MODEL}}}[{_RI}]))",
                    "{{model}}",
                )
            ],
            stacked=True,
            fill_opacity=40,
        ),
        bargauge_panel(
            "Attributed energy by model",
            "Joules attributed to each model's requests over the time range "
            "(llm_energy_model_joules_total, dynamic + idle_serving).",
            Units.JOULE,
            [
                query(
                    "sum by (model) "
                    f"(increase(llm_energy_model_joules_total{{{_MODEL}}}[{_RANGE}]))",
                    "{{model}}",
                    instant=True,
                )
            ],
            width=4,
        ),
        bargauge_panel(
            "Energy per request by model",
            "Mean attributed energy of one finished request of each model over the time range.",
            Units.JOULE,
            [
                query(
                    "sum by (model) "
                    f"(increase(llm_energy_request_joules_sum{{{_MODEL}}}[{_RANGE}]))\n/\n"
                    "(sum by (model) "
                    f"(increase(llm_energy_request_joules_count{{{_MODEL}}}[{_RANGE}])) > 0)",
                    "{{model}}",
                    instant=True,
                )
            ],
            width=4,
        ),
        bargauge_panel(
            "Attributed emissions by model",
            "Grams CO2e of the energy attributed to each model over the time range "
            "(operational only: energy x grid intensity x PUE).",
            Units.GRAMS,
            [
                query(
                    "sum by (model) "
                    f"(increase(llm_energy_model_emissions_grams_total{{{_MODEL}}}[{_RANGE}]))",
                    "{{model}}",
                    instant=True,
                )
            ],
            width=4,
        ),
    ]


def requests_dashboard() -> Dashboard:
    """The requests dashboard (uid ``llm-energy-requests``)."""
    return dashboard(
        UID,
        "LLM energy: requests",
        "Energy of individual inference requests, traffic, and energy per model, as "
        "attributed by llm-energy-sidecar.",
        ["namespace", "pod", "model"],
        [
            ("Energy per request", _energy_row()),
            ("Traffic", _traffic_row()),
            ("Per model", _model_row()),
        ],
    )
