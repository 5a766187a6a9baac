"""A report's inputs from a ``--record`` directory: ``power.csv``, ``requests.csv``, ``run.json``.

The totals, the request count and the per-request energies are ``attribute``'s
own output on the same rows (the contract: a report of a recording attributes it
with the same ledger as ``attribute``). The time series are a second pass of the
same ledger, set up the same way, read after every sample, so its bins sum to
those totals; the tests check that they do.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.attribute import attribute, book_trace
from sidecar.carbon.emissions import (
    DEFAULT_HOST_EMBODIED_KG,
    DEFAULT_LIFETIME_YEARS,
    EmbodiedModel,
    gpu_embodied_default,
)
from sidecar.ledger import PHASES, Ledger, Phase
from sidecar.report.inputs import (
    Embodied,
    Gpu,
    IntensityChange,
    ModelTotals,
    ReportError,
    ReportInputs,
    RequestEnergy,
    bin_edges,
    binned,
)
from sidecar.report.runinfo import RUN_FILE, RunInfoError, read_run_info
from sidecar.trace import PowerRow, RequestRow, TraceError, read_power, read_requests

POWER_BINS = 1000
"""Bins of the power figure: fine enough to show request bursts, at least 1 s each."""


def from_trace(
    directory: Path,
    *,
    from_s: float | None,
    to_s: float | None,
    carbon_intensity_g_per_kwh: float | None,
    pue: float | None,
) -> ReportInputs:
    """Read and attribute one recording, clipped to ``[from_s, to_s]`` where given."""
    if not directory.is_dir():
        raise ReportError(f"--trace: {directory} is not a directory")
    try:
        power = read_power(directory / "power.csv")
        requests = _read_requests(directory / "requests.csv")
    except TraceError as e:
        raise ReportError(str(e)) from None
    runs: list[dict[str, Any]] = []
    if (directory / RUN_FILE).exists():
        try:
            runs = read_run_info(directory / RUN_FILE)
        except RunInfoError as e:
            raise ReportError(str(e)) from None
    power, requests, notes = _clip(power, requests, from_s, to_s)
    if not requests:
        notes.append("no request finished in the period: all its energy is idle standby.")
    result = attribute(power, requests)
    start_s = min(r.time_s for r in power)
    end_s = max(r.time_s for r in power)
    times, cumulative = _cumulative_phases(power, requests)
    edges = bin_edges(start_s, end_s)
    fine = bin_edges(start_s, end_s, max_bins=POWER_BINS, min_width_s=0.5)
    fine_j = binned(times, cumulative, fine)
    fine_total = [sum(fine_j[p][i] for p in PHASES) for i in range(len(fine) - 1)]
    widths = [b - a for a, b in itertools.pairwise(fine)]
    notes.append(f"power minimum and maximum are of {widths[0]:g}-second means.")
    per_request = {r["id"]: r for r in result["requests"]}
    baseline = float(result["idle_baseline_watts"])
    phase_j: dict[Phase, float] = {p: float(result["energy_joules"][p]) for p in PHASES}
    run = _run_in(runs, start_s, end_s)
    pues = {
        float(r["pue"]) for r in runs if "pue" in r and start_s <= float(r["started_s"]) <= end_s
    }
    if pue is None and len(pues) > 1:
        notes.append(
            f"the PUE changed between starts in the period ({min(pues):g} to {max(pues):g}); "
            "the latest is applied throughout"
        )
    return ReportInputs(
        source=f"trace {directory}",
        from_s=start_s,
        to_s=end_s,
        gpus=_gpus(power, runs),
        phase_j=phase_j,
        requests=len(requests),
        prompt_tokens=sum(r.prompt_tokens or 0 for r in requests),
        completion_tokens=sum(r.completion_tokens or 0 for r in requests),
        by_model=_by_model(requests, per_request),
        idle_baseline_w=baseline,
        bin_edges_s=edges,
        bin_phase_j=binned(times, cumulative, edges),
        power_times_s=[(a + b) / 2 for a, b in itertools.pairwise(fine)],
        power_w=[j / w if w > 0 else 0.0 for j, w in zip(fine_total, widths, strict=True)],
        baseline_times_s=[start_s, end_s],
        baseline_w=[baseline, baseline],
        request_energy=RequestEnergy(
            values_j=tuple(float(r["energy_joules"]) for r in result["requests"])
        ),
        intensity=_intensity(runs, start_s, carbon_intensity_g_per_kwh),
        pue=pue if pue is not None else float(run.get("pue", 1.0)) if run else 1.0,
        pue_stated_by="--pue"
        if pue is not None
        else "run.json"
        if run and "pue" in run
        else "not recorded: 1.0 assumed",
        embodied=_embodied(run, len({r.gpu for r in power})),
        notes=notes,
    )


def _read_requests(path: Path) -> list[RequestRow]:
    """The requests file; a header alone is an idle recording (all standby), not an error."""
    try:
        with path.open(encoding="utf-8") as handle:
            lines = [line for line, _ in zip(handle, range(2), strict=False) if line.strip()]
    except OSError:
        lines = []  # read_requests names the file and the reason
    if len(lines) == 1:
        return []
    return read_requests(path)


def _clip(
    power: Sequence[PowerRow],
    requests: Sequence[RequestRow],
    from_s: float | None,
    to_s: float | None,
) -> tuple[list[PowerRow], list[RequestRow], list[str]]:
    """The rows inside the window; requests across its edges are cut at them."""
    lo = -float("inf") if from_s is None else from_s
    hi = float("inf") if to_s is None else to_s
    if lo >= hi:
        raise ReportError("--from: it is not before --to")
    kept = [r for r in power if lo <= r.time_s <= hi]
    if len(kept) < 2:
        raise ReportError(
            "--from/--to: fewer than two power samples in the period "
            f"(the recording covers {min(r.time_s for r in power):.3f} to "
            f"{max(r.time_s for r in power):.3f} Unix seconds)"
        )
    notes: list[str] = []
    out: list[RequestRow] = []
    cut = 0
    for r in requests:
        if r.end_s < lo or r.start_s > hi:
            continue
        if r.start_s < lo or r.end_s > hi:
            cut += 1
            start, end = max(r.start_s, lo), min(r.end_s, hi)
            first = r.first_token_s if r.first_token_s is not None else None
            if first is not None and not start <= first <= end:
                first = None
            r = RequestRow(
                r.id,
                r.model,
                start,
                end,
                first,
                r.prompt_tokens,
                r.completion_tokens,
                r.status,
                r.cached_tokens,
            )
        out.append(r)
    if cut:
        notes.append(
            f"{cut} request(s) ran across the edges of the period: their time is cut at the "
            "edges and their tokens are counted in full."
        )
    return kept, out, notes


def _cumulative_phases(
    power: Sequence[PowerRow], requests: Sequence[RequestRow]
) -> tuple[list[float], dict[Phase, list[float]]]:
    """Energy by phase booked up to each sample time: ``attribute``'s ledger, read as it goes."""
    times: list[float] = []
    cumulative: dict[Phase, list[float]] = {p: [] for p in PHASES}

    def read(time_s: float, ledger: Ledger) -> None:
        times.append(time_s)
        for p in PHASES:
            cumulative[p].append(ledger.phase_j[p])

    ledger = book_trace(power, requests, after_sample=read).ledger
    times.append(times[-1])
    for p in PHASES:  # what the flush assigned belongs to the very end
        cumulative[p].append(ledger.phase_j[p])
    return times, cumulative


def _by_model(
    requests: Sequence[RequestRow], per_request: dict[str, dict[str, Any]]
) -> dict[str, ModelTotals]:
    out: dict[str, ModelTotals] = {}
    staged = all("prefill_joules" in r for r in per_request.values())
    for r in requests:
        m = out.setdefault(r.model, ModelTotals())
        a = per_request[r.id]
        m.requests += 1
        m.prompt_tokens += r.prompt_tokens or 0
        m.completion_tokens += r.completion_tokens or 0
        m.dynamic_j += float(a["dynamic_joules"])
        m.idle_serving_j += float(a["idle_joules"])
        if not staged:
            continue
        prefill = float(a["prefill_joules"])
        decode = float(a["decode_joules"]) if "decode_joules" in a else a["energy_joules"] - prefill
        m.prefill_j = (m.prefill_j or 0.0) + prefill
        m.decode_j = (m.decode_j or 0.0) + decode
        if r.prompt_tokens is not None:
            m.staged_prompt_tokens += r.prompt_tokens
            m.staged_prefill_j += prefill
        if r.completion_tokens is not None:
            m.staged_completion_tokens += r.completion_tokens
            m.staged_decode_j += decode
    return out


def _gpus(power: Sequence[PowerRow], runs: list[dict[str, Any]]) -> list[Gpu]:
    known: dict[str, Gpu] = {}
    for run in runs:
        for g in run.get("gpus", []):
            if isinstance(g, dict) and "index" in g:
                known[str(g["index"])] = Gpu(str(g["index"]), g.get("uuid"), g.get("name"))
    seen = list(dict.fromkeys(r.gpu for r in power))
    by_uuid = {g.uuid: g for g in known.values() if g.uuid}
    return [known.get(g) or by_uuid.get(g) or Gpu(g, None, None) for g in seen]


def _run_in(runs: list[dict[str, Any]], start_s: float, end_s: float) -> dict[str, Any] | None:
    """The latest start at or before the period's end (its settings were in force then)."""
    before = [r for r in runs if float(r["started_s"]) <= end_s]
    return before[-1] if before else (runs[0] if runs else None)


def _intensity(
    runs: list[dict[str, Any]], start_s: float, fixed_g_per_kwh: float | None
) -> list[IntensityChange]:
    if fixed_g_per_kwh is not None:
        return [IntensityChange(start_s, fixed_g_per_kwh, "fixed (report --carbon-intensity)")]
    changes = sorted(
        (
            IntensityChange(
                float(e["time_s"]),
                float(e["grams_per_kwh"]),
                str(e.get("source", "unknown")),
                e.get("region"),
            )
            for run in runs
            for e in run.get("intensity", [])
        ),
        key=lambda c: c.time_s,
    )
    earlier = [c for c in changes if c.time_s <= start_s]
    return ([earlier[-1]] if earlier else []) + [c for c in changes if c.time_s > start_s]


def _embodied(run: dict[str, Any] | None, gpus: int) -> Embodied:
    e = run.get("embodied") if run else None
    if isinstance(e, dict) and isinstance(e.get("grams_per_second"), int | float):
        return Embodied(
            grams_per_second=float(e["grams_per_second"]),
            gpus=int(e.get("gpus", gpus)),
            gpu_embodied_kg=float(e.get("gpu_embodied_kg", 0.0)),
            gpu_embodied_source=str(e.get("gpu_embodied_source", "run.json")),
            host_embodied_kg=float(e.get("host_embodied_kg", 0.0)),
            host_share=float(e.get("host_share", 0.0)),
            lifetime_years=float(e.get("lifetime_years", DEFAULT_LIFETIME_YEARS)),
            stated_by="run.json",
        )
    model = EmbodiedModel.for_gpus("", gpus)
    return Embodied(
        grams_per_second=model.grams_per_second,
        gpus=gpus,
        gpu_embodied_kg=model.gpu_embodied_kg,
        gpu_embodied_source=gpu_embodied_default("").source,
        host_embodied_kg=DEFAULT_HOST_EMBODIED_KG,
        host_share=model.host_share,
        lifetime_years=model.lifetime_years,
        stated_by="defaults: no run.json, GPU model unknown",
    )
