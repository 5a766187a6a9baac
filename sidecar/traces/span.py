"""One finished request as the model server's trace tells it, on the sidecar's clock.

The receiver (I/O edge) decodes OTLP exports into these; the accounting behind them
(late placement in the ledger's held intervals) reads nothing else, so the wire format
and the energy split stay apart. Times are seconds on the sidecar's monotonic clock:
the receiver maps the span's Unix nanoseconds through one wall-clock anchor taken at
start, the same anchor the recorder uses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestSpan:
    """What a vLLM ``llm_request`` span says of one request (CONTRACT.md, "Traces").

    ``scheduled_s`` = first token - time in model prefill; ``first_token_s`` = arrival +
    time to first token; ``end_s`` = first token + time in model decode. The engine's
    queue and prefill stamps do not add up to the first token (the front end's time
    falls in neither), so they are never summed.
    """

    request_id: str  # the server's own id (vLLM: gen_ai.request.id = the response's "id")
    model: str | None  # the served model name, where the span or its resource names it
    arrival_s: float
    scheduled_s: float
    first_token_s: float
    end_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None
    trace_id: bytes = b""  # 16 bytes, for energy spans in the same trace
    span_id: bytes = b""  # 8 bytes: the energy span's parent
