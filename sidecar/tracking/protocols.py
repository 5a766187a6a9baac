"""What an LLM request asks for and what its response reports, read from bytes alone.

This module is the protocol layer's public face; the work lives in modules
split by concern: :mod:`~sidecar.tracking.routes` (which API a path is),
:mod:`~sidecar.tracking.requests` (request bodies, usage injection),
:mod:`~sidecar.tracking.responses` (following a response as it streams) and
:mod:`~sidecar.tracking.openai_chunks` (OpenAI chunks read from bytes). All
of it is pure (no I/O, no clock, no logging) and never raises on what a
client or server sends.

Prompt and completion text are measured (byte lengths), never returned,
stored in records or logged; the only copies are bytes in transit, dropped
once read.

Shapes (REFERENCE.md section 1): OpenAI-compatible chat, completions and
embeddings (vLLM, SGLang, llama.cpp, TGI's messages API, Ollama's ``/v1``),
TGI ``/generate`` and ``/generate_stream``, Ollama ``/api/*`` (NDJSON, not SSE).
"""

from __future__ import annotations

from sidecar.tracking.requests import RequestInfo, inject_include_usage, parse_request
from sidecar.tracking.responses import Fed, ResponseTracker, Usage
from sidecar.tracking.routes import classify
from sidecar.tracking.wire import BYTES_PER_TOKEN, Api, Endpoint

__all__ = [
    "BYTES_PER_TOKEN",
    "Api",
    "Endpoint",
    "Fed",
    "RequestInfo",
    "ResponseTracker",
    "Usage",
    "classify",
    "inject_include_usage",
    "parse_request",
]
