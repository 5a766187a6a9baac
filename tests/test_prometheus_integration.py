"""A real Prometheus scrapes a loaded sidecar: the contract's sums hold in what it stored.

Debian's ``prometheus`` runs on 127.0.0.1 and scrapes the sidecar (simulated GPU, stand-in
upstream) every second while 40 chat completions, half of them streamed, pass through it.
Every assertion reads Prometheus' HTTP API, so it checks what dashboards and alert rules see.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from promstack import ScrapedRun, sample_value, scraped_sidecar

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

INTENSITY_G_PER_KWH = 394.0
PUE = 1.1
SAMPLE_HZ = 10.0
JOULES_PER_KWH = 3.6e6


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ScrapedRun]:
    """One Prometheus and one loaded sidecar shared by every test of this module."""
    directory: Path = tmp_path_factory.mktemp("prometheus-integration")
    async with scraped_sidecar(
        directory,
        "--carbon-intensity",
        str(INTENSITY_G_PER_KWH),
        "--pue",
        str(PUE),
        "--sample-hz",
        str(SAMPLE_HZ),
    ) as scraped:
        yield scraped


async def _at(run: ScrapedRun, expr: str, at_s: float) -> float:
    return await run.prometheus.value(expr, at_s)


class TestPrometheusScrape:
    async def test_phases_sum_to_gpu_energy(self, run: ScrapedRun) -> None:
        """Summed over phases, llm_energy_joules_total equals the GPUs' energy at every scrape."""
        prom = run.prometheus
        phases = await prom.query("llm_energy_joules_total", run.last_scrape_s)
        assert {row["metric"]["phase"] for row in phases} == {
            "dynamic",
            "idle_serving",
            "idle_standby",
        }
        assert all(sample_value(row) > 0 for row in phases), phases
        phase_j = await _at(run, "sum(llm_energy_joules_total)", run.last_scrape_s)
        gpu_j = await _at(run, "sum(llm_energy_gpu_energy_joules_total)", run.last_scrape_s)
        power_w = await _at(run, "sum(llm_energy_gpu_power_watts)", run.last_scrape_s)
        # Up to the one interval still open: at most a sample period at the current power.
        assert gpu_j > 0
        assert phase_j == pytest.approx(gpu_j, abs=2 * power_w / SAMPLE_HZ + 1e-6)
        # The same holds at every scrape during the load (both series come from one scrape).
        series = await prom.query_range(
            "sum(llm_energy_gpu_energy_joules_total) - sum(llm_energy_joules_total)",
            run.first_scrape_s,
            run.last_scrape_s,
            1.0,
        )
        assert len(series) == 1
        gaps = [float(v) for _, v in series[0]["values"]]
        assert len(gaps) >= 5
        peak_w = await _at(
            run,
            f"max_over_time(sum(llm_energy_gpu_power_watts)[{run.last_scrape_s - run.first_scrape_s + 1:.0f}s:1s])",
            run.last_scrape_s,
        )
        assert max(abs(g) for g in gaps) <= 2 * peak_w / SAMPLE_HZ, gaps

    async def test_operational_grams_match_joules_intensity_and_pue(self, run: ScrapedRun) -> None:
        """Operational grams equal joules x 394 g/kWh x PUE 1.1 / 3.6e6 within 2 %."""
        t = run.last_scrape_s
        assert await _at(run, "llm_energy_pue", t) == pytest.approx(PUE)
        intensity = await run.prometheus.query("llm_energy_carbon_intensity_grams_per_kwh", t)
        assert len(intensity) == 1
        assert intensity[0]["metric"]["source"] == "fixed"
        assert sample_value(intensity[0]) == pytest.approx(INTENSITY_G_PER_KWH)

        joules = await _at(run, "sum(llm_energy_joules_total)", t)
        grams = await _at(run, 'sum(llm_energy_emissions_grams_total{scope="operational"})', t)
        expected = joules * INTENSITY_G_PER_KWH * PUE / JOULES_PER_KWH
        assert grams == pytest.approx(expected, rel=0.02)
        # The per-model counter converts the attributed joules the same way.
        model_j = await _at(run, "sum(llm_energy_model_joules_total)", t)
        model_g = await _at(run, "sum(llm_energy_model_emissions_grams_total)", t)
        assert model_j > 0
        assert model_g == pytest.approx(
            model_j * INTENSITY_G_PER_KWH * PUE / JOULES_PER_KWH, rel=0.02
        )
        # And the same over a window, as a dashboard computes it from increase().
        window = f"{run.last_scrape_s - run.first_scrape_s:.0f}s"
        ratio = await _at(
            run,
            f'sum(increase(llm_energy_emissions_grams_total{{scope="operational"}}[{window}]))'
            f" / sum(increase(llm_energy_joules_total[{window}]))",
            t,
        )
        assert ratio == pytest.approx(INTENSITY_G_PER_KWH * PUE / JOULES_PER_KWH, rel=0.02)

    async def test_embodied_grams_grow_between_scrapes(self, run: ScrapedRun) -> None:
        """Embodied grams accrue with time: a later scrape holds more than an earlier one."""
        expr = 'sum(llm_energy_emissions_grams_total{scope="embodied"})'
        before = await _at(run, expr, run.first_scrape_s)
        after = await _at(run, expr, run.last_scrape_s)
        assert 0 < before < after
        rate = await _at(
            run,
            'sum(rate(llm_energy_emissions_grams_total{scope="embodied"}[5s]))',
            run.last_scrape_s,
        )
        assert rate > 0

    async def test_token_and_request_counters_move(self, run: ScrapedRun) -> None:
        """Request, token and histogram counters rise between scrapes to exactly what was sent."""
        prom, load = run.prometheus, run.load
        requests = "sum(llm_energy_requests_total)"
        completion = 'sum(llm_energy_tokens_total{kind="completion"})'
        prompt = 'sum(llm_energy_tokens_total{kind="prompt"})'
        finished = "sum(llm_energy_request_joules_count)"
        for expr in (requests, completion, finished):
            before_rows = await prom.query(expr, run.first_scrape_s)
            before = sample_value(before_rows[0]) if before_rows else 0.0
            after = await _at(run, expr, run.last_scrape_s)
            assert before < after, expr
        assert await _at(run, requests, run.last_scrape_s) == load.requests
        assert await _at(run, completion, run.last_scrape_s) == load.completion_tokens
        assert await _at(run, finished, run.last_scrape_s) == load.requests
        assert await _at(run, prompt, run.last_scrape_s) > 0

        rows = await prom.query(
            "sum by (model, endpoint, status) (llm_energy_requests_total)", run.last_scrape_s
        )
        counted = {
            (r["metric"]["model"], r["metric"]["endpoint"], r["metric"]["status"]): sample_value(r)
            for r in rows
        }
        assert counted == {(model, "chat", "ok"): n for model, n in load.by_model.items()}
        inflight = await _at(run, "sum(llm_energy_inflight_requests)", run.last_scrape_s)
        assert inflight == 0
