"""The report's PNG figures (matplotlib, the optional extra ``report``) and ``report.md``.

matplotlib is imported only here and only when a report is drawn, so the
sidecar itself never needs it. Figures are drawn on ``matplotlib.figure.Figure``
objects, not pyplot: no global state, no GUI backend, nothing left open.
"""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sidecar.ledger import PHASES
from sidecar.report.inputs import ReportInputs

if TYPE_CHECKING:
    from matplotlib.axes import Axes

INSTALL_HINT: Final = "report needs matplotlib: pip install 'llm-energy-sidecar[report]'"
PHASE_COLOURS: Final = {"dynamic": "#c2410c", "idle_serving": "#f59e0b", "idle_standby": "#94a3b8"}
PHASE_LABELS: Final = {
    "dynamic": "dynamic",
    "idle_serving": "idle serving",
    "idle_standby": "idle standby",
}
FIGURE_FILES: Final = {
    "power": "power.png",
    "phases": "energy_by_phase.png",
    "requests": "request_energy.png",
    "stages": "stage_per_token.png",
}
CAPTIONS: Final = {
    "power": "GPU power over time, summed over the metered GPUs, with the idle baseline and the mean "
    "power over the period (as in the BLOOM deployment study's power figure).",
    "phases": "Energy by phase over time, joules per time bin: dynamic (above the idle baseline "
    "while requests are in flight), idle serving (up to the baseline while requests are in "
    "flight) and idle standby (no request in flight).",
    "requests": "Distribution of attributed energy per finished request (dynamic + idle serving).",
    "stages": "Prefill joules per prompt token and decode joules per output token, by model.",
}


class MatplotlibMissing(RuntimeError):
    """The extra ``report`` is not installed."""


def _figure(width_in: float = 9.0, height_in: float = 4.2) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(INSTALL_HINT) from None
    return Figure(figsize=(width_in, height_in), dpi=110, layout="constrained")


def require_matplotlib() -> None:
    """Fail before reading anything when the figures cannot be drawn."""
    _figure()


def _time_axis(inp: ReportInputs) -> tuple[float, str]:
    """(seconds per unit, label) so the x axis reads in minutes or hours since the start."""
    from sidecar.report.runinfo import rfc3339

    unit_s, unit = (60.0, "minutes") if inp.seconds <= 3 * 3600 else (3600.0, "hours")
    if inp.seconds <= 180:
        unit_s, unit = 1.0, "seconds"
    return unit_s, f"{unit} since {rfc3339(inp.from_s)}"


def _style(ax: Axes) -> None:
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _finish_over_time(
    fig: Any, ax: Axes, inp: ReportInputs, x: tuple[float, str], ylabel: str, path: Path
) -> None:
    """The figures over time end alike, so they line up side by side in report.md: the
    period's whole span on x (``x`` is :func:`_time_axis`'s), the legend below, saved."""
    unit_s, xlabel = x
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, max(inp.seconds / unit_s, 1e-9))
    _style(ax)
    fig.legend(loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    fig.savefig(path)


def draw_power(inp: ReportInputs, path: Path, mean_w: float | None) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    unit_s, xlabel = _time_axis(inp)
    x = [(t - inp.from_s) / unit_s for t in inp.power_times_s]
    ax.plot(x, inp.power_w, color=PHASE_COLOURS["dynamic"], linewidth=1.2, label="GPU power")
    if inp.baseline_w:
        bx = [(t - inp.from_s) / unit_s for t in inp.baseline_times_s]
        last = inp.baseline_w[-1]
        ax.plot(
            bx,
            inp.baseline_w,
            color="#2563eb",
            linestyle="--",
            linewidth=1.5,
            label=f"idle baseline ({last:,.0f} W)",
        )
    if mean_w is not None:
        ax.axhline(
            mean_w, color="#111827", linestyle=":", linewidth=1.5, label=f"mean ({mean_w:,.0f} W)"
        )
    names = sorted({g.name or "GPU" for g in inp.gpus})
    ax.set_title(f"GPU power: {len(inp.gpus)} GPU(s), {', '.join(names)}", fontsize=11)
    ax.set_ylim(bottom=0)
    _finish_over_time(fig, ax, inp, (unit_s, xlabel), "power (W)", path)


def draw_phases(inp: ReportInputs, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    unit_s, xlabel = _time_axis(inp)
    edges = inp.bin_edges_s
    left = [(a - inp.from_s) / unit_s for a in edges[:-1]]
    width = [(b - a) / unit_s for a, b in itertools.pairwise(edges)]
    bottom = [0.0] * len(left)
    for p in PHASES:
        values = inp.bin_phase_j[p]
        ax.bar(
            left,
            values,
            width=width,
            bottom=bottom,
            align="edge",
            color=PHASE_COLOURS[p],
            label=f"{PHASE_LABELS[p]}: {inp.phase_j[p]:,.0f} J",
        )
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    bin_s = edges[1] - edges[0] if len(edges) > 1 else 0.0
    ax.set_title(f"Energy by phase per {bin_s:g}-second bin", fontsize=11)
    _finish_over_time(fig, ax, inp, (unit_s, xlabel), "energy per bin (J)", path)


def draw_requests(inp: ReportInputs, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    values = [v for v in inp.request_energy.values_j if v >= 0]
    if values:
        lo, hi = min(values), max(values)
        if lo > 0 and hi / lo > 100:
            n = 30
            bins: Any = [lo * (hi / lo) ** (i / n) for i in range(n + 1)]
            ax.set_xscale("log")
        else:
            bins = 30
        ax.hist(values, bins=bins, color=PHASE_COLOURS["dynamic"], edgecolor="white")
        median = statistics.median(values)
        mean = statistics.fmean(values)
        ax.axvline(median, color="#111827", linestyle="--", label=f"median {median:,.1f} J")
        ax.axvline(mean, color="#2563eb", linestyle=":", label=f"mean {mean:,.1f} J")
        ax.legend(fontsize=9, frameon=False)
        ax.set_ylabel("requests")
        ax.set_title(f"Attributed energy per request ({len(values)} requests)", fontsize=11)
    elif not any(c for _, c in inp.request_energy.buckets):
        ax.text(
            0.5,
            0.5,
            "no finished requests in the period",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="#5b6574",
        )
        ax.set_title("Attributed energy per request (0 requests)", fontsize=11)
    else:
        buckets = inp.request_energy.buckets
        used = [i for i, (_, c) in enumerate(buckets) if c > 0]
        buckets = buckets[: min(len(buckets), (used[-1] + 2) if used else 1)]
        labels = [_bucket_label(buckets, i) for i in range(len(buckets))]
        counts = [c for _, c in buckets]
        ax.bar(range(len(counts)), counts, color=PHASE_COLOURS["dynamic"])
        ax.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("requests")
        ax.set_title(
            f"Attributed energy per request, histogram buckets ({sum(counts):,.0f} requests)",
            fontsize=11,
        )
    ax.set_xlabel("attributed energy per request (J)")
    _style(ax)
    fig.savefig(path)


def _bucket_label(buckets: tuple[tuple[float, float], ...], i: int) -> str:
    upper = buckets[i][0]
    lower = buckets[i - 1][0] if i else 0.0
    if math.isinf(upper):
        return f"> {lower:g}"
    return f"{lower:g}–{upper:g}"


def draw_stages(doc: dict[str, Any], path: Path) -> bool:
    """Grouped bars by model; ``False`` (nothing drawn) when no model has a stage split."""
    rows = [
        (name, m["prefill_joules_per_prompt_token"], m["decode_joules_per_output_token"])
        for name, m in doc["by_model"].items()
        if m["prefill_joules_per_prompt_token"] is not None
        or m["decode_joules_per_output_token"] is not None
    ]
    if not rows:
        return False
    fig = _figure(9.0, 3.6 + 0.1 * len(rows))
    ax = fig.add_subplot()
    xs = range(len(rows))
    prefill = [r[1] or 0.0 for r in rows]
    decode = [r[2] or 0.0 for r in rows]
    for offset, values, colour, label in (
        (-0.2, prefill, "#7c3aed", "prefill J per prompt token"),
        (0.2, decode, "#0d9488", "decode J per output token"),
    ):
        bars = ax.bar([x + offset for x in xs], values, width=0.4, color=colour, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)  # prefill is often too small to read off
    ax.set_xticks(list(xs), [r[0] for r in rows])
    ax.set_ylabel("joules per token")
    ax.set_title("Prefill and decode energy per token, by model", fontsize=11)
    _style(ax)
    fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.savefig(path)
    return True
