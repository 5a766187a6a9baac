"""``report.md``: the same figures as ``report.json``, in prose and tables, with the PNGs.

Written for a model card or an ESG annex: every number says its unit and what
it counts, and the boundary, carbon inputs and method are stated so that two
reports can be compared line by line.
"""

from __future__ import annotations

from typing import Any

from sidecar.report.render import CAPTIONS, FIGURE_FILES


def _n(value: float | int | None, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        text = f"{value:,}"
    elif value != 0 and abs(value) < 0.01:
        text = f"{value:.3g}"
    else:
        text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def render_markdown(doc: dict[str, Any]) -> str:
    e = doc["energy_joules"]
    ci = doc["carbon_intensity"]
    em = doc["emissions_grams"]
    b = doc["boundary"]
    kwh = e["total"] / 3.6e6
    lines = [
        "# Environmental report: LLM inference energy and emissions",
        "",
        f"Period: **{doc['period']['from']}** to **{doc['period']['to']}** "
        f"({_n(doc['period']['seconds'], 's', 1)}). Source: `{doc['source']}`. "
        f"Attribution `{doc['attribution']}`, llm-energy-sidecar {doc['version']} "
        f"(method: the README's section [How energy is split]({doc['method']})).",
        "",
        "## Summary",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| finished inference requests | {_n(doc['requests'])} |",
        f"| prompt tokens / output tokens | {_n(doc['prompt_tokens'])} / {_n(doc['completion_tokens'])} |",
        f"| GPU energy, total | {_n(e['total'], 'J', 1)} ({_n(kwh, 'kWh', 6)}) |",
        f"| dynamic / idle serving / idle standby | {_n(e['dynamic'], 'J', 1)} / "
        f"{_n(e['idle_serving'], 'J', 1)} / {_n(e['idle_standby'], 'J', 1)} |",
        f"| prefill / decode (attributed energy by stage) | {_n(e['prefill'], 'J', 1)} / "
        f"{_n(e['decode'], 'J', 1)} |",
        f"| idle share (idle serving + standby, of total) | {_pct(doc['idle_share'])} |",
        f"| energy per request, attributed | {_n(doc['joules_per_request_attributed'], 'J')} |",
        f"| energy per request, all-in (total / requests) | {_n(doc['joules_per_request_all_in'], 'J')} |",
        f"| energy per output token, attributed | {_n(doc['joules_per_output_token'], 'J', 3)} |",
        f"| energy per output token, all-in | {_n(doc['joules_per_output_token_all_in'], 'J', 3)} |",
        f"| prefill J per prompt token | {_n(doc['prefill_joules_per_prompt_token'], 'J', 4)} |",
        f"| decode J per output token | {_n(doc['decode_joules_per_output_token'], 'J', 4)} |",
        f"| GPU power mean / min / max | {_n(doc['power_watts']['mean'], 'W', 1)} / "
        f"{_n(doc['power_watts']['min'], 'W', 1)} / {_n(doc['power_watts']['max'], 'W', 1)} |",
        f"| idle baseline (all GPUs) | {_n(doc['idle_baseline_watts'], 'W', 1)} |",
        f"| carbon intensity | {_n(ci['grams_per_kwh'], 'gCO2e/kWh', 1)} "
        f"({ci['source'] or 'none given'}{', ' + ci['region'] if ci.get('region') else ''}) |",
        f"| PUE | {_n(doc['pue'])} ({doc['pue_source']}) |",
        f"| emissions, operational / embodied | {_n(em['operational'], 'gCO2e', 3)} / "
        f"{_n(em['embodied'], 'gCO2e', 3)} |",
        f"| SCI per request | {_n(doc['sci_grams_per_request'], 'gCO2e', 4)} |",
        f"| SCI per 1,000 output tokens | {_n(doc['sci_grams_per_1k_output_tokens'], 'gCO2e', 4)} |",
        "",
        "## Boundary",
        "",
        f"Inside: {b['inside']}: {b['gpu_count']} GPU(s)"
        + (
            ": " + ", ".join(f"{count} x {name}" for name, count in b["gpu_names"].items())
            if b["gpu_names"]
            else ""
        )
        + ".",
        "",
        "| index | UUID | name |",
        "| --- | --- | --- |",
        *(f"| {g['index']} | {g['uuid'] or 'n/a'} | {g['name'] or 'n/a'} |" for g in b["gpus"]),
        "",
        f"Outside: {b['outside']}.",
        "",
        "## Carbon inputs and assumptions",
        "",
    ]
    if ci["grams_per_kwh"] is None:
        lines.append(
            "No carbon intensity was recorded or given, so operational emissions and SCI are "
            "not stated; rerun with `--carbon-intensity G`."
        )
    else:
        lines.append(
            f"Grid intensity {_n(ci['grams_per_kwh'], 'gCO2e/kWh', 1)} from `{ci['source']}` "
            "(energy-weighted over the period where it changed); operational grams = kWh x "
            f"intensity x PUE {_n(doc['pue'])}."
        )
    a = doc["embodied_assumptions"]
    if a is None:
        lines += [
            "",
            f"Embodied emissions (SCI's M): {_n(em['embodied'], 'gCO2e', 3)} as the sidecar "
            'booked them (`llm_energy_emissions_grams_total{scope="embodied"}`), from its '
            "`--gpu-embodied-kg`, `--host-embodied-kg` and `--lifetime-years` (defaults by GPU "
            "model, amortised over wall-clock reservation); the inputs themselves are not "
            "exported.",
        ]
    else:
        lines += [
            "",
            f"Embodied emissions (SCI's M, {a['stated_by']}): {a['gpus']} GPU(s) at "
            f"{_n(a['gpu_embodied_kg'], 'kg', 0)} CO2e each ({a['gpu_embodied_source']}), "
            f"plus {_n(a['host_share'], '', 3)} of a host at {_n(a['host_embodied_kg'], 'kg', 0)}, "
            f"amortised over {_n(a['lifetime_years'], 'years', 1)} of wall-clock reservation: "
            f"{_n(a['grams_per_second'], 'g/s', 5)}.",
        ]
    lines += [
        "",
        "## Method",
        "",
        "Power is measured per GPU and integrated linearly between samples. At every instant it "
        "is split against the idle baseline: *dynamic* (above the baseline while requests are in "
        "flight, shared by the work each request does), *idle serving* (up to the baseline while "
        "requests are in flight, shared equally) and *idle standby* (no request in flight: the "
        "cost of keeping the model loaded, which belongs to no request). A request's attributed "
        "energy is its dynamic plus idle-serving share; all-in figures divide the total, standby "
        "included. Prefill is a request's energy before its first token, decode after it. "
        f"Details: [{doc['method']}]({doc['method']}).",
        "",
        "## Figures",
        "",
    ]
    for key, name in FIGURE_FILES.items():
        if name in doc["figures"]:
            lines += [f"![{CAPTIONS[key]}]({name})", "", f"*{CAPTIONS[key]}*", ""]
    if FIGURE_FILES["stages"] not in doc["figures"]:
        lines += [
            "No per-token stage figure: the source has no prefill/decode split for any model.",
            "",
        ]
    lines += [
        "## By model (attributed energy)",
        "",
        "| model | requests | output tokens | attributed J | J/request | J/output token | "
        "prefill J/prompt token | decode J/output token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in doc["by_model"].items():
        lines.append(
            f"| {name} | {_n(m['requests'])} | {_n(m['completion_tokens'])} | "
            f"{_n(m['energy_joules']['attributed'], '', 1)} | "
            f"{_n(m['joules_per_request_attributed'])} | {_n(m['joules_per_output_token'], '', 3)} | "
            f"{_n(m['prefill_joules_per_prompt_token'], '', 4)} | "
            f"{_n(m['decode_joules_per_output_token'], '', 4)} |"
        )
    if doc["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in doc["notes"])]
    return "\n".join(lines) + "\n"
