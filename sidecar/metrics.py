"""Prometheus exposition: one custom collector over state the meter already holds.

``collect()`` runs on the event loop at every scrape, so it only reads
cached numbers and builds fresh families (client_python's custom-collector
pattern); it never touches NVML and never walks the requests in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from sidecar import __version__
from sidecar.ledger import PHASES
from sidecar.meter import Meter
from sidecar.sampler import SamplerStats


@dataclass(frozen=True, slots=True)
class BuildInfo:
    power_source: str
    mode: str


class SidecarCollector(Collector):
    """Every metric of the contract, from the meter and the sampler's stats."""

    def __init__(
        self,
        meter: Meter,
        stats: Callable[[], SamplerStats],
        build: BuildInfo,
    ) -> None:
        self._meter = meter
        self._stats = stats
        self._build = build

    def collect(self) -> Iterator[Metric]:
        m = self._meter
        stats = self._stats()

        power = GaugeMetricFamily(
            "llm_energy_gpu_power_watts",
            "Latest power reading of each metered GPU.",
            labels=["gpu", "uuid"],
        )
        energy = CounterMetricFamily(
            "llm_energy_gpu_energy_joules",
            "Energy measured on each GPU since the sidecar started, reconciled with the hardware counter.",
            labels=["gpu", "uuid"],
        )
        for g in m.gpus:
            if g.gpu in stats.last_power_w:
                power.add_metric([g.gpu, g.uuid], stats.last_power_w[g.gpu])
            energy.add_metric([g.gpu, g.uuid], m.ledger.gpu_energy_j(g.gpu))
        yield power
        yield energy
        gpu_info = GaugeMetricFamily(
            "llm_energy_gpu_info",
            "Each metered GPU (always 1): its product name and whether it is in MIG mode.",
            labels=["gpu", "uuid", "name", "mig"],
        )
        for g in m.gpus:
            gpu_info.add_metric([g.gpu, g.uuid, g.name, "true" if g.mig else "false"], 1)
        yield gpu_info

        phases = CounterMetricFamily(
            "llm_energy_joules",
            "Measured GPU energy by phase: dynamic and idle_serving while requests are in flight, idle_standby otherwise.",
            labels=["phase"],
        )
        for p in PHASES:
            phases.add_metric([p], m.ledger.phase_j[p])
        yield phases
        yield GaugeMetricFamily(
            "llm_energy_prefill_token_weight",
            "Energy of a prompt token relative to an output token, fitted from the GPU (weighs dynamic shares).",
            value=m.ledger.prefill_fit.ratio,
        )
        yield GaugeMetricFamily(
            "llm_energy_idle_baseline_watts",
            "Idle (memory-resident) power baseline, total over the metered GPUs.",
            value=m.ledger.idle_baseline_w(),
        )
        basis = GaugeMetricFamily(
            "llm_energy_idle_baseline_info",
            "The rule behind the idle baseline in force (always 1): configured, standby, held "
            "or startup; the weakest where GPUs differ.",
            labels=["basis"],
        )
        basis.add_metric([m.ledger.idle_basis()], 1)
        yield basis
        yield CounterMetricFamily(
            "llm_energy_unattributed_joules",
            "Energy of requests in flight that no finished request carries (traces mode: "
            "requests never heard from; a silent GPU's late share of requests already final).",
            value=m.ledger.unattributed_j,
        )

        inflight = GaugeMetricFamily(
            "llm_energy_inflight_requests", "Inference requests in flight.", labels=["model"]
        )
        now = m.in_flight()
        for model in sorted(set(now) | {k[0] for k in m.requests}):
            inflight.add_metric([model], now.get(model, 0))
        yield inflight

        requests = CounterMetricFamily(
            "llm_energy_requests",
            "Requests seen by the proxy, by model, endpoint and status.",
            labels=["model", "endpoint", "status"],
        )
        for (model, endpoint, status), n in sorted(m.requests.items()):
            requests.add_metric([model, endpoint, status], n)
        yield requests

        hist = HistogramMetricFamily(
            "llm_energy_request_joules",
            "Attributed energy (dynamic + idle_serving) per finished inference request.",
            labels=["model"],
        )
        for model, h in sorted(m.request_j.items()):
            hist.add_metric([model], h.cumulative(), sum_value=h.total)
        yield hist

        model_j = CounterMetricFamily(
            "llm_energy_model_joules", "Attributed energy per model.", labels=["model", "phase"]
        )
        for (model, phase), j in sorted(m.ledger.model_j.items()):
            model_j.add_metric([model, phase], j)
        yield model_j
        stage_j = CounterMetricFamily(
            "llm_energy_model_stage_joules",
            "Attributed energy of finished requests by stage: prefill (to the first token), decode.",
            labels=["model", "stage"],
        )
        for (model, stage), j in sorted(m.stage_j.items()):
            stage_j.add_metric([model, stage], j)
        yield stage_j
        if m.tenants:
            tenant_j = CounterMetricFamily(
                "llm_energy_tenant_joules",
                "Attributed energy of finished requests per tenant (showback).",
                labels=["tenant"],
            )
            tenant_g = CounterMetricFamily(
                "llm_energy_tenant_emissions_grams",
                "Operational grams CO2e of each tenant's attributed energy.",
                labels=["tenant"],
            )
            for tenant, j in sorted(m.tenant_j.items()):
                tenant_j.add_metric([tenant], j)
                tenant_g.add_metric([tenant], m.tenant_g.get(tenant, 0.0))
            yield tenant_j
            yield tenant_g
        model_g = CounterMetricFamily(
            "llm_energy_model_emissions_grams",
            "Operational grams CO2e of each model's attributed energy.",
            labels=["model"],
        )
        for model, grams in sorted(m.model_g.items()):
            model_g.add_metric([model], grams)
        yield model_g

        tokens = CounterMetricFamily(
            "llm_energy_tokens", "Tokens processed, by model and kind.", labels=["model", "kind"]
        )
        for (model, kind), n in sorted(m.tokens.items()):
            tokens.add_metric([model, kind], n)
        yield tokens

        emissions = CounterMetricFamily(
            "llm_energy_emissions_grams",
            "Grams CO2e: operational (energy x intensity x PUE) and embodied (amortised manufacturing).",
            labels=["scope"],
        )
        for scope in ("operational", "embodied"):
            emissions.add_metric([scope], m.emissions_g[scope])
        yield emissions

        ci = m.intensity
        intensity = GaugeMetricFamily(
            "llm_energy_carbon_intensity_grams_per_kwh",
            "Grid carbon intensity in force, with its region and source.",
            labels=["region", "source"],
        )
        intensity.add_metric([ci.region, ci.source], ci.g_per_kwh)
        yield intensity
        yield GaugeMetricFamily(
            "llm_energy_pue", "Power usage effectiveness applied to emissions.", value=m.pue
        )
        if m.budget_g_per_day is not None:
            yield GaugeMetricFamily(
                "llm_energy_emissions_budget_grams_per_day",
                "Emissions budget (operational + embodied) per rolling 24 h, shared by a job's replicas.",
                value=m.budget_g_per_day,
            )

        samples = CounterMetricFamily(
            "llm_energy_sampler_samples", "Power samples read, per GPU.", labels=["gpu"]
        )
        for gpu, n in sorted(stats.samples.items()):
            samples.add_metric([gpu], n)
        yield samples
        gaps = CounterMetricFamily(
            "llm_energy_sampler_gap_seconds",
            "Time not covered by samples: silences longer than three sample periods, counted "
            "whole when the next reading ends them (the validity gate for that GPU's figures).",
            labels=["gpu"],
        )
        for g in m.gpus:
            gaps.add_metric([g.gpu], m.ledger.gap_s(g.gpu))
        yield gaps
        errors = CounterMetricFamily(
            "llm_energy_sampler_errors",
            "Failed power reads, per GPU and reason.",
            labels=["gpu", "reason"],
        )
        for (gpu, reason), n in sorted(stats.errors.items()):
            errors.add_metric([gpu, reason], n)
        yield errors
        if stats.mean_interval_s is not None:
            yield GaugeMetricFamily(
                "llm_energy_sampler_interval_seconds",
                "Measured interval between power reads (moving mean of about 20 reads).",
                value=stats.mean_interval_s,
            )
        yield CounterMetricFamily(
            "llm_energy_tracking_errors",
            "Faults inside request tracking or attribution; the user's traffic was passed on regardless.",
            value=m.tracking_errors,
        )
        info = GaugeMetricFamily(
            "llm_energy_build_info",
            "Build and mode of this sidecar (always 1).",
            labels=["version", "power_source", "mode"],
        )
        info.add_metric([__version__, self._build.power_source, self._build.mode], 1)
        yield info


class HealthCollector(Collector):
    """The sidecar's own faults outside the power path: observer scrapes, carbon refreshes.

    ``observer_errors`` and ``carbon_errors`` return the counts their owners
    keep (by reason, by provider); both may return an empty mapping.
    """

    def __init__(
        self,
        *,
        observer_errors: Callable[[], Mapping[str, int]],
        carbon_errors: Callable[[], Mapping[str, int]],
    ) -> None:
        self._observer_errors = observer_errors
        self._carbon_errors = carbon_errors

    def collect(self) -> Iterator[Metric]:
        scrape = CounterMetricFamily(
            "llm_energy_observer_scrape_errors",
            "Failed scrapes of the model server's metrics (observer mode), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self._observer_errors().items()):
            scrape.add_metric([reason], n)
        yield scrape
        carbon = CounterMetricFamily(
            "llm_energy_carbon_refresh_errors",
            "Failed refreshes of the live carbon intensity, by provider (the last good or static value stays in force).",
            labels=["provider"],
        )
        for provider, n in sorted(self._carbon_errors().items()):
            carbon.add_metric([provider], n)
        yield carbon


def make_registry(collector: Collector, *extra: Collector) -> CollectorRegistry:
    """A private registry: no process-wide state, one per sidecar (and per test).

    It carries prometheus_client's process collector (``process_*``: CPU, resident
    memory, open files of the sidecar itself), so the sidecar's own cost is watched.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    for more in extra:
        registry.register(more)
    ProcessCollector(registry=registry)
    return registry
