"""``llm_energy.request`` spans: each finished request's energy, in the request's own trace.

Per request span received, its trace id and span id are kept (a few dozen bytes, for at
most the hold and ``max_pending`` requests); when the ledger hands out that request's
final energy, a child span of the request span is built with the ``llm_energy.*``
attributes of CONTRACT.md and queued. A timer sends the queue as one OTLP/HTTP protobuf
export (resource ``service.name=llm-energy-sidecar``) through a :class:`Forwarder`, so a
slow collector costs a bounded queue and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import structlog
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from sidecar import __version__
from sidecar.ledger import FinishedRequest
from sidecar.traces.forward import Forwarder
from sidecar.traces.span import RequestSpan

log = structlog.get_logger("sidecar.traces.energy_spans")

SPAN_NAME: Final = "llm_energy.request"
ATTRIBUTION: Final = "llm-energy-sidecar/v1"
SERVICE_NAME: Final = "llm-energy-sidecar"
EnergySpanResult = Literal["queued", "no_trace", "dropped"]
ENERGY_SPAN_RESULTS: Final[tuple[EnergySpanResult, ...]] = ("queued", "no_trace", "dropped")


@dataclass(frozen=True, slots=True)
class _Parent:
    trace_id: bytes
    span_id: bytes
    noted_s: float


class EnergySpans:
    """Remembers request spans' places in their traces; turns finished requests into spans."""

    def __init__(
        self,
        forwarder: Forwarder,
        *,
        clock: Callable[[], float],
        wall_offset_s: float,
        grams_per_joule: Callable[[], float],
        hold_s: float = 900.0,
        max_pending: int = 100_000,
        batch_max: int = 512,
        flush_s: float = 1.0,
    ) -> None:
        self._forwarder = forwarder
        self._clock = clock
        self._wall_offset_s = wall_offset_s
        self._grams_per_joule = grams_per_joule
        self._hold_s = hold_s
        self._max_pending = max_pending
        self._batch_max = batch_max
        self._flush_s = flush_s
        self._parents: OrderedDict[str, _Parent] = OrderedDict()
        self._batch: list[Span] = []
        self._task: asyncio.Task[None] | None = None
        self.results: Counter[EnergySpanResult] = Counter()

    def remember(self, span: RequestSpan) -> None:
        """Keep where ``span`` sits in its trace until its request's energy is final."""
        if not span.trace_id or not span.span_id:
            return
        now = self._clock()
        self._parents[span.request_id] = _Parent(span.trace_id, span.span_id, now)
        self._parents.move_to_end(span.request_id)
        while self._parents:
            oldest = next(iter(self._parents.values()))
            if len(self._parents) <= self._max_pending and now - oldest.noted_s <= self._hold_s:
                break
            self._parents.popitem(last=False)

    def finished(self, f: FinishedRequest) -> None:
        """One finished request: its energy span, when its request span was heard."""
        parent = self._parents.pop(f.id, None)
        if parent is None:
            self.results["no_trace"] += 1
            return
        self._batch.append(self.build(f, parent.trace_id, parent.span_id))
        self.results["queued"] += 1
        if len(self._batch) >= self._batch_max:
            self.flush()

    def build(self, f: FinishedRequest, trace_id: bytes, parent_span_id: bytes) -> Span:
        """The ``llm_energy.request`` span of ``f``, over the request's time in flight."""
        grams = f.energy_j * self._grams_per_joule()
        span = Span(
            trace_id=trace_id,
            span_id=os.urandom(8),
            parent_span_id=parent_span_id,
            name=SPAN_NAME,
            kind=Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=self._unix_ns(f.start_s),
            end_time_unix_nano=self._unix_ns(max(f.end_s, f.start_s)),
        )
        span.attributes.extend(
            [
                _double("llm_energy.joules", f.energy_j),
                _double("llm_energy.dynamic_joules", f.dynamic_j),
                _double("llm_energy.idle_joules", f.idle_j),
                _double("llm_energy.prefill_joules", f.prefill_j),
                _double("llm_energy.decode_joules", f.decode_j),
                _double("llm_energy.co2e_grams", grams),
                _string("llm_energy.attribution", ATTRIBUTION),
                _string("gen_ai.request.id", f.id),
            ]
        )
        return span

    def flush(self) -> None:
        """Send what is queued as one export (nothing when the queue is empty)."""
        if not self._batch:
            return
        spans, self._batch = self._batch, []
        if not self._forwarder.submit(export_of(spans).SerializeToString(), PROTOBUF_TYPE):
            self.results["dropped"] += len(spans)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="otlp-energy-spans")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            try:
                self.flush()
            except Exception:  # a bad record must not end the timer
                log.exception("otlp.energy_spans_failed")

    def _unix_ns(self, monotonic_s: float) -> int:
        return round((monotonic_s + self._wall_offset_s) * 1e9)


PROTOBUF_TYPE: Final = "application/x-protobuf"


def export_of(spans: list[Span]) -> ExportTraceServiceRequest:
    """One export of ``spans`` under the sidecar's own resource and scope."""
    resource = Resource(attributes=[_string("service.name", SERVICE_NAME)])
    scope = InstrumentationScope(name="sidecar.traces.energy_spans", version=__version__)
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(resource=resource, scope_spans=[ScopeSpans(scope=scope, spans=spans)])
        ]
    )


def _double(key: str, value: float) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(double_value=float(value)))


def _string(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))
