"""The contract's ``report.json`` from :class:`ReportInputs`: every derived figure, once.

Definitions are CONTRACT.md's "Derived figures": attributed energy is
``dynamic + idle_serving``; all-in figures divide the total (standby included);
SCI adds embodied grams to operational ones. A figure whose inputs are missing
is ``null``, never a guess.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from sidecar import __version__
from sidecar.carbon.emissions import JOULES_PER_KWH
from sidecar.ledger import PHASES
from sidecar.report.inputs import IntensityChange, ModelTotals, ReportInputs
from sidecar.report.runinfo import rfc3339

OUTSIDE: Final = (
    "CPU, memory, storage, network, cooling and the rest of the host, unless measured "
    "separately: only the GPUs listed are metered (PUE scales emissions for the data centre, "
    "not the measured joules)"
)
METHOD_URL: Final = "README.md#how-energy-is-split"
ATTRIBUTION: Final = "llm-energy-sidecar/v1"


def ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None or y <= 0:
        return None
    return x / y


def intensity_at(changes: list[IntensityChange], t: float) -> IntensityChange | None:
    """The change in force at ``t``; before the first one, the first one."""
    current = changes[0] if changes else None
    for c in changes:
        if c.time_s > t:
            break
        current = c
    return current


def operational(inp: ReportInputs) -> tuple[float | None, float | None, str | None]:
    """(grams, energy-weighted g/kWh, source): each bin's energy at the intensity in force."""
    sources = list(dict.fromkeys(c.source for c in inp.intensity))
    source = " + ".join(sources) if sources else None
    if inp.operational_g is not None:
        kwh = inp.total_j / JOULES_PER_KWH
        return inp.operational_g, ratio(inp.operational_g, kwh * inp.pue), source
    if not inp.intensity:
        return None, None, None
    grams = 0.0
    edges = inp.bin_edges_s
    for i in range(len(edges) - 1):
        energy_j = sum(inp.bin_phase_j[p][i] for p in PHASES)
        change = intensity_at(inp.intensity, (edges[i] + edges[i + 1]) / 2)
        assert change is not None
        grams += energy_j / JOULES_PER_KWH * change.grams_per_kwh * inp.pue
    # The bins hold the period's energy: scale to the whole total (which may include joules
    # booked before the first sample) at the same mean intensity.
    binned = sum(sum(inp.bin_phase_j[p]) for p in PHASES)
    if binned > 0:
        grams *= inp.total_j / binned
    kwh = inp.total_j / JOULES_PER_KWH
    weighted = ratio(grams, kwh * inp.pue)
    if weighted is None:
        weighted = inp.intensity[-1].grams_per_kwh
    return grams, weighted, source


def _stages(models: list[ModelTotals]) -> tuple[float | None, float | None]:
    if not models or any(m.prefill_j is None for m in models):
        return None, None
    return sum(m.prefill_j or 0.0 for m in models), sum(m.decode_j or 0.0 for m in models)


def _model_json(m: ModelTotals, g_per_j: float | None) -> dict[str, Any]:
    attributed = m.dynamic_j + m.idle_serving_j
    staged = m.prefill_j is not None
    return {
        "requests": m.requests,
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "energy_joules": {
            "attributed": attributed,
            "dynamic": m.dynamic_j,
            "idle_serving": m.idle_serving_j,
            "prefill": m.prefill_j,
            "decode": m.decode_j,
        },
        "joules_per_request_attributed": ratio(attributed, m.requests),
        "joules_per_output_token": ratio(attributed, m.completion_tokens),
        "prefill_joules_per_prompt_token": ratio(m.staged_prefill_j, m.staged_prompt_tokens)
        if staged
        else None,
        "decode_joules_per_output_token": ratio(m.staged_decode_j, m.staged_completion_tokens)
        if staged
        else None,
        "emissions_grams_operational": None if g_per_j is None else attributed * g_per_j,
    }


def report_json(inp: ReportInputs, figures: list[str]) -> dict[str, Any]:
    """The document ``report.json`` holds (keys: CONTRACT.md, "`report` output")."""
    total = inp.total_j
    attributed = inp.phase_j["dynamic"] + inp.phase_j["idle_serving"]
    models = list(inp.by_model.values())
    prefill, decode = _stages(models)
    staged_prompt = sum(m.staged_prompt_tokens for m in models)
    staged_completion = sum(m.staged_completion_tokens for m in models)
    op_g, g_per_kwh, source = operational(inp)
    if inp.embodied_g is not None:
        emb_g: float | None = inp.embodied_g
    elif inp.embodied is not None:
        emb_g = inp.embodied.grams_per_second * inp.seconds
    else:
        emb_g = None
    sci_g = None if op_g is None or emb_g is None else op_g + emb_g
    g_per_j = None if g_per_kwh is None else g_per_kwh * inp.pue / JOULES_PER_KWH
    names = Counter(g.name or "unknown" for g in inp.gpus)
    return {
        "period": {
            "from": rfc3339(inp.from_s),
            "to": rfc3339(inp.to_s),
            "seconds": inp.seconds,
        },
        "source": inp.source,
        "boundary": {
            "gpus": [{"index": g.index, "uuid": g.uuid, "name": g.name} for g in inp.gpus],
            "gpu_count": len(inp.gpus),
            "gpu_names": dict(names),
            "inside": "the GPUs listed, measured by the sidecar's power source",
            "outside": OUTSIDE,
        },
        "requests": inp.requests,
        "prompt_tokens": inp.prompt_tokens,
        "completion_tokens": inp.completion_tokens,
        "energy_joules": {
            "total": total,
            "dynamic": inp.phase_j["dynamic"],
            "idle_serving": inp.phase_j["idle_serving"],
            "idle_standby": inp.phase_j["idle_standby"],
            "prefill": prefill,
            "decode": decode,
        },
        "idle_baseline_watts": inp.idle_baseline_w,
        "idle_share": ratio(inp.phase_j["idle_serving"] + inp.phase_j["idle_standby"], total),
        "joules_per_request_attributed": ratio(attributed, inp.requests),
        "joules_per_request_all_in": ratio(total, inp.requests),
        "joules_per_output_token": ratio(attributed, inp.completion_tokens),
        "prefill_joules_per_prompt_token": None
        if prefill is None
        else ratio(sum(m.staged_prefill_j for m in models), staged_prompt),
        "decode_joules_per_output_token": None
        if decode is None
        else ratio(sum(m.staged_decode_j for m in models), staged_completion),
        "joules_per_output_token_all_in": ratio(total, inp.completion_tokens),
        "carbon_intensity": {
            "grams_per_kwh": g_per_kwh,
            "source": source,
            "region": " + ".join(dict.fromkeys(c.region for c in inp.intensity if c.region))
            or None,
        },
        "pue": inp.pue,
        "pue_source": inp.pue_stated_by,
        "emissions_grams": {"operational": op_g, "embodied": emb_g},
        "embodied_assumptions": None
        if inp.embodied is None
        else {
            "gpus": inp.embodied.gpus,
            "gpu_embodied_kg": inp.embodied.gpu_embodied_kg,
            "gpu_embodied_source": inp.embodied.gpu_embodied_source,
            "host_embodied_kg": inp.embodied.host_embodied_kg,
            "host_share": inp.embodied.host_share,
            "lifetime_years": inp.embodied.lifetime_years,
            "grams_per_second": inp.embodied.grams_per_second,
            "stated_by": inp.embodied.stated_by,
        },
        "sci_grams_per_request": ratio(sci_g, inp.requests),
        "sci_grams_per_1k_output_tokens": None
        if sci_g is None or inp.completion_tokens <= 0
        else sci_g * 1000 / inp.completion_tokens,
        "by_model": {name: _model_json(m, g_per_j) for name, m in sorted(inp.by_model.items())},
        "power_watts": {
            "mean": ratio(total - inp.energy_before_period_j, inp.seconds),
            "min": min(inp.power_w) if inp.power_w else None,
            "max": max(inp.power_w) if inp.power_w else None,
        },
        "method": METHOD_URL,
        "attribution": ATTRIBUTION,
        "version": __version__,
        "notes": list(inp.notes),
        "figures": figures,
    }
