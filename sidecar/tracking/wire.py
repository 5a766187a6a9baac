"""Small pure helpers every protocol module shares: JSON that never raises, counts, MIME types."""

from __future__ import annotations

import json
from typing import Final, Literal

import orjson

__all__ = [
    "BYTES_PER_TOKEN",
    "Api",
    "Endpoint",
    "count",
    "escaped",
    "header_count",
    "identity",
    "json_mime",
    "json_type",
    "loads",
    "model_name",
    "tokens_for",
    "usage_cached",
    "usage_counts",
]

Endpoint = Literal[
    "chat", "completion", "responses", "embedding", "pooling", "generate", "unknown", "other"
]
Api = Literal["openai", "responses", "anthropic", "tgi", "ollama", "none"]
"""The wire dialect: ``openai`` (chat, completions, embeddings, pooling), ``responses``
(OpenAI Responses), ``anthropic`` (Messages), ``tgi`` (native ``/generate``, TGI's or
SGLang's: the response's shape tells them apart), ``ollama`` (NDJSON), ``none``."""

BYTES_PER_TOKEN: Final = 4
"""Rough UTF-8 bytes per token for English text with BPE tokenizers (CONTRACT.md)."""

_MAX_MODEL_LEN: Final = 256  # longer "model names" are treated as absent, not truncated
_NON_JSON_TYPES: Final = ("multipart/", "application/octet-stream", "application/x-protobuf")


def identity(encoding: str | None) -> bool:
    """Whether a ``Content-Encoding`` leaves the body readable as sent."""
    if not encoding:
        return True
    return all(token.strip().lower() in ("", "identity") for token in encoding.split(","))


def json_mime(mime: str) -> bool:
    """JSON or a ``+json`` type; no type at all is read as JSON too (servers omit it)."""
    return not mime or mime == "application/json" or mime.endswith("+json")


def json_type(content_type: str | None) -> bool:
    """Whether a request body may be JSON; curl's form default often carries JSON too."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    return not mime.startswith(_NON_JSON_TYPES)


def loads(data: bytes) -> object:
    """``json.loads`` that answers ``None`` instead of raising on anything malformed.

    orjson reads it first: a request body and a stream's first and last events are
    decoded for every request, and orjson takes a quarter of the standard library's
    time on them. What orjson refuses and the standard library reads (``NaN``,
    ``Infinity``, a lone surrogate escape, nesting past 1,024) goes to the standard
    library, so nothing that parsed before is lost; the one difference left is an
    integer past 64 bits, which orjson reads as a float (no token count is that large).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def model_name(value: object) -> str | None:
    """A usable model name, or ``None``: overlong values are absent, not truncated."""
    if isinstance(value, str) and 0 < len(value) <= _MAX_MODEL_LEN:
        return value
    return None


def count(value: object) -> int | None:
    """A token count as servers send it: a non-negative integer (bools excluded)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def header_count(value: str) -> int | None:
    """A count from a header such as TGI's ``x-generated-tokens``."""
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


def tokens_for(n_bytes: int) -> int:
    """Tokens in ``n_bytes`` of text at :data:`BYTES_PER_TOKEN` (rounded up)."""
    return -(-n_bytes // BYTES_PER_TOKEN)


def escaped(data: bytes, index: int) -> bool:
    """Whether the quote at ``index`` is escaped, so the match is inside a string."""
    backslashes = 0
    while index - backslashes - 1 >= 0 and data[index - backslashes - 1] == 0x5C:
        backslashes += 1
    return backslashes % 2 == 1


def usage_counts(usage: dict[str, object]) -> tuple[int | None, int | None]:
    """(prompt, completion) from a ``usage`` object of any dialect.

    Anthropic's ``input_tokens`` leaves out cached input (``cache_read_input_tokens``,
    ``cache_creation_input_tokens``; vLLM follows it): the model still saw it, so
    it is added back. Responses' ``input_tokens`` already includes cached tokens.
    """
    prompt = count(usage.get("prompt_tokens"))
    completion = count(usage.get("completion_tokens"))
    if prompt is None:
        prompt = count(usage.get("input_tokens"))
        if prompt is not None:
            for key in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                prompt += count(usage.get(key)) or 0
    if completion is None:
        completion = count(usage.get("output_tokens"))
    return prompt, completion


def usage_cached(usage: dict[str, object]) -> int | None:
    """Prompt tokens served from the prefix cache, from a ``usage`` object of any dialect.

    They were read, not computed: OpenAI's ``prompt_tokens_details.cached_tokens`` (vLLM
    fills it with ``--enable-prompt-tokens-details``), Responses'
    ``input_tokens_details.cached_tokens``, Anthropic's ``cache_read_input_tokens``
    (``cache_creation_input_tokens`` were computed, and written to the cache).
    """
    for key in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(key)
        if isinstance(details, dict):
            cached = count(details.get("cached_tokens"))
            if cached is not None:
                return cached
    return count(usage.get("cache_read_input_tokens"))
