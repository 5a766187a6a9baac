"""The receiver's own counters, as a collector over the counts its parts keep."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.traces.energy_spans import ENERGY_SPAN_RESULTS
from sidecar.traces.forward import FORWARD_RESULTS
from sidecar.traces.receiver import EXPORT_RESULTS, SPAN_RESULTS
from sidecar.traces.service import TracesService


class TracesCollector(Collector):
    """``llm_energy_otlp_*``: exports and spans received, bodies forwarded, energy spans.

    ``service`` returns the service in force, or None while there is none yet (the
    sidecar waits for its GPUs before it listens), when the families are left out.
    """

    def __init__(self, service: Callable[[], TracesService | None]) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        s = self._service()
        if s is None:
            return
        exports = CounterMetricFamily(
            "llm_energy_otlp_exports",
            "OTLP export requests received, by the answer given (ok, malformed, too_large, unsupported, overloaded).",
            labels=["result"],
        )
        for result in EXPORT_RESULTS:
            exports.add_metric([result], s.receiver.exports[result])
        yield exports
        spans = CounterMetricFamily(
            "llm_energy_otlp_spans",
            "Spans received: request spans accepted, duplicates of one already taken, invalid request spans, other spans ignored, and spans the accounting failed on.",
            labels=["result"],
        )
        for span_result in SPAN_RESULTS:
            spans.add_metric([span_result], s.receiver.spans[span_result])
        yield spans
        forwarded = CounterMetricFamily(
            "llm_energy_otlp_forwarded",
            "Export bodies sent on to --otlp-forward (kind export) and energy span exports (kind energy), by result.",
            labels=["kind", "result"],
        )
        queued = GaugeMetricFamily(
            "llm_energy_otlp_forward_queue_bytes",
            "Bytes waiting to be sent to --otlp-forward.",
            labels=["kind"],
        )
        for kind, forwarder in (("export", s.forwarder), ("energy", s.energy_forwarder)):
            if forwarder is None:
                continue
            for sent in FORWARD_RESULTS:
                forwarded.add_metric([kind, sent], forwarder.results[sent])
            queued.add_metric([kind], forwarder.queued_bytes)
        yield forwarded
        yield queued
        if s.energy_spans is not None:
            energy = CounterMetricFamily(
                "llm_energy_otlp_energy_spans",
                "Finished requests by what became of their llm_energy.request span (queued, no_trace: no request span heard, dropped: queue full).",
                labels=["result"],
            )
            for fate in ENERGY_SPAN_RESULTS:
                energy.add_metric([fate], s.energy_spans.results[fate])
            yield energy
