"""CONTRACT.md's metric table as the series Prometheus stores (the histogram's three)."""

from __future__ import annotations

from typing import Final

CONTRACT_SERIES: Final = frozenset(
    {
        "llm_energy_gpu_power_watts",
        "llm_energy_gpu_energy_joules_total",
        "llm_energy_joules_total",
        "llm_energy_idle_baseline_watts",
        "llm_energy_inflight_requests",
        "llm_energy_requests_total",
        "llm_energy_request_joules_bucket",
        "llm_energy_request_joules_sum",
        "llm_energy_request_joules_count",
        "llm_energy_model_joules_total",
        "llm_energy_model_emissions_grams_total",
        "llm_energy_model_stage_joules_total",
        "llm_energy_tenant_joules_total",
        "llm_energy_tenant_emissions_grams_total",
        "llm_energy_idle_baseline_info",
        "llm_energy_unattributed_joules_total",
        "llm_energy_sampler_gap_seconds_total",
        "llm_energy_tokens_total",
        "llm_energy_emissions_grams_total",
        "llm_energy_carbon_intensity_grams_per_kwh",
        "llm_energy_pue",
        "llm_energy_emissions_budget_grams_per_day",
        "llm_energy_sampler_samples_total",
        "llm_energy_sampler_errors_total",
        "llm_energy_build_info",
    }
)
