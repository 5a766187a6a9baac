"""What a response reports, followed chunk by chunk as it streams to the client.

The proxy calls this on the hot path, so it is pure (no I/O, no clock, no
logging) and cheap: framing is chosen once per response and most stream
events are read from bytes without decoding JSON. It never raises on what a
server sends: malformed JSON or SSE only means the tracker learns less, and
the client receives the bytes the server sent (unless the proxy asked for the
injected usage chunk to be stripped). Completion text is never kept beyond
the bytes in transit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

from sidecar.tracking.budget import ParseBudget
from sidecar.tracking.event_scan import Scan, anthropic_event, meta_counts, responses_event
from sidecar.tracking.openai_chunks import (
    STRING_STOP,
    Edit,
    Shape,
    has_output,
    is_terminal,
    plain_chunk,
    shape_of,
    shaped_chunk,
    stripped_shape,
    text_span,
    with_fingerprint,
    without_null_usage,
)
from sidecar.tracking.requests import RequestInfo
from sidecar.tracking.sse import EventSplitter, LineSplitter, Piece, event_data
from sidecar.tracking.wire import (
    count,
    escaped,
    header_count,
    identity,
    json_mime,
    loads,
    model_name,
    usage_cached,
    usage_counts,
)

__all__ = ["Fed", "ResponseTracker", "Usage"]

_SALVAGE_TAIL: Final = 64 * 1024
_USAGE_KEY: Final = re.compile(rb'"usage"\s*:\s*\{')
_MODEL_PAIR: Final = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')
_Mode = Literal["pass", "sse", "ndjson", "json"]


class Fed(NamedTuple):
    """The outcome of one response chunk (a tuple: one is made per chunk, and a
    frozen dataclass costs half as much again to build).

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
    response_id: str | None = field(default=None, compare=False)  # the join with its span
    cached_tokens: int | None = None
    """Of ``prompt_tokens``, those served from the prefix cache (read, not computed)."""


class ResponseTracker:
    """Follows one response body chunk by chunk, learning token times and usage.

    The framing is chosen once from the response headers: SSE for
    ``text/event-stream`` (OpenAI and TGI streams), NDJSON for Ollama, a
    bounded buffer for a plain JSON body, and pass-through for anything it
    cannot read cheaply (compressed bodies, other content types, non-inference
    paths). It keeps at most ``max_buffer`` bytes whatever arrives, and with a
    ``budget`` only what the shared :class:`ParseBudget` grants: past it the
    body passes unparsed (a stripped stream keeps framing: it must, to stay
    byte-exact, and holds one event at a time). :meth:`release` returns the
    reservation; the proxy calls it however the response ends.

    The dialect follows the request's API: OpenAI chunks (most read from
    bytes), Responses and Messages events (only the usage-bearing ones
    decoded), TGI token events or SGLang's cumulative ``meta_info`` counts on
    ``/generate`` (told apart by the shape), Ollama NDJSON.

    With ``strip_usage_chunk`` (only after :func:`inject_include_usage`),
    complete SSE events are released once framed, the usage-only chunk
    (``choices: []`` with a ``usage`` object) is dropped and the
    ``"usage": null`` member the injection made the server add to the other
    chunks is removed, unless ``keep_null_usage`` (a server that writes it
    whether asked or not, such as SGLang); every other byte goes out
    unchanged. A server that reports usage in every chunk on its own (vLLM's
    ``--enable-force-include-usage``) keeps its usage chunk too. Events over the
    cap pass unparsed and unedited. At end of stream the caller must send
    :meth:`flush`'s bytes.
    """

    __slots__ = (
        "_budget",
        "_cached",
        "_completion",
        "_done",
        "_event_head",
        "_event_out",
        "_event_tail",
        "_events",
        "_fingerprint",
        "_info",
        "_json_parts",
        "_json_size",
        "_keep_null",
        "_known_fingerprint",
        "_lines",
        "_max",
        "_mode",
        "_model",
        "_prompt",
        "_reserved",
        "_response_id",
        "_server_usage",
        "_shape",
        "_streamed_usage",
        "_streaming",
        "_strip",
        "_tail",
        "_terminal",
        "_token_events",
        "_usage",
        "null_usage_seen",
    )

    def __init__(
        self,
        info: RequestInfo,
        content_type: str | None,
        content_encoding: str | None,
        headers: Mapping[str, str],
        *,
        strip_usage_chunk: bool = False,
        keep_null_usage: bool = False,
        fingerprint: str | None = None,
        max_buffer: int = 1 << 20,
        budget: ParseBudget | None = None,
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
        self._cached: int | None = None
        self._model: str | None = None
        self._response_id: str | None = None
        self._streamed_usage = 0  # continuous usage: completion tokens already counted
        self._token_events = 0
        self._done = False
        self._usage: Usage | None = None
        self._keep_null = keep_null_usage
        self._server_usage = False  # the server put usage in a content chunk unasked
        self._shape: Shape | None = None  # the stream's plain chunk around its text
        self._event_head = b""  # an SSE event of that shape starts so; b"": not read in place
        self._event_tail = b""  # and ends so
        self._event_out: tuple[bytes, bytes] | None = None  # strip mode: what it goes out as
        self.null_usage_seen = False  # a chunk carried `"usage": null` (see the proxy)
        self._budget = budget
        self._reserved = 0
        self._terminal: list[bytes] = []  # strip mode: terminal chunks awaiting the usage chunk
        self._fingerprint: str | None = None
        self._known_fingerprint = fingerprint  # the upstream's, from an earlier usage chunk
        self._read_headers(headers)

    @property
    def streaming(self) -> bool:
        """Whether the response is a token stream (SSE or NDJSON), whatever the request said:
        read from the content type, so TGI's ``/generate_stream`` and servers that stream by
        default count as streams even when the request body did not say so."""
        return self._streaming

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt count the response reported so far (a usage member, TGI's header)."""
        return self._prompt

    @property
    def held_bytes(self) -> int:
        """Bytes of the body kept right now; never more than ``max_buffer`` (+1 pending CR)."""
        if self._events is not None:
            held = self._events.held_bytes
            return held + sum(len(raw) for raw in self._terminal) if self._terminal else held
        if self._lines is not None:
            return self._lines.held_bytes
        return self._json_size if self._tail is None else len(self._tail)

    def feed(self, chunk: bytes) -> Fed:
        """Take the next response chunk; returns its token events and the bytes to send."""
        head = self._event_head
        if head and chunk.startswith(head) and chunk.endswith(self._event_tail):
            # one event of the stream's shape, a decode step's chunk: _feed_sse's case, inline
            # (text_span's test, which ends with and startswith at the ends already did)
            start, end = len(head), len(chunk) - len(self._event_tail)
            if (
                end >= start
                and STRING_STOP.search(chunk, start, end) is None
                and not self._done
                and not self._terminal
                and not self._reserved
                and len(chunk) <= self._max
                and self._events is not None
                and self._events.idle
            ):
                out = chunk
                if self._event_out is not None:  # strip mode: the "usage": null cut
                    out = self._event_out[0] + chunk[start:end] + self._event_out[1]
                if end > start:
                    self._token_events += 1
                    return Fed(1, out)
                return Fed(0, out)
        if self._done or not chunk:
            return Fed(0, chunk)
        if self._events is not None:
            fed = self._feed_sse(chunk)
            if not self._reserved and self._events.idle and not self._terminal:
                return fed  # nothing held, nothing reserved: the budget has nothing to settle
        elif self._lines is not None:
            fed = Fed(sum(self._on_ndjson(line) for line in self._lines.feed(chunk)), chunk)
        else:
            if self._json_parts is not None or self._tail is not None:
                self._feed_json(chunk)
            fed = Fed(0, chunk)
        if self._budget is not None:
            self._settle()
        return fed

    def release(self) -> None:
        """Give back the budget held for this response; idempotent, parsing stops."""
        if self._budget is not None and self._reserved:
            self._budget.give(self._reserved)
        self._reserved = 0
        self._budget = None

    def _settle(self) -> None:
        """Match the reservation to the bytes held; past the budget, stop parsing."""
        assert self._budget is not None
        need = self.held_bytes - self._reserved
        if need < 0:
            self._budget.give(-need)
            self._reserved += need
        elif need > 0:
            if self._budget.take(need):
                self._reserved += need
            elif not self._strip:  # unparsed from here on; a stripped stream must keep framing
                self._events = self._lines = None
                self._json_parts, self._json_size, self._tail = None, 0, None
                self._mode = "pass"
                self.release()

    def flush(self) -> bytes:
        """End of body: parse what is left and return the bytes still to send.

        Always ``b""`` except in strip mode, where an unterminated last event
        is held until now. Idempotent; :meth:`finish` calls it too.
        """
        if self._done:
            return b""
        self._done = True
        try:
            return self._drain()
        finally:
            self.release()

    def _drain(self) -> bytes:
        if self._events is not None:
            out = self._pieces(self._events.close()).out
            return b"".join([*self._release_terminal(None), out])
        if self._lines is not None:
            for line in self._lines.close():
                self._on_ndjson(line)
        elif self._json_parts is not None:
            self._absorb_json(loads(b"".join(self._json_parts)))
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
            if completion is None and self._info.endpoint in ("embedding", "pooling"):
                completion = 0 if self._prompt is not None else None
            cached = self._cached
            if cached is not None and (self._prompt is None or cached > self._prompt):
                cached = None  # more cached than the prompt: not a count to weigh work by
            self._usage = Usage(
                self._prompt, completion, self._model, self._token_events, self._response_id,
                cached,
            )  # fmt: skip
        return self._usage

    # ------------------------------------------------------------------ internals
    def _read_headers(self, headers: Mapping[str, str]) -> None:
        """TGI reports counts in headers on non-stream responses; the body may refine them."""
        for key, value in headers.items():
            name = key.lower()
            if name == "x-prompt-tokens":
                self._prompt = header_count(value)
            elif name == "x-generated-tokens":
                self._completion = header_count(value)

    def _feed_sse(self, chunk: bytes) -> Fed:
        assert self._events is not None
        if (
            self._events.idle
            and chunk.endswith(b"\n\n")
            and len(chunk) <= self._max
            and chunk[0] != 0x0A  # an empty event first: the splitter's case
            and b"\r" not in chunk
        ):
            if not self._strip:
                return Fed(self._whole_events(chunk), chunk)
            if self._event_head and not self._terminal:  # strip mode: all shaped, or the splitter
                run = self._shaped_run(chunk)
                if run is not None:
                    self._token_events += run[0]
                    return Fed(*run)
        fed = self._pieces(self._events.feed(chunk))
        return fed if self._strip else Fed(fed.tokens, chunk)

    def _learn(self, shape: Shape, data: bytes) -> None:
        """Read the stream's next chunks by ``shape`` (``data``'s), in place where allowed.

        Strip mode holds or edits terminal chunks (the fingerprint): those are not read in
        place. Its ``"usage": null`` cut is the same bytes in every chunk of a shape, so
        those chunks are, and go out as the head and tail cut, with the text between.
        """
        self._shape = shape
        cut: tuple[bytes, bytes] | None = None
        if self._strip and not self._keep_null and shape.edit == "null_usage":
            cut = stripped_shape(shape)
            if cut is None:
                self._event_head = b""
                return
        if self._strip and is_terminal(data):
            self._event_head = b""
            return
        self._event_head, self._event_tail = b"data: " + shape.head, shape.tail + b"\n\n"
        self._event_out = None if cut is None else (b"data: " + cut[0], cut[1] + b"\n\n")

    def _shaped_run(self, chunk: bytes) -> tuple[int, bytes] | None:
        """Token events and bytes out of a chunk of whole events all of the stream's shape;
        ``None`` if one is not. In strip mode such events go out unchanged or cut alike (see
        :meth:`_learn`): a decode step's chunk then skips the splitter and its piece records."""
        head, tail = self._event_head, self._shape.tail if self._shape is not None else b""
        cut = self._event_out
        parts: list[bytes] = []
        tokens, pos, last = 0, 0, len(chunk) - 2  # the events: chunk[:-2] cut at b"\n\n"
        while True:
            stop = chunk.find(b"\n\n", pos, last)
            if stop < 0:
                stop = last
            span = text_span(chunk, pos, stop, head, tail)
            if span is None:
                return None
            start, end = span
            if end > start:
                tokens += 1
            if cut is not None:
                parts += (cut[0], chunk[start:end], cut[1])
            if stop == last:
                return tokens, (chunk if cut is None else b"".join(parts))
            pos = stop + 2

    def _whole_events(self, chunk: bytes) -> int:
        """Token events of a chunk of whole ``\\n``-framed events (what servers flush).

        The splitter would cut it at the same ``\\n\\n`` boundaries; without it there
        is no held state to join and no piece records. An event of the stream's
        :class:`Shape` is read in place, with no slice and no call: a server flushes
        runs of them, and at one call per event the calls were most of the cost.
        """
        tokens, pos, last = 0, 0, len(chunk) - 2  # the events: chunk[:-2] cut at b"\n\n"
        head = self._event_head
        while True:
            stop = chunk.find(b"\n\n", pos, last)
            if stop < 0:  # the last event (a run of three newlines leaves one in it)
                stop = last
            tail = self._event_tail
            start, end = pos + len(head), stop + 2 - len(tail)  # text_span's test, inline
            if (
                head
                and end >= start
                and chunk.startswith(head, pos)
                and chunk.startswith(tail, end)
                and STRING_STOP.search(chunk, start, end) is None
            ):
                if end > start:
                    tokens += 1
                    self._token_events += 1
            else:
                raw = chunk[pos:stop]
                if raw.startswith(b"data: ") and b"\n" not in raw:
                    tokens += self._on_data(raw[6:])[0]
                else:  # several lines, other fields, an empty event: the general reading
                    tokens += self._on_sse(raw + b"\n\n")[0]
                head = self._event_head  # a shape learned there reads the next events
            if stop == last:
                return tokens
            pos = stop + 2

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
                    if edit == "drop" and not self._server_usage:
                        out.extend(self._release_terminal(self._fingerprint))
                        continue
                    if edit == "null_usage" and not self._keep_null:
                        raw = without_null_usage(raw)
                    if (
                        not self._server_usage  # a server that sends usage unasked moved nothing
                        and is_terminal(raw)
                        and b'"system_fingerprint"' not in raw
                    ):
                        if self._known_fingerprint is not None:
                            raw = with_fingerprint(raw, self._known_fingerprint)
                        else:
                            self._terminal.append(raw)  # may gain the usage chunk's fingerprint
                            continue
            if self._strip:
                out.extend(self._release_terminal(None))
                out.append(raw)
        return Fed(tokens, out[0] if len(out) == 1 else b"".join(out))

    def _release_terminal(self, fingerprint: str | None) -> list[bytes]:
        """The held terminal chunks, with ``fingerprint`` added where the server would have.

        vLLM stamps ``system_fingerprint`` on each choice's terminal chunk (the one
        with a ``finish_reason``) unless usage was asked for; then only the usage
        chunk carries it. Dropping that chunk, strip mode moves its fingerprint
        back, as the last member, which is where vLLM writes it.
        """
        if not self._terminal:
            return []
        held, self._terminal = self._terminal, []
        if fingerprint is None:
            return held
        return [with_fingerprint(raw, fingerprint) for raw in held]

    @property
    def usage_fingerprint(self) -> str | None:
        """The ``system_fingerprint`` of the dropped usage chunk, for the upstream's next streams.

        Known in advance, it goes on each terminal chunk at once: with several
        choices (``n`` > 1) their terminal chunks come before the usage chunk,
        interleaved with other choices' chunks, so they cannot all be held.
        """
        return self._fingerprint

    def _on_sse(self, raw: bytes) -> tuple[int, Edit]:
        """Token events in one SSE event, and what strip mode must do to it.

        With ``include_usage`` an OpenAI-conformant server sends one extra
        chunk (``choices: []`` and a ``usage`` object: dropped) and puts
        ``"usage": null`` in every other chunk ("All other chunks will also
        include a usage field, but with a null value"): that member is removed
        too, so a client that did not ask sees the bytes it would have seen.
        """
        return self._on_data(event_data(raw))

    def _on_data(self, data: bytes | None) -> tuple[int, Edit]:
        """:meth:`_on_sse` from the event's joined ``data`` field."""
        if data is None or data.startswith(b"[DONE]"):
            return 0, "keep"
        api = self._info.api
        if api == "responses" or api == "anthropic":
            scan = responses_event(data) if api == "responses" else anthropic_event(data)
            return self._scanned(scan, data), "keep"
        if api == "tgi" and b'"meta_info"' in data:
            return self._sglang(data), "keep"
        if self._model is not None:
            shape = self._shape
            fast = None if shape is None else shaped_chunk(data, shape)
            if fast is None:
                fast = plain_chunk(data)
                if fast is not None and fast[0]:  # the next chunks are likely this one's shape
                    learned = shape_of(data, fast[1])
                    if learned is not None:
                        self._learn(learned, data)
            if fast is not None:  # most events of a stream: counted without decoding JSON
                self._token_events += fast[0]
                if fast[1] == "null_usage":
                    self.null_usage_seen = True
                return fast
        obj = loads(data)
        if not isinstance(obj, dict):
            return 0, "keep"
        self._absorb(obj)
        choices = obj.get("choices")
        usage = obj.get("usage")
        edit: Edit = "null_usage" if "usage" in obj and usage is None else "keep"
        if edit == "null_usage":
            self.null_usage_seen = True
        if isinstance(choices, list):
            if not choices and isinstance(usage, dict):
                fingerprint = obj.get("system_fingerprint")
                self._fingerprint = fingerprint if isinstance(fingerprint, str) else None
                return 0, "drop"
            if choices and isinstance(usage, dict):
                self._server_usage = True
            count = self._openai_tokens(choices, usage)
        else:
            count = 1 if isinstance(obj.get("token"), dict) else 0  # TGI token event
        self._token_events += count
        return count, edit

    def _scanned(self, scan: Scan, data: bytes) -> int:
        """Responses and Messages events: a token time, or the usage of a final event."""
        if scan == "token":
            self._token_events += 1
            return 1
        if scan == "parse":
            obj = loads(data)
            if isinstance(obj, dict):
                self._absorb(obj)
        return 0

    def _sglang(self, data: bytes) -> int:
        """SGLang ``/generate``: cumulative counts in every event; new tokens are the increase."""
        prompt, cumulative = meta_counts(data)
        if prompt is not None:
            self._prompt = prompt
        if cumulative is None:
            return 0
        self._completion = cumulative
        new = max(cumulative - self._streamed_usage, 0)
        self._streamed_usage = max(cumulative, self._streamed_usage)
        self._token_events += new
        return new

    def _openai_tokens(self, choices: list[object], usage: object) -> int:
        """One per choice with output, unless the chunk reports cumulative usage (vLLM)."""
        if isinstance(usage, dict):
            cumulative = count(usage.get("completion_tokens"))
            if cumulative is not None:
                new = max(cumulative - self._streamed_usage, 0)
                self._streamed_usage = max(cumulative, self._streamed_usage)
                return new
        return sum(1 for choice in choices if has_output(choice))

    def _on_ndjson(self, line: bytes) -> int:
        """Ollama: every ``done: false`` object is a token; counts ride on the last one."""
        obj = loads(line) if line.strip() else None
        if not isinstance(obj, dict):
            return 0
        self._absorb(obj)
        prompt = count(obj.get("prompt_eval_count"))
        if prompt is not None:
            self._prompt = prompt
        completion = count(obj.get("eval_count"))
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
        if isinstance(obj, list) and obj and all(isinstance(o, dict) for o in obj):
            metas = [o.get("meta_info") for o in obj]
            if all(isinstance(m, dict) for m in metas):  # SGLang batch: one entry per prompt
                self._sum_meta([m for m in metas if isinstance(m, dict)])
                self._absorb({"model": obj[0].get("model")})
                return
            obj = obj[0]  # TGI's compatibility route answers a one-element list
        if isinstance(obj, dict):
            self._absorb(obj)

    def _sum_meta(self, metas: list[dict[str, object]]) -> None:
        prompts = [count(m.get("prompt_tokens")) for m in metas]
        completions = [count(m.get("completion_tokens")) for m in metas]
        cached = [count(m.get("cached_tokens")) for m in metas]
        self._take(
            sum(p for p in prompts if p is not None) if None not in prompts else None,
            sum(c for c in completions if c is not None) if None not in completions else None,
        )
        if None not in cached:  # SGLang's own count of prompt tokens read from its cache
            self._cached = sum(c for c in cached if c is not None)

    def _absorb(self, obj: dict[str, object]) -> None:
        """Model and counts wherever a dialect puts them.

        OpenAI ``usage`` (``prompt_tokens``/``completion_tokens``), Responses
        and Messages ``usage`` (``input_tokens``/``output_tokens``, nested in
        ``response`` or ``message`` when streamed), TGI ``details``, SGLang
        ``meta_info``.
        """
        model = model_name(obj.get("model"))
        if model is not None:
            self._model = model
        rid = obj.get("id")
        if self._response_id is None and isinstance(rid, str) and 0 < len(rid) <= 256:
            self._response_id = rid
        for key in ("response", "message"):  # Responses' final event, Messages' message_start
            inner = obj.get(key)
            if isinstance(inner, dict):
                self._absorb(inner)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._take(*usage_counts(usage))
            cached = usage_cached(usage)
            if cached is not None:
                self._cached = cached
        details = obj.get("details")
        if isinstance(details, dict):
            self._take(count(details.get("input_length")), count(details.get("generated_tokens")))
        meta = obj.get("meta_info")
        if isinstance(meta, dict):
            self._sum_meta([meta])

    def _take(self, prompt: int | None, completion: int | None) -> None:
        if prompt is not None:
            self._prompt = prompt
        if completion is not None:
            self._completion = completion

    def _salvage(self, tail: bytes) -> None:
        """Over-cap bodies (large embedding batches) end with ``usage``: read it from the tail."""
        matches = [m for m in _USAGE_KEY.finditer(tail) if not escaped(tail, m.start())]
        if matches:
            brace = matches[-1].end() - 1
            try:
                usage, _ = json.JSONDecoder().raw_decode(tail[brace:].decode("utf-8", "replace"))
            except ValueError:
                usage = None
            if isinstance(usage, dict):
                self._absorb({"usage": usage})
        models = [m for m in _MODEL_PAIR.finditer(tail) if not escaped(tail, m.start())]
        if models:
            self._absorb({"model": loads(models[-1].group(1))})


def _choose_mode(info: RequestInfo, content_type: str | None, encoding: str | None) -> _Mode:
    """Pick the framing once, from what the response says it is."""
    if info.endpoint == "other" or info.api == "none" or not identity(encoding):
        return "pass"
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime == "text/event-stream" or (not mime and info.stream and info.api != "ollama"):
        return "sse"
    if mime == "application/x-ndjson" or (info.api == "ollama" and json_mime(mime)):
        return "ndjson"
    if json_mime(mime):
        return "json"
    return "pass"


def _is_stream(info: RequestInfo, content_type: str | None) -> bool:
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in ("text/event-stream", "application/x-ndjson"):
        return True
    return not mime and info.stream
