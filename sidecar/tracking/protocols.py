"""What an LLM request asks for and what its response reports, read from bytes alone.

The proxy calls this layer on the hot path, so it is pure (no I/O, no clock,
no logging) and cheap: one ``json.loads`` per request body and per streamed
event, strategies chosen once per response. It never raises on what a
client or server sends: malformed JSON or SSE only means the tracker learns
less, and the bytes the client receives are the bytes the server sent
(unless the proxy asked for the injected usage chunk to be stripped).

Prompt and completion text are measured (byte lengths), never returned,
stored in records or logged; the only copies are response bytes in transit
(a partial event, a JSON body under the cap), dropped once read.

Shapes (REFERENCE.md section 1): OpenAI-compatible chat, completions and
embeddings (vLLM, SGLang, llama.cpp, TGI's messages API, Ollama's ``/v1``),
TGI ``/generate`` and ``/generate_stream``, Ollama ``/api/*`` (NDJSON, not SSE).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from sidecar.tracking.sse import EventSplitter, LineSplitter, Piece, event_data

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

Endpoint = Literal[
    "chat", "completion", "responses", "embedding", "pooling", "generate", "unknown", "other"
]
Api = Literal["openai", "tgi", "ollama", "none"]

BYTES_PER_TOKEN: Final = 4
"""Rough UTF-8 bytes per token for English text with BPE tokenizers (CONTRACT.md)."""

_OTHER: Final[tuple[Endpoint, Api]] = ("other", "none")
_ROUTES: Final[Mapping[str, tuple[Endpoint, Api]]] = {
    "/v1/chat/completions": ("chat", "openai"),
    "/v1/completions": ("completion", "openai"),
    "/v1/embeddings": ("embedding", "openai"),
    "/generate": ("generate", "tgi"),
    "/generate_stream": ("generate", "tgi"),
    "/api/generate": ("generate", "ollama"),
    "/api/chat": ("chat", "ollama"),
    "/api/embed": ("embedding", "ollama"),
    "/api/embeddings": ("embedding", "ollama"),
}
# Request fields that carry prompt text in any of the three APIs.
_PROMPT_FIELDS: Final = ("messages", "prompt", "inputs", "input", "system", "suffix")
_MAX_DEPTH: Final = 8  # how deep prompt measuring looks into nested lists and parts
_MAX_MODEL_LEN: Final = 256  # longer "model names" are treated as absent, not truncated
_NON_JSON_TYPES: Final = ("multipart/", "application/octet-stream", "application/x-protobuf")
_SALVAGE_TAIL: Final = 64 * 1024
_USAGE_KEY: Final = re.compile(rb'"usage"\s*:\s*\{')
_MODEL_PAIR: Final = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')
_Mode = Literal["pass", "sse", "ndjson", "json"]
_Edit = Literal["keep", "drop", "null_usage"]
# A top-level `"usage": null` member, after another member or before one. A quote
# inside a JSON string is escaped, so these cannot match inside text.
_NULL_USAGE_AFTER: Final = re.compile(rb'[ \t]*,[ \t]*"usage"[ \t]*:[ \t]*null(?=[ \t]*[,}])')
_NULL_USAGE_FIRST: Final = re.compile(rb'(?<=\{)[ \t]*"usage"[ \t]*:[ \t]*null[ \t]*,[ \t]*')


def classify(method: str, path: str) -> tuple[Endpoint, Api]:
    """Which inference endpoint and API a request is, by exact path.

    Only ``POST`` is inference: a ``GET`` on the same path (a health probe, a
    misdirected browser) holds no energy. Paths are exact, query string
    aside, so a server's ``/metrics`` or ``/v1/models`` is never mistaken for
    work.
    """
    if method.upper() != "POST":
        return _OTHER
    return _ROUTES.get(path.split("?", 1)[0], _OTHER)


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
    whose ``/generate_stream`` streams without saying so in the body.
    Malformed JSON yields defaults with an estimate from the body's length.
    """
    if endpoint == "other" or api == "none":
        return RequestInfo(endpoint, api, None, False, None, False)
    default_stream = _default_stream(endpoint, api, path)
    if body is None:
        return RequestInfo(endpoint, api, None, default_stream, None, False)
    obj = _loads(body) if _json_type(content_type) else None
    if not isinstance(obj, dict):
        return RequestInfo(endpoint, api, None, default_stream, _tokens(len(body)), False)
    stream = default_stream
    flag = obj.get("stream")
    if api == "openai":
        stream = flag is True
    elif api == "ollama" and endpoint != "embedding":
        stream = flag is not False
    options = obj.get("stream_options")
    wants_usage = (
        api == "openai" and isinstance(options, dict) and options.get("include_usage") is True
    )
    return RequestInfo(
        endpoint, api, _model(obj.get("model")), stream, _prompt_estimate(obj), wants_usage
    )


def inject_include_usage(body: bytes) -> bytes | None:
    """Ask a streaming OpenAI request for its usage chunk; ``None`` when not applicable.

    Only for ``/v1/chat/completions`` and ``/v1/completions`` bodies (the
    caller checks the endpoint) with ``"stream": true`` that lack
    ``include_usage: true``. Requests asking for ``continuous_usage_stats``
    are left alone: injecting would put usage in every chunk, which strip
    mode cannot undo. When ``stream_options`` is absent the field is appended
    textually so every other byte of the client's body survives; otherwise the
    body is re-serialised. The caller must send the new ``Content-Length`` and
    strip the extra chunk (``ResponseTracker(strip_usage_chunk=True)``).
    """
    obj = _loads(body)
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    if "stream_options" not in obj:
        text = body.rstrip(b" \t\r\n")
        if not text.endswith(b"}"):
            return None
        return text[:-1] + b',"stream_options":{"include_usage":true}}' + body[len(text) :]
    options = obj["stream_options"]
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    if options.get("continuous_usage_stats"):
        return None
    obj["stream_options"] = {**options, "include_usage": True}
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True, slots=True)
class Fed:
    """The outcome of one response chunk.

    ``tokens`` counts token-bearing events completed by this chunk (streamed
    token times); ``out`` is what to send to the client: the chunk itself,
    unless the usage chunk is being stripped.
    """

    tokens: int
    out: bytes


@dataclass(frozen=True, slots=True)
class Usage:
    """What the response reported, once it has ended.

    ``None`` means the server did not say. ``model`` is the response's own
    model field (the request's is in :class:`RequestInfo`). ``token_events``
    is the number of token-bearing streamed events seen, a fallback for
    ``completion_tokens`` when a stream carried no usage.
    """

    prompt_tokens: int | None
    completion_tokens: int | None
    model: str | None
    token_events: int = 0


class ResponseTracker:
    """Follows one response body chunk by chunk, learning token times and usage.

    The framing is chosen once from the response headers: SSE for
    ``text/event-stream`` (OpenAI and TGI streams), NDJSON for Ollama, a
    bounded buffer for a plain JSON body, and pass-through for anything it
    cannot read cheaply (compressed bodies, other content types, non-inference
    paths). It keeps at most ``max_buffer`` bytes whatever arrives.

    With ``strip_usage_chunk`` (only after :func:`inject_include_usage`),
    complete SSE events are released once framed, the usage-only chunk
    (``choices: []`` with a ``usage`` object) is dropped and the
    ``"usage": null`` member the injection made the server add to the other
    chunks is removed; every other byte goes out unchanged. Events over the
    cap pass unparsed and unedited. At end of stream the caller must send
    :meth:`flush`'s bytes.
    """

    __slots__ = (
        "_completion",
        "_done",
        "_events",
        "_info",
        "_json_parts",
        "_json_size",
        "_lines",
        "_max",
        "_mode",
        "_model",
        "_prompt",
        "_streamed_usage",
        "_streaming",
        "_strip",
        "_tail",
        "_token_events",
        "_usage",
    )

    def __init__(
        self,
        info: RequestInfo,
        content_type: str | None,
        content_encoding: str | None,
        headers: Mapping[str, str],
        *,
        strip_usage_chunk: bool = False,
        max_buffer: int = 1 << 20,
    ) -> None:
        self._info = info
        self._max = max(max_buffer, 1)
        self._mode: _Mode = _choose_mode(info, content_type, content_encoding)
        self._streaming = _is_stream(info, content_type)
        self._strip = strip_usage_chunk and self._mode == "sse"
        self._events = EventSplitter(self._max, hold=self._strip) if self._mode == "sse" else None
        self._lines = LineSplitter(self._max) if self._mode == "ndjson" else None
        self._json_parts: list[bytes] | None = [] if self._mode == "json" else None
        self._json_size = 0
        self._tail: bytes | None = None  # the last bytes of an over-cap JSON body
        self._prompt: int | None = None
        self._completion: int | None = None
        self._model: str | None = None
        self._streamed_usage = 0  # continuous usage: completion tokens already counted
        self._token_events = 0
        self._done = False
        self._usage: Usage | None = None
        self._read_headers(headers)

    @property
    def streaming(self) -> bool:
        """Whether the response is a token stream (SSE or NDJSON), whatever the request said.

        Read from the response's content type, so TGI's ``/generate_stream``
        and servers that stream by default count as streams even when the
        request body did not say so.
        """
        return self._streaming

    @property
    def held_bytes(self) -> int:
        """Bytes of the body kept right now; never more than ``max_buffer`` (+1 pending CR)."""
        if self._events is not None:
            return self._events.held_bytes
        if self._lines is not None:
            return self._lines.held_bytes
        return self._json_size if self._tail is None else len(self._tail)

    def feed(self, chunk: bytes) -> Fed:
        """Take the next response chunk; returns its token events and the bytes to send."""
        if self._done or not chunk:
            return Fed(0, chunk)
        if self._events is not None:
            return self._feed_sse(chunk)
        if self._lines is not None:
            return Fed(sum(self._on_ndjson(line) for line in self._lines.feed(chunk)), chunk)
        if self._json_parts is not None or self._tail is not None:
            self._feed_json(chunk)
        return Fed(0, chunk)

    def flush(self) -> bytes:
        """End of body: parse what is left and return the bytes still to send.

        Always ``b""`` except in strip mode, where an unterminated last event
        is held until now. Idempotent; :meth:`finish` calls it too.
        """
        if self._done:
            return b""
        self._done = True
        if self._events is not None:
            return self._pieces(self._events.close()).out
        if self._lines is not None:
            for line in self._lines.close():
                self._on_ndjson(line)
        elif self._json_parts is not None:
            self._absorb_json(_loads(b"".join(self._json_parts)))
            self._json_parts = None
        elif self._tail is not None:
            self._salvage(self._tail)
            self._tail = None
        return b""

    def finish(self) -> Usage:
        """What the response reported; call once the body has ended (idempotent)."""
        if self._usage is None:
            self.flush()
            completion = self._completion
            if completion is None and self._info.endpoint == "embedding":
                completion = 0 if self._prompt is not None else None
            self._usage = Usage(self._prompt, completion, self._model, self._token_events)
        return self._usage

    # ------------------------------------------------------------------ internals
    def _read_headers(self, headers: Mapping[str, str]) -> None:
        """TGI reports counts in headers on non-stream responses; the body may refine them."""
        for key, value in headers.items():
            name = key.lower()
            if name == "x-prompt-tokens":
                self._prompt = _header_count(value)
            elif name == "x-generated-tokens":
                self._completion = _header_count(value)

    def _feed_sse(self, chunk: bytes) -> Fed:
        assert self._events is not None
        fed = self._pieces(self._events.feed(chunk))
        return fed if self._strip else Fed(fed.tokens, chunk)

    def _pieces(self, pieces: list[Piece]) -> Fed:
        """Parse framed SSE pieces; in strip mode, also the bytes to send (see :meth:`_unasked`)."""
        tokens = 0
        out: list[bytes] = []
        for piece in pieces:
            raw = piece.raw
            if piece.intact:
                count, edit = self._on_sse(raw)
                tokens += count
                if self._strip and piece.complete:
                    if edit == "drop":
                        continue
                    if edit == "null_usage":
                        raw = _without_null_usage(raw)
            if self._strip:
                out.append(raw)
        return Fed(tokens, out[0] if len(out) == 1 else b"".join(out))

    def _on_sse(self, raw: bytes) -> tuple[int, _Edit]:
        """Token events in one SSE event, and what strip mode must do to it.

        With ``include_usage`` an OpenAI-conformant server sends one extra
        chunk (``choices: []`` and a ``usage`` object: dropped) and puts
        ``"usage": null`` in every other chunk ("All other chunks will also
        include a usage field, but with a null value"): that member is removed
        too, so a client that did not ask sees the bytes it would have seen.
        """
        data = event_data(raw)
        if data is None or data.startswith(b"[DONE]"):
            return 0, "keep"
        if self._model is not None:
            fast = _plain_chunk(data)
            if fast is not None:  # most events of a stream: counted without decoding JSON
                self._token_events += fast[0]
                return fast
        obj = _loads(data)
        if not isinstance(obj, dict):
            return 0, "keep"
        self._absorb(obj)
        choices = obj.get("choices")
        usage = obj.get("usage")
        edit: _Edit = "null_usage" if "usage" in obj and usage is None else "keep"
        if isinstance(choices, list):
            if not choices and isinstance(usage, dict):
                return 0, "drop"
            count = self._openai_tokens(choices, usage)
        else:
            count = 1 if isinstance(obj.get("token"), dict) else 0  # TGI token event
        self._token_events += count
        return count, edit

    def _openai_tokens(self, choices: list[object], usage: object) -> int:
        """One per choice with output, unless the chunk reports cumulative usage (vLLM)."""
        if isinstance(usage, dict):
            cumulative = _count(usage.get("completion_tokens"))
            if cumulative is not None:
                new = max(cumulative - self._streamed_usage, 0)
                self._streamed_usage = max(cumulative, self._streamed_usage)
                return new
        return sum(1 for choice in choices if _has_output(choice))

    def _on_ndjson(self, line: bytes) -> int:
        """Ollama: every ``done: false`` object is a token; counts ride on the last one."""
        obj = _loads(line) if line.strip() else None
        if not isinstance(obj, dict):
            return 0
        self._absorb(obj)
        prompt = _count(obj.get("prompt_eval_count"))
        if prompt is not None:
            self._prompt = prompt
        completion = _count(obj.get("eval_count"))
        if completion is not None:
            self._completion = completion
        if obj.get("done") is False:
            self._token_events += 1
            return 1
        return 0

    def _feed_json(self, chunk: bytes) -> None:
        keep = min(_SALVAGE_TAIL, self._max)
        if self._tail is not None:
            if len(chunk) >= keep:
                self._tail = chunk[-keep:]
            else:
                self._tail = self._tail[max(len(self._tail) + len(chunk) - keep, 0) :] + chunk
            return
        assert self._json_parts is not None
        if self._json_size + len(chunk) <= self._max:
            self._json_parts.append(chunk)
            self._json_size += len(chunk)
            return
        # Over the cap: stop buffering; keep only a tail where `usage` may be salvaged.
        self._tail = b"".join([*self._json_parts, chunk])[-keep:]
        self._json_parts, self._json_size = None, 0

    def _absorb_json(self, obj: object) -> None:
        if isinstance(obj, list) and obj and isinstance(obj[0], dict):
            obj = obj[0]  # TGI's compatibility route answers a one-element list
        if isinstance(obj, dict):
            self._absorb(obj)

    def _absorb(self, obj: dict[str, object]) -> None:
        """Model and counts from OpenAI ``usage`` or TGI ``details``, wherever they appear."""
        model = _model(obj.get("model"))
        if model is not None:
            self._model = model
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._take(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
        details = obj.get("details")
        if isinstance(details, dict):
            self._take(_count(details.get("input_length")), _count(details.get("generated_tokens")))

    def _take(self, prompt: int | None, completion: int | None) -> None:
        if prompt is not None:
            self._prompt = prompt
        if completion is not None:
            self._completion = completion

    def _salvage(self, tail: bytes) -> None:
        """Over-cap bodies (large embedding batches) end with ``usage``: read it from the tail."""
        matches = [m for m in _USAGE_KEY.finditer(tail) if not _escaped(tail, m.start())]
        if matches:
            brace = matches[-1].end() - 1
            try:
                usage, _ = json.JSONDecoder().raw_decode(tail[brace:].decode("utf-8", "replace"))
            except ValueError:
                usage = None
            if isinstance(usage, dict):
                self._absorb({"usage": usage})
        models = [m for m in _MODEL_PAIR.finditer(tail) if not _escaped(tail, m.start())]
        if models:
            self._absorb({"model": _loads(models[-1].group(1))})


def _choose_mode(info: RequestInfo, content_type: str | None, encoding: str | None) -> _Mode:
    """Pick the framing once, from what the response says it is."""
    if info.endpoint == "other" or not _identity(encoding):
        return "pass"
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime == "text/event-stream" or (not mime and info.stream and info.api != "ollama"):
        return "sse"
    if mime == "application/x-ndjson" or (info.api == "ollama" and _json_mime(mime)):
        return "ndjson"
    if _json_mime(mime):
        return "json"
    return "pass"


def _is_stream(info: RequestInfo, content_type: str | None) -> bool:
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in ("text/event-stream", "application/x-ndjson"):
        return True
    return not mime and info.stream


def _identity(encoding: str | None) -> bool:
    if not encoding:
        return True
    return all(token.strip().lower() in ("", "identity") for token in encoding.split(","))


def _json_mime(mime: str) -> bool:
    return not mime or mime == "application/json" or mime.endswith("+json")


def _json_type(content_type: str | None) -> bool:
    """Whether a request body may be JSON; curl's form default often carries JSON too."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    return not mime.startswith(_NON_JSON_TYPES)


def _default_stream(endpoint: Endpoint, api: Api, path: str | None) -> bool:
    if api == "tgi":
        return path is not None and path.split("?", 1)[0].endswith("/generate_stream")
    return api == "ollama" and endpoint != "embedding"


def _loads(data: bytes) -> object:
    """``json.loads`` that answers ``None`` instead of raising on anything malformed."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _model(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= _MAX_MODEL_LEN:
        return value
    return None


def _count(value: object) -> int | None:
    """A token count as servers send it: a non-negative integer (bools excluded)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _header_count(value: str) -> int | None:
    try:
        count = int(value.strip())
    except ValueError:
        return None
    return count if count >= 0 else None


_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null\s*[,}]')
_TEXT = re.compile(rb'"(?:content|text|reasoning_content|reasoning)"\s*:\s*"(?!")')
_COMPLEX = re.compile(rb'"(?:tool_calls|function_call|token|details|error)"')


def _plain_chunk(data: bytes) -> tuple[int, _Edit] | None:
    """A plain one-choice OpenAI chunk, read without decoding it; ``None`` when unsure.

    A stream is mostly such chunks (one delta of text each); decoding every one
    as JSON was the proxy's largest cost. Anything that might carry usage, tool
    calls, TGI fields, errors or several choices takes the full parse.
    """
    if data.count(b'"index"') != 1 or b'"choices"' not in data:
        return None
    if _COMPLEX.search(data):
        return None
    edit: _Edit = "keep"
    if b'"usage"' in data:
        if data.count(b'"usage"') != 1 or not _NULL_USAGE.search(data):
            return None
        edit = "null_usage"
    return (1 if _TEXT.search(data) else 0), edit


def _has_output(choice: object) -> bool:
    """Whether a streamed choice carries generated output (text, reasoning or tool calls)."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(
            delta.get("content")
            or delta.get("reasoning_content")
            or delta.get("reasoning")
            or delta.get("tool_calls")
            or delta.get("function_call")
        )
    return bool(choice.get("text"))


def _tokens(n_bytes: int) -> int:
    return -(-n_bytes // BYTES_PER_TOKEN)


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
    return _tokens(n_bytes) + ids if found else None


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


def _without_null_usage(raw: bytes) -> bytes:
    """``raw`` minus its one ``"usage": null`` member; unchanged unless exactly one is found."""
    for pattern in (_NULL_USAGE_AFTER, _NULL_USAGE_FIRST):
        matches = pattern.findall(raw)
        if len(matches) == 1:
            return pattern.sub(b"", raw, count=1)
        if matches:
            return raw
    return raw


def _escaped(data: bytes, index: int) -> bool:
    """Whether the quote at ``index`` is escaped, so the match is inside a string."""
    backslashes = 0
    while index - backslashes - 1 >= 0 and data[index - backslashes - 1] == 0x5C:
        backslashes += 1
    return backslashes % 2 == 1
