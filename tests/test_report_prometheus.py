"""``report --prometheus``: a real Prometheus scraped a loaded sidecar; the report reads it back.

Debian's ``prometheus`` scrapes the sidecar (simulated GPU, stand-in upstream) every second
while 40 chat completions pass through it (tests/promstack.py). The report's counts must be
exactly what was sent, and its joules and grams exactly what the counters booked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from procs import free_port
from promstack import JOB, NAMESPACE, ScrapedRun, scraped_sidecar

from sidecar.cli import main
from sidecar.ledger import PHASES
from sidecar.report.runinfo import rfc3339

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

INTENSITY_G_PER_KWH = 394.0
PUE = 1.1
SELECTOR = f'{{job="{JOB}",namespace="{NAMESPACE}"}}'


def run_cli(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ScrapedRun]:
    """One Prometheus and one loaded sidecar for every test of this module."""
    directory: Path = tmp_path_factory.mktemp("report-prometheus")
    async with scraped_sidecar(
        directory, "--carbon-intensity", str(INTENSITY_G_PER_KWH), "--pue", str(PUE)
    ) as scraped:
        yield scraped


async def _report(run: ScrapedRun, out: Path, *extra: str) -> int:
    return await asyncio.to_thread(
        run_cli,
        "report",
        "--prometheus",
        run.prometheus.url,
        "--from",
        rfc3339(run.first_scrape_s - 120.0),
        "--to",
        rfc3339(run.last_scrape_s),
        "--out",
        str(out),
        *extra,
    )


async def test_counts_and_joules_are_what_was_booked(run: ScrapedRun, tmp_path: Path) -> None:
    """Requests and tokens equal what was sent; joules and grams equal the counters at --to."""
    out = tmp_path / "out"
    assert await _report(run, out, "--selector", SELECTOR) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["requests"] == run.load.requests
    assert doc["completion_tokens"] == run.load.completion_tokens
    assert {m: v["requests"] for m, v in doc["by_model"].items()} == dict(run.load.by_model)
    prom, t = run.prometheus, run.last_scrape_s
    for phase in PHASES:
        booked = await prom.value(f'sum(llm_energy_joules_total{{phase="{phase}"}})', t)
        assert doc["energy_joules"][phase] == pytest.approx(booked, rel=1e-9)
    assert doc["energy_joules"]["total"] == pytest.approx(
        await prom.value("sum(llm_energy_joules_total)", t), rel=1e-9
    )
    assert doc["prompt_tokens"] == await prom.value(
        'sum(llm_energy_tokens_total{kind="prompt"})', t
    )
    operational = await prom.value('sum(llm_energy_emissions_grams_total{scope="operational"})', t)
    assert doc["emissions_grams"]["operational"] == pytest.approx(operational, rel=1e-9)
    assert doc["carbon_intensity"]["grams_per_kwh"] == pytest.approx(INTENSITY_G_PER_KWH, rel=0.01)
    assert doc["carbon_intensity"]["source"] == "fixed"
    assert doc["pue"] == pytest.approx(PUE)
    assert doc["boundary"]["gpu_count"] == 1
    power = doc["power_watts"]
    assert 0 < power["min"] <= power["mean"] <= power["max"]
    for name in doc["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"power.png", "energy_by_phase.png", "request_energy.png"} <= set(doc["figures"])


async def test_stage_figures_come_from_the_stage_counter(run: ScrapedRun, tmp_path: Path) -> None:
    """Prefill + decode equal the attributed joules the stage counter booked, by model."""
    out = tmp_path / "out"
    assert await _report(run, out) == 0
    doc = json.loads((out / "report.json").read_text())
    rows = await run.prometheus.query(
        "sum by (model, stage) (llm_energy_model_stage_joules_total)", run.last_scrape_s
    )
    if not rows:
        assert doc["energy_joules"]["prefill"] is None
        return
    booked = {(r["metric"]["model"], r["metric"]["stage"]): float(r["value"][1]) for r in rows}
    for model, figures in doc["by_model"].items():
        assert figures["energy_joules"]["prefill"] == pytest.approx(booked[(model, "prefill")])
        assert figures["energy_joules"]["decode"] == pytest.approx(booked[(model, "decode")])
    assert doc["prefill_joules_per_prompt_token"] is not None


async def test_a_selector_that_matches_nothing_fails_cleanly(
    run: ScrapedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No series for the selector: exit 2, one line naming the series, nothing written."""
    out = tmp_path / "out"
    assert await _report(run, out, "--selector", '{job="not-this-one"}') == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no llm_energy_joules_total" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--selector", 'job="x"'], "--selector"),
        (["--selector", '{job=~"("}'], "--prometheus"),
    ],
)
async def test_bad_selectors_fail_cleanly(
    run: ScrapedRun,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    needle: str,
) -> None:
    """A selector that is not one, or that Prometheus rejects: exit 2, one line, nothing written."""
    out = tmp_path / "out"
    assert await _report(run, out, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert not out.exists()


async def test_unreachable_prometheus_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening at --prometheus: exit 2 with one line; nothing written."""
    out = tmp_path / "out"
    code = await asyncio.to_thread(
        run_cli, "report", "--prometheus", f"http://127.0.0.1:{free_port()}", "--out", str(out)
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cannot connect" in err
    assert not out.exists()
