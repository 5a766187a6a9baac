"""A model server's request span to a :class:`RequestSpan` (CONTRACT.md, "Traces").

vLLM (``vllm/v1/engine/output_processor.py``, ``do_tracing``) sends one span named
``llm_request`` per finished request: its start is the arrival (the front end's wall
clock), and its ``gen_ai.latency.*`` attributes are, in seconds:

- ``time_to_first_token``: arrival to first token, measured by the front end;
- ``time_in_queue``: engine queued to engine scheduled;
- ``time_in_model_prefill``: engine scheduled to first token;
- ``time_in_model_decode``: first token to last token.

The engine stamps do not add up to the first token (the front end's tokenising and
hand-off fall in neither), so times are anchored on the first token: first token =
arrival + ttft, scheduled = first token - prefill, end = first token + decode.
vLLM names no model on the span nor in its resource (``service.name`` is the process's
service, not a model), so the model comes from ``gen_ai.response.model`` or
``gen_ai.request.model`` on the span or the resource, or ``llm_energy.model`` on the
resource (``OTEL_RESOURCE_ATTRIBUTES=llm_energy.model=NAME``), else the sidecar's
``--model``.

SGLang's request root span (``Req <rid>``, ``sglang/srt/observability``) carries the same
attributes plus ``gen_ai.usage.cached_tokens`` and ``gen_ai.response.model``; its
``time_in_model_prefill`` runs from the API server's dispatch, so its queue counts as
in flight (docs/traces.md). It is recognised by its attributes, not its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sidecar.traces.span import RequestSpan

REQUEST_SPAN_NAME: Final = "llm_request"
TTFT: Final = "gen_ai.latency.time_to_first_token"
PREFILL: Final = "gen_ai.latency.time_in_model_prefill"
DECODE: Final = "gen_ai.latency.time_in_model_decode"
REQUEST_ID: Final = "gen_ai.request.id"
PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"
COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"
CACHED_TOKENS: Final = "gen_ai.usage.cached_tokens"
MODEL_KEYS: Final = ("gen_ai.response.model", "gen_ai.request.model", "llm_energy.model")
MAX_ID_CHARS: Final = 256
SPAN_SKEW_S: Final = 1.0
"""How far a request's stamps may run past its own span's end (float and clock rounding)."""
MAX_REQUEST_S: Final = 86_400.0
"""The longest request believed where a span carries no end time: a day."""
WANTED: Final = frozenset(
    (
        TTFT,
        PREFILL,
        DECODE,
        REQUEST_ID,
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        CACHED_TOKENS,
        *MODEL_KEYS,
    )
)
"""The only attributes read: the rest of a span's (sampling parameters...) is never decoded."""


class InvalidSpan(ValueError):
    """A request span whose facts do not hold together; one line naming the attribute."""


@dataclass(slots=True)
class Decoded:
    """What one export held: its request spans, and counts of the rest by reason."""

    spans: list[RequestSpan] = field(default_factory=list)
    ignored: int = 0  # spans that are not request spans (start-up spans, children)
    invalid: int = 0
    first_error: str | None = None


def is_request_span(span: Span) -> bool:
    """vLLM's ``llm_request``, or any span with a request id and a time to first token."""
    if span.name == REQUEST_SPAN_NAME:
        return True
    keys = {kv.key for kv in span.attributes}
    return REQUEST_ID in keys and TTFT in keys


def request_spans(
    export: ExportTraceServiceRequest, to_monotonic_s: Callable[[float], float]
) -> Decoded:
    """Every request span of ``export``, its times mapped from Unix seconds by
    ``to_monotonic_s`` onto the sidecar's clock."""
    out = Decoded()
    for resource_spans in export.resource_spans:
        resource = _attrs(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if not is_request_span(span):
                    out.ignored += 1
                    continue
                try:
                    out.spans.append(to_request_span(span, resource, to_monotonic_s))
                except InvalidSpan as e:
                    out.invalid += 1
                    out.first_error = out.first_error or str(e)
    return out


def to_request_span(
    span: Span, resource: Mapping[str, object], to_monotonic_s: Callable[[float], float]
) -> RequestSpan:
    """One request span, or :class:`InvalidSpan`."""
    attrs = _attrs(span.attributes)
    rid = attrs.get(REQUEST_ID)
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_CHARS:
        raise InvalidSpan(f"{REQUEST_ID} missing or not a string of 1 to {MAX_ID_CHARS} chars")
    if span.start_time_unix_nano <= 0:
        raise InvalidSpan("start_time_unix_nano missing")
    ttft = _seconds(attrs, TTFT)
    prefill = min(_seconds(attrs, PREFILL), ttft)
    decode = _seconds(attrs, DECODE)
    # The span is emitted when its request ends, so the request cannot outlast it; an end
    # beyond every held interval would hold the ledger's waiting list open for ever.
    lasted_s = (
        (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
        if span.end_time_unix_nano > 0
        else MAX_REQUEST_S
    )
    if ttft + decode > min(lasted_s + SPAN_SKEW_S, MAX_REQUEST_S):
        raise InvalidSpan(
            f"{TTFT} + {DECODE} = {ttft + decode:.3f} s outlasts the span ({lasted_s:.3f} s)"
        )
    arrival_s = to_monotonic_s(span.start_time_unix_nano / 1e9)
    first_token_s = arrival_s + ttft
    model = next(
        (v for k in MODEL_KEYS for v in (attrs.get(k), resource.get(k)) if _named(v)), None
    )
    return RequestSpan(
        request_id=rid,
        model=model if isinstance(model, str) else None,
        arrival_s=arrival_s,
        scheduled_s=first_token_s - prefill,
        first_token_s=first_token_s,
        end_s=first_token_s + decode,
        prompt_tokens=_count(attrs, PROMPT_TOKENS),
        completion_tokens=_count(attrs, COMPLETION_TOKENS),
        cached_tokens=_count(attrs, CACHED_TOKENS),
        trace_id=bytes(span.trace_id) if len(span.trace_id) == 16 else b"",
        span_id=bytes(span.span_id) if len(span.span_id) == 8 else b"",
    )


def _named(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 128


def _seconds(attrs: Mapping[str, object], key: str) -> float:
    value = attrs.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSpan(f"{key} missing or not a number")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidSpan(f"{key} is {seconds!r}: expected finite seconds >= 0")
    return seconds


def _count(attrs: Mapping[str, object], key: str) -> int | None:
    value = attrs.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSpan(f"{key} is {value!r}: expected a count >= 0")
    return value


def _attrs(kvs: Iterable[KeyValue]) -> dict[str, object]:
    """The scalar values of the attributes read here, by key (arrays and maps are of no use)."""
    out: dict[str, object] = {}
    for kv in kvs:
        if kv.key in WANTED:
            value = _scalar(kv.value)
            if value is not None:
                out[kv.key] = value
    return out


def _scalar(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return None if kind is None or kind in ("array_value", "kvlist_value") else getattr(value, kind)
