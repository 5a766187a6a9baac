"""OTLP trace exports as vLLM sends them, built with the official bindings (test helper).

The attributes and their types follow ``vllm/v1/engine/output_processor.py`` (``do_tracing``)
of vLLM 0.32: latencies as doubles in seconds, token counts as ints, the request id as a
string, the span named ``llm_request`` of kind SERVER, start = arrival.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

ARRIVAL_NS = 1_796_109_420_141_562_624  # the example span


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def llm_request(
    rid: str = "chatcmpl-a8755a5006221020",
    *,
    arrival_ns: int = ARRIVAL_NS,
    ttft_s: float = 0.0802,
    queue_s: float = 6.5e-05,
    prefill_s: float = 0.0344,
    decode_s: float = 0.161,
    prompt_tokens: int = 17,
    completion_tokens: int = 20,
    trace_id: bytes | None = None,
    span_id: bytes | None = None,
    extra: dict[str, Any] | None = None,
) -> Span:
    """vLLM's span for one finished request (defaults: the issue's example)."""
    attrs: dict[str, Any] = {
        "gen_ai.latency.time_to_first_token": ttft_s,
        "gen_ai.latency.e2e": ttft_s + decode_s,
        "gen_ai.latency.time_in_queue": queue_s,
        "gen_ai.usage.prompt_tokens": prompt_tokens,
        "gen_ai.usage.completion_tokens": completion_tokens,
        "gen_ai.latency.time_in_model_prefill": prefill_s,
        "gen_ai.latency.time_in_model_decode": decode_s,
        "gen_ai.latency.time_in_model_inference": prefill_s + decode_s,
        "gen_ai.request.id": rid,
        "gen_ai.request.max_tokens": 64,
        **(extra or {}),
    }
    return Span(
        trace_id=trace_id if trace_id is not None else os.urandom(16),
        span_id=span_id if span_id is not None else os.urandom(8),
        name="llm_request",
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=arrival_ns,
        end_time_unix_nano=arrival_ns + round((ttft_s + decode_s + 0.001) * 1e9),
        attributes=[kv(k, v) for k, v in attrs.items()],
    )


def export(*spans: Span, resource: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    """One export of ``spans`` under a vLLM-like resource."""
    attrs = {
        "service.name": "unknown_service",
        "telemetry.sdk.language": "python",
        "vllm.instrumenting_module_name": "vllm.llm_engine",
        **(resource or {}),
    }
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[kv(k, v) for k, v in attrs.items()]),
                scope_spans=[ScopeSpans(spans=list(spans))],
            )
        ]
    )


def otlp_json(message: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as the spec writes it: lowerCamelCase, ids in hex (not base64)."""
    doc = json_format.MessageToDict(message)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        import base64

                        span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(doc).encode()


def gz(body: bytes) -> bytes:
    return gzip.compress(body)
