"""A report's inputs from a Prometheus that scraped the sidecar: the counters it booked.

Totals are counter increases computed here from the raw stored samples (a
range selector read at ``--to``), not with PromQL's ``increase()``, which
extrapolates to the window's edges: a series that starts inside the window
counts from zero (the sidecar started then, as ``/summary``'s ``since_start``
does), one that runs across ``--from`` counts from its value there, and a
reset (a restart) counts what came after it. The same samples give the
energy-by-phase bins. Power and the baseline are range queries.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any, Final

from sidecar.ledger import PHASES, Phase
from sidecar.report.inputs import (
    Gpu,
    IntensityChange,
    ModelTotals,
    ReportError,
    ReportInputs,
    RequestEnergy,
    bin_edges,
    binned,
)

DEFAULT_SPAN_S: Final = 86400.0
"""Without ``--from``: the last 24 hours before ``--to``."""
TIMEOUT_S: Final = 60.0
MAX_POINTS: Final = 1000

Labels = tuple[tuple[str, str], ...]
Series = tuple[dict[str, str], list[tuple[float, float]]]


class PrometheusClient:
    """The few calls of Prometheus' HTTP API a report needs; errors become ReportError."""

    def __init__(self, url: str, selector: str | None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ReportError(f"--prometheus: {url!r} is not an http(s) URL")
        self._url = url.rstrip("/")
        self._matchers = _selector_matchers(selector)

    def selector(self, metric: str, *extra: str) -> str:
        matchers = [m for m in (self._matchers, *extra) if m]
        return f"{metric}{{{','.join(matchers)}}}" if matchers else metric

    def api(self, path: str, params: dict[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"{self._url}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            if not body:
                raise ReportError(f"--prometheus: {self._url}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ReportError(f"--prometheus: {self._url}: cannot connect: {reason}") from None
        try:
            doc = json.loads(body)
        except ValueError:
            raise ReportError(f"--prometheus: {self._url}: the answer is not JSON") from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            error = doc.get("error") if isinstance(doc, dict) else None
            raise ReportError(f"--prometheus: {params.get('query', path)}: {error or 'failed'}")
        return doc["data"]

    def raw(self, metric: str, from_s: float, to_s: float, *extra: str) -> list[Series]:
        """Every stored sample of ``metric`` in ``(from_s, to_s]``, per series."""
        span_ms = max(1, round((to_s - from_s) * 1000))
        data = self.api(
            "query",
            {"query": f"{self.selector(metric, *extra)}[{span_ms}ms]", "time": f"{to_s:.3f}"},
        )
        return [
            (dict(s["metric"]), [(float(t), float(v)) for t, v in s["values"]])
            for s in data["result"]
        ]

    def instant(self, expr: str, at_s: float) -> list[tuple[dict[str, str], float]]:
        data = self.api("query", {"query": expr, "time": f"{at_s:.3f}"})
        if data["resultType"] != "vector":
            return []
        return [(dict(s["metric"]), float(s["value"][1])) for s in data["result"]]

    def range(self, expr: str, from_s: float, to_s: float, step_s: float) -> list[Series]:
        data = self.api(
            "query_range",
            {
                "query": expr,
                "start": f"{from_s:.3f}",
                "end": f"{to_s:.3f}",
                "step": f"{max(1, round(step_s * 1000))}ms",
            },
        )
        return [
            (dict(s["metric"]), [(float(t), float(v)) for t, v in s["values"]])
            for s in data["result"]
        ]


def _selector_matchers(selector: str | None) -> str:
    if selector is None:
        return ""
    text = selector.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise ReportError(
            f'--selector: {selector!r} is not a series selector such as {{job="vllm"}}'
        )
    return text[1:-1].strip().rstrip(",")


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))


class Counters:
    """Increases of one counter's series over the window, with resets and births handled."""

    def __init__(
        self, client: PrometheusClient, metric: str, from_s: float, to_s: float, *extra: str
    ) -> None:
        self.series = client.raw(metric, from_s, to_s, *extra)
        before = {
            _key(labels): v for labels, v in client.instant(client.selector(metric, *extra), from_s)
        }
        self.curves: list[tuple[dict[str, str], list[tuple[float, float]]]] = []
        self.born: list[dict[str, str]] = []
        """Series with no value at the window's start: they count from zero."""
        for labels, values in self.series:
            if _key(labels) not in before:
                self.born.append(labels)
            prev = before.get(_key(labels), 0.0)
            total = 0.0
            curve = []
            for t, v in values:
                total += v - prev if v >= prev else v  # below the last value: a restart
                prev = v
                curve.append((t, total))
            self.curves.append((labels, curve))

    def total(self, **match: str) -> float:
        return sum(c[-1][1] for labels, c in self.curves if c and _matches(labels, match))

    def by(self, *names: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for labels, curve in self.curves:
            if curve:
                key = tuple(labels.get(n, "") for n in names)
                out[key] = out.get(key, 0.0) + curve[-1][1]
        return out

    def times(self) -> Iterable[float]:
        return (t for _, curve in self.curves for t, _ in curve)


def _matches(labels: dict[str, str], match: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())


def from_prometheus(
    url: str,
    *,
    selector: str | None,
    from_s: float | None,
    to_s: float | None,
    carbon_intensity_g_per_kwh: float | None,
    pue: float | None,
    now_s: float | None = None,
) -> ReportInputs:
    """Read the contract's series for the period and fill the report's inputs."""
    import time

    client = PrometheusClient(url, selector)
    end = to_s if to_s is not None else now_s if now_s is not None else time.time()
    start = from_s if from_s is not None else end - DEFAULT_SPAN_S
    phases = Counters(client, "llm_energy_joules_total", start, end)
    times = sorted(phases.times())
    if len(times) < 2:
        raise ReportError(
            f"--prometheus: no llm_energy_joules_total{'' if selector is None else ' ' + selector}"
            " samples in the period (is Prometheus scraping the sidecar?)"
        )
    data_from, data_to = times[0], times[-1]
    before_j = _booked_before_first_scrape(phases)
    requests = Counters(client, "llm_energy_requests_total", start, end, 'endpoint!="other"')
    tokens = Counters(client, "llm_energy_tokens_total", start, end)
    model_j = Counters(client, "llm_energy_model_joules_total", start, end)
    stage_j = Counters(client, "llm_energy_model_stage_joules_total", start, end)
    grams = Counters(client, "llm_energy_emissions_grams_total", start, end)
    buckets = Counters(client, "llm_energy_request_joules_bucket", start, end)

    edges = bin_edges(data_from, data_to)
    bin_phase_j = _phase_bins(phases, edges)
    step_s = max(1.0, math.ceil((data_to - data_from) / MAX_POINTS))
    power_expr = client.selector("llm_energy_gpu_power_watts")
    if step_s > 15:
        power_expr = f"avg_over_time({power_expr}[{round(step_s)}s])"
    power = _summed(client.range(f"sum({power_expr})", data_from, data_to, step_s))
    baseline = _summed(
        client.range(
            f"sum({client.selector('llm_energy_idle_baseline_watts')})", data_from, data_to, step_s
        )
    )
    intensity = _intensity(client, start, end, carbon_intensity_g_per_kwh, data_from)
    live_pue = [v for _, vs in client.raw("llm_energy_pue", start, end) for _, v in vs]
    notes = [
        f"power is sampled every {step_s:g} s from Prometheus"
        + (" (means over each step)" if step_s > 15 else "")
        + "; its minimum and maximum are of those samples."
    ]
    if before_j > 0:
        notes.append(
            f"{before_j:,.1f} J were booked between the sidecar's start and its first scrape in "
            "the period: the totals include them (as /summary's since_start does); the "
            "time bins and the mean power cover the scraped period only."
        )
    if len(set(live_pue)) > 1:
        notes.append(
            f"the PUE changed during the period ({min(live_pue)} to {max(live_pue)}); "
            "operational grams are the booked ones"
        )
    recompute = carbon_intensity_g_per_kwh is not None or pue is not None
    return ReportInputs(
        source=f"prometheus {url}" + ("" if selector is None else f" {selector}"),
        from_s=data_from,
        to_s=data_to,
        gpus=_gpus(client, start, end),
        phase_j={p: phases.total(phase=p) for p in PHASES},
        requests=round(requests.total()),
        prompt_tokens=round(tokens.total(kind="prompt")),
        completion_tokens=round(tokens.total(kind="completion")),
        by_model=_by_model(requests, tokens, model_j, stage_j),
        idle_baseline_w=(sum(v for _, v in baseline) / len(baseline)) if baseline else None,
        bin_edges_s=edges,
        bin_phase_j=bin_phase_j,
        power_times_s=[t for t, _ in power],
        power_w=[v for _, v in power],
        baseline_times_s=[t for t, _ in baseline],
        baseline_w=[v for _, v in baseline],
        request_energy=RequestEnergy(buckets=_histogram(buckets)),
        intensity=intensity,
        pue=pue if pue is not None else live_pue[-1] if live_pue else 1.0,
        pue_stated_by="--pue"
        if pue is not None
        else "llm_energy_pue"
        if live_pue
        else "not exported: 1.0 assumed",
        embodied=None,
        operational_g=None if recompute else grams.total(scope="operational"),
        embodied_g=grams.total(scope="embodied"),
        energy_before_period_j=before_j,
        notes=notes,
    )


def _booked_before_first_scrape(phases: Counters) -> float:
    """Joules a sidecar that started inside the window booked before its first scrape.

    They count in the totals (as ``/summary``'s ``since_start`` counts them), but their
    time lies before the first stored sample, so they are left out of the bins and of
    the mean power, and the report says how much they are.
    """
    born = {_key(labels) for labels in phases.born}
    return sum(c[0][1] for labels, c in phases.curves if c and _key(labels) in born)


def _phase_bins(phases: Counters, edges: list[float]) -> dict[Phase, list[float]]:
    """Each phase's increase per bin, from the first stored sample on."""
    out: dict[Phase, list[float]] = {p: [0.0] * (len(edges) - 1) for p in PHASES}
    for labels, curve in phases.curves:
        phase = labels.get("phase")
        if phase not in out or not curve:
            continue
        first_j = curve[0][1]
        times = [t for t, _ in curve]
        values = [v - first_j for _, v in curve]
        per_bin = binned(times, {"j": values}, edges)["j"]
        out[phase] = [a + b for a, b in zip(out[phase], per_bin, strict=True)]
    return out


def _summed(series: list[Series]) -> list[tuple[float, float]]:
    return series[0][1] if series else []


def _by_model(
    requests: Counters, tokens: Counters, model_j: Counters, stage_j: Counters
) -> dict[str, ModelTotals]:
    out: dict[str, ModelTotals] = {}
    for (model,), n in requests.by("model").items():
        out.setdefault(model, ModelTotals()).requests += round(n)
    for (model, kind), n in tokens.by("model", "kind").items():
        m = out.setdefault(model, ModelTotals())
        if kind == "prompt":
            m.prompt_tokens += round(n)
        elif kind == "completion":
            m.completion_tokens += round(n)
    for (model, phase), j in model_j.by("model", "phase").items():
        m = out.setdefault(model, ModelTotals())
        if phase == "dynamic":
            m.dynamic_j += j
        elif phase == "idle_serving":
            m.idle_serving_j += j
    stages = stage_j.by("model", "stage")
    for (model, stage), j in stages.items():
        m = out.setdefault(model, ModelTotals())
        if stage == "prefill":
            m.prefill_j = (m.prefill_j or 0.0) + j
        elif stage == "decode":
            m.decode_j = (m.decode_j or 0.0) + j
    for m in out.values():
        if m.prefill_j is not None or m.decode_j is not None:
            m.prefill_j, m.decode_j = m.prefill_j or 0.0, m.decode_j or 0.0
            m.staged_prefill_j, m.staged_decode_j = m.prefill_j, m.decode_j
            m.staged_prompt_tokens = m.prompt_tokens
            m.staged_completion_tokens = m.completion_tokens
    return out


def _histogram(buckets: Counters) -> tuple[tuple[float, float], ...]:
    cumulative: dict[float, float] = {}
    for (le,), n in buckets.by("le").items():
        try:
            bound = float(le)
        except ValueError:
            continue
        cumulative[bound] = cumulative.get(bound, 0.0) + n
    out: list[tuple[float, float]] = []
    below = 0.0
    for bound in sorted(cumulative):
        out.append((bound, max(0.0, cumulative[bound] - below)))
        below = cumulative[bound]
    return tuple(out)


def _intensity(
    client: PrometheusClient,
    start: float,
    end: float,
    fixed: float | None,
    data_from: float,
) -> list[IntensityChange]:
    if fixed is not None:
        return [IntensityChange(data_from, fixed, "fixed (report --carbon-intensity)")]
    points = sorted(
        (t, v, labels.get("source", "unknown"), labels.get("region"))
        for labels, values in client.raw("llm_energy_carbon_intensity_grams_per_kwh", start, end)
        for t, v in values
    )
    changes: list[IntensityChange] = []
    for t, v, source, region in points:
        if changes and changes[-1].grams_per_kwh == v and changes[-1].source == source:
            continue
        changes.append(IntensityChange(t, v, source, region))
    return changes


def _gpus(client: PrometheusClient, start: float, end: float) -> list[Gpu]:
    seen: dict[tuple[str, str, str], Gpu] = {}
    series = client.raw("llm_energy_gpu_info", start, end)
    instances = {labels.get("instance", "") for labels, _ in series}
    for labels, _ in series:
        index = labels.get("gpu", "?")
        if len(instances) > 1:
            index = f"{labels.get('instance', '')}/{index}"
        key = (index, labels.get("uuid", ""), labels.get("name", ""))
        seen.setdefault(key, Gpu(index, labels.get("uuid"), labels.get("name")))
    return list(seen.values())
