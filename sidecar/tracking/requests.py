"""What a request asks for, read from its body before it is forwarded.

Pure and cheap: one ``json.loads`` per request body under the parse budget.
Prompt text is measured (byte lengths), never returned or kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from sidecar.tracking.wire import (
    Api,
    Endpoint,
    json_type,
    loads,
    model_name,
    tokens_for,
)

__all__ = ["RequestInfo", "inject_include_usage", "parse_request"]

# Request fields that carry prompt text in any of the APIs (SGLang: text, input_ids;
# Responses: instructions; rerank and score: query, documents, text_1, text_2).
_PROMPT_FIELDS: Final = (
    "messages",
    "prompt",
    "inputs",
    "input",
    "system",
    "suffix",
    "instructions",
    "text",
    "input_ids",
    "query",
    "documents",
    "text_1",
    "text_2",
)
_MAX_DEPTH: Final = 8  # how deep prompt measuring looks into nested lists and parts


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the proxy needs to know about a request before it is forwarded.

    ``prompt_tokens_estimate`` is about :data:`BYTES_PER_TOKEN` bytes of
    prompt text per token (token-id prompts count one per id); it weighs the
    request before the server reports real usage. ``wants_usage`` is whether
    the client itself asked for ``stream_options.include_usage``.
    """

    endpoint: Endpoint
    api: Api
    model: str | None
    stream: bool
    prompt_tokens_estimate: int | None
    wants_usage: bool


def parse_request(
    endpoint: Endpoint,
    api: Api,
    body: bytes | None,
    content_type: str | None,
    *,
    path: str | None = None,
) -> RequestInfo:
    """Read model, streaming and prompt size from a request body.

    ``body`` is the whole body when the proxy chose to read it (JSON, under
    its size cap) and ``None`` otherwise. ``path`` only matters for TGI,
    whose ``/generate_stream`` streams without saying so in the body
    (SGLang's ``/generate`` says ``"stream": true``).
    Malformed JSON yields defaults with an estimate from the body's length.
    """
    if endpoint == "other" or api == "none":
        return RequestInfo(endpoint, api, None, False, None, False)
    default_stream = _default_stream(endpoint, api, path)
    if body is None:
        return RequestInfo(endpoint, api, None, default_stream, None, False)
    obj = loads(body) if json_type(content_type) else None
    if not isinstance(obj, dict):
        return RequestInfo(endpoint, api, None, default_stream, tokens_for(len(body)), False)
    stream = default_stream
    flag = obj.get("stream")
    if api in ("openai", "responses", "anthropic"):
        stream = flag is True
    elif api == "tgi":
        stream = default_stream or flag is True  # SGLang's /generate streams on request
    elif api == "ollama" and endpoint != "embedding":
        stream = flag is not False
    options = obj.get("stream_options")
    wants_usage = (
        api == "openai" and isinstance(options, dict) and options.get("include_usage") is True
    )
    return RequestInfo(
        endpoint, api, model_name(obj.get("model")), stream, _prompt_estimate(obj), wants_usage
    )


def inject_include_usage(body: bytes, *, streaming_object: bool = False) -> bytes | None:
    """Ask a streaming OpenAI request for its usage chunk; ``None`` when not applicable.

    Only for ``/v1/chat/completions`` and ``/v1/completions`` bodies (the
    caller checks the endpoint) with ``"stream": true`` that lack
    ``include_usage: true``. Requests asking for ``continuous_usage_stats``
    are left alone: injecting would put usage in every chunk, which strip
    mode cannot undo. When ``stream_options`` is absent the field is appended
    textually so every other byte of the client's body survives; otherwise the
    body is re-serialised. The caller must send the new ``Content-Length`` and
    strip the extra chunk (``ResponseTracker(strip_usage_chunk=True)``).

    ``streaming_object`` says the caller already parsed the body as a JSON
    object with ``"stream": true`` (:func:`parse_request`); then a body whose
    bytes hold no ``"stream_options"`` key is extended without a second parse,
    which matters for large prompts.
    """
    if streaming_object and b'"stream_options"' not in body:
        return _append_usage_option(body)
    obj = loads(body)
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    if "stream_options" not in obj:
        return _append_usage_option(body)
    options = obj["stream_options"]
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    if options.get("continuous_usage_stats"):
        return None
    obj["stream_options"] = {**options, "include_usage": True}
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _append_usage_option(body: bytes) -> bytes | None:
    """The body with ``stream_options`` appended as its last member, every other byte kept."""
    text = body.rstrip(b" \t\r\n")
    if not text.endswith(b"}"):
        return None
    return text[:-1] + b',"stream_options":{"include_usage":true}}' + body[len(text) :]


def _default_stream(endpoint: Endpoint, api: Api, path: str | None) -> bool:
    if api == "tgi":
        return path is not None and path.split("?", 1)[0].endswith("/generate_stream")
    return api == "ollama" and endpoint != "embedding"


def _prompt_estimate(obj: dict[str, object]) -> int | None:
    """Tokens in the prompt-bearing fields; ``None`` when the body has none."""
    n_bytes = ids = 0
    found = False
    for key in _PROMPT_FIELDS:
        if key in obj:
            found = True
            b, i = _measure(obj[key], 0)
            n_bytes += b
            ids += i
    return tokens_for(n_bytes) + ids if found else None


def _measure(value: object, depth: int) -> tuple[int, int]:
    """(UTF-8 bytes of text, token ids) in a prompt value; the text itself is not kept."""
    if isinstance(value, str):
        return (len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))), 0
    if isinstance(value, bool) or depth >= _MAX_DEPTH:
        return 0, 0
    if isinstance(value, int):
        return 0, 1  # a pre-tokenised prompt
    if isinstance(value, list):
        n_bytes = ids = 0
        for item in value:
            b, i = _measure(item, depth + 1)
            n_bytes += b
            ids += i
        return n_bytes, ids
    if isinstance(value, dict):  # a chat message or a content part; images are not text
        b1, i1 = _measure(value.get("content"), depth + 1)
        b2, i2 = _measure(value.get("text"), depth + 1)
        return b1 + b2, i1 + i2
    return 0, 0
