"""Property-based tests of the response tracker: chunking never matters, bytes are never changed."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.tracking.openai_chunks import (
    has_output,
    is_terminal,
    plain_chunk,
    shape_of,
    shaped_chunk,
    without_null_usage,
)
from sidecar.tracking.protocols import RequestInfo, ResponseTracker, Usage
from sidecar.tracking.sse import EventSplitter, Piece

CHAT = RequestInfo("chat", "openai", "m", True, 3, False)
OLLAMA = RequestInfo("chat", "ollama", "m", True, 3, False)


def feed_all(
    req: RequestInfo,
    ctype: str | None,
    chunks: list[bytes],
    *,
    strip: bool,
    max_buffer: int,
    encoding: str | None = None,
) -> tuple[bytes, int, Usage]:
    tracker = ResponseTracker(
        req, ctype, encoding, {}, strip_usage_chunk=strip, max_buffer=max_buffer
    )
    out = bytearray()
    tokens = 0
    for chunk in chunks:
        fed = tracker.feed(chunk)
        if not strip:
            assert fed.out == chunk
        out += fed.out
        tokens += fed.tokens
        assert tracker.held_bytes <= max_buffer + 1
    out += tracker.flush()
    return bytes(out), tokens, tracker.finish()


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(body)) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, bytes, int]:
    """A stream of assorted events, the same stream minus its usage events, and its token count."""
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    kinds = draw(
        st.lists(
            st.sampled_from(
                ["token", "role", "usage", "comment", "junk", "big", "multi", "shaped", "tool"]
            ),
            max_size=12,
        )
    )
    body = bytearray()
    stripped = bytearray()
    tokens = 0
    for kind in kinds:
        obj: Any
        if kind == "token":
            obj = {"choices": [{"delta": {"content": draw(st.text(max_size=20))}}]}
            tokens += 1 if obj["choices"][0]["delta"]["content"] else 0
        elif kind == "role":
            obj = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
        elif kind == "usage":
            obj = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": tokens}}
        elif kind in ("shaped", "tool"):  # a server's template: the shape of a stream
            text = draw(st.text(max_size=6))
            delta: dict[str, Any] = {"content": text}
            if kind == "tool":
                delta = draw(st.sampled_from([{"content": text, "tool_calls": [{"index": 0}]},
                    {"content": text, "role": "x"}, {"role": "x", "content": text}]))  # fmt: skip
            obj = {"id": "c", "created": 1, "model": "m", "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}  # fmt: skip
            tokens += 1 if text or "tool_calls" in delta else 0
            ascii_only = draw(st.booleans())
            compact = json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii_only)
            event = b"data: " + compact.encode() + eol + eol
            if draw(st.booleans()):  # asked for usage: `"usage":null` in it, cut in strip mode
                asked = json.dumps({**obj, "usage": None}, separators=(",", ":"),
                                   ensure_ascii=ascii_only)  # fmt: skip
                body += b"data: " + asked.encode() + eol + eol
                stripped += event
                continue
        elif kind == "big":
            obj = {"choices": [{"delta": {"content": "x" * 3000}}]}  # over the 2 KiB cap
        else:
            obj = None
        if kind == "comment":
            event = b": keep-alive" + eol + eol
        elif kind == "junk":
            event = b"data: {oops" + eol + b"id: 7" + eol + eol
        elif kind == "multi":  # a JSON object spread over two data lines
            event = b'data: {"choices":' + eol + b'data: [{"text": "t"}]}' + eol + eol
            tokens += 1
        elif kind not in ("shaped", "tool"):
            event = b"data: " + json.dumps(obj).encode() + eol + eol
        if kind == "token" and draw(st.booleans()):
            # include_usage makes conformant servers add `"usage": null`; strip mode removes it
            body += b"data: " + json.dumps({**obj, "usage": None}).encode() + eol + eol
        else:
            body += event
        if kind != "usage":
            stripped += event
    body += b"data: [DONE]" + eol + eol
    stripped += b"data: [DONE]" + eol + eol
    return bytes(body), bytes(stripped), tokens


cut_lists = st.lists(st.integers(0, 20_000), max_size=20)


@settings(max_examples=300, deadline=None)
@given(sse_streams(), cut_lists)
def test_sse_chunking_never_matters(stream: tuple[bytes, bytes, int], cuts: list[int]) -> None:
    """Any chunking gives the whole stream's tokens and usage, and strips exactly the usage events."""
    body, stripped, tokens = stream
    whole = feed_all(CHAT, "text/event-stream", [body], strip=False, max_buffer=2048)
    assert whole[0] == body
    assert whole[1] == tokens
    blank = next((e + e for e in (b"\r\n", b"\r", b"\n") if e in body), b"\n\n")
    by_event = [e + blank for e in body.split(blank)[:-1]]  # a server's flush per event
    assert b"".join(by_event) == body
    for strip in (False, True):
        for chunks in (split(body, cuts), by_event, [body]):
            out, n, usage = feed_all(
                CHAT, "text/event-stream", chunks, strip=strip, max_buffer=2048
            )
            assert out == (stripped if strip else body)
            assert (n, usage) == whole[1:]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"response": st.text(max_size=30), "done": st.booleans()},
            optional={"eval_count": st.integers(0, 10**6)},
        ),
        max_size=10,
    ),
    cut_lists,
)
def test_ndjson_chunking_never_matters(objs: list[dict[str, Any]], cuts: list[int]) -> None:
    """Any chunking of an Ollama stream gives the same token events and counts."""
    body = b"".join(json.dumps(o).encode() + b"\n" for o in objs)
    # a cap that no line reaches (a 30-character response escapes to 360 bytes at most)
    whole = feed_all(OLLAMA, "application/x-ndjson", [body], strip=False, max_buffer=1024)
    chunked = feed_all(
        OLLAMA, "application/x-ndjson", split(body, cuts), strip=False, max_buffer=1024
    )
    assert chunked == whole
    assert whole[1] == sum(1 for o in objs if o["done"] is False)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=4000),
    cut_lists,
    st.sampled_from(
        [
            (CHAT, "text/event-stream"),
            (CHAT, "application/json"),
            (CHAT, None),
            (OLLAMA, "application/x-ndjson"),
            (OLLAMA, "application/json"),
            (CHAT, "text/plain"),
        ]
    ),
    st.sampled_from([None, "identity", "gzip"]),
    st.integers(1, 600),
)
def test_arbitrary_bytes_never_raise_or_change(
    body: bytes,
    cuts: list[int],
    shape: tuple[RequestInfo, str | None],
    encoding: str | None,
    max_buffer: int,
) -> None:
    """Random bytes in any framing pass through unchanged, never raise, stay under the cap."""
    req, ctype = shape
    for strip in (False, True):
        out, _, _ = feed_all(
            req, ctype, split(body, cuts), strip=strip, max_buffer=max_buffer, encoding=encoding
        )
        assert out == body


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"data:",
                b" ",
                b"{",
                b"}",
                b'"choices"',
                b":",
                b"[]",
                b'"usage"',
                b"{}",
                b"\n",
                b"\r",
                b"x",
            ]
        ),
        max_size=80,
    ),
    cut_lists,
    st.integers(1, 64),
)
def test_sse_like_noise_is_chunking_invariant(
    parts: list[bytes], cuts: list[int], max_buffer: int
) -> None:
    """Near-SSE noise gives the same output and counts whatever the chunking, in strip mode too."""
    body = b"".join(parts)
    for strip in (False, True):
        whole = feed_all(CHAT, "text/event-stream", [body], strip=strip, max_buffer=max_buffer)
        chunked = feed_all(
            CHAT, "text/event-stream", split(body, cuts), strip=strip, max_buffer=max_buffer
        )
        assert chunked == whole
        if not strip:
            assert whole[0] == body


class _GeneralOnly(EventSplitter):
    """The splitter with its ``\\n``-only shortcut turned off: the reference for it."""

    def _scan_lf(self, buf: bytes) -> list[Piece]:
        return self._scan_any(buf, eof=False)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"data: x", b"data: {}", b"\n", b"id: 1", b": c", b"d"]), max_size=40
    ),
    cut_lists,
    st.integers(1, 40),
    st.booleans(),
)
def test_lf_shortcut_frames_like_the_general_scan(
    parts: list[bytes], cuts: list[int], max_buffer: int, hold: bool
) -> None:
    """On `\\n`-only streams the find-based scan yields the general scan's pieces, cut anywhere."""
    body = b"".join(parts)
    fast, general = EventSplitter(max_buffer, hold=hold), _GeneralOnly(max_buffer, hold=hold)
    for chunk in split(body, cuts):
        assert fast.feed(chunk) == general.feed(chunk)
        assert fast.held_bytes == general.held_bytes
    assert fast.close() == general.close()


_SPACINGS = [(",", ":"), (", ", ": "), (",  ", " :  ")]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(_SPACINGS),
    st.sampled_from(["content", "text", "reasoning_content", "reasoning"]),
    st.text(max_size=6),
    st.sampled_from([None, "stop", "length"]),
    st.booleans(),
)
def test_byte_reading_of_a_chunk_agrees_with_its_json(
    sep: tuple[str, str], key: str, text: str, finish: str | None, null_usage: bool
) -> None:
    """Token, `usage: null` and terminal readings from bytes match the decoded chunk, any spacing."""
    choice = {"index": 0, "delta": {key: text}, "finish_reason": finish}
    obj: dict[str, Any] = {"id": "c", "model": "m", "choices": [choice]}
    if null_usage:
        obj["usage"] = None
    data = json.dumps(obj, separators=sep).encode()
    reading = plain_chunk(data)
    if reading is None:  # unsure, and the full parse reads it: only where a key's name shows
        assert text in (
            "tool_calls",
            "function_call",
            "token",
            "details",
            "error",
            "usage",
            "index",
        )
    else:
        assert reading == (1 if text else 0, "null_usage" if null_usage else "keep")
    assert is_terminal(data) == (finish is not None)
    cut = without_null_usage(data)
    assert json.loads(cut) == {k: v for k, v in obj.items() if k != "usage"}
    assert (cut == data) == (not null_usage)


_TEXT = ("content", "text", "reasoning_content", "reasoning")
_DELTAS = st.dictionaries(
    st.sampled_from([*_TEXT, "role", "tool_calls"]),
    st.one_of(st.text(max_size=4), st.none(), st.just([{"index": 0}])),
    max_size=3,
)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(_SPACINGS),
    st.sampled_from(["content", "text", "reasoning_content", "reasoning"]),
    st.text(
        st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters='"\\'),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
    _DELTAS,
    st.text(max_size=6),
    st.booleans(),
    st.sampled_from([None, "stop"]),
    st.booleans(),
)
def test_a_chunk_read_by_its_streams_shape_reads_as_plain_chunk_reads_it(
    sep: tuple[str, str],
    key: str,
    first: str,
    null_usage: bool,
    delta: dict[str, Any],
    text: str,
    ascii_only: bool,
    finish: str | None,
    alone: bool,
) -> None:
    """The shape of one plain chunk never reads another chunk otherwise than the full reading.

    The next chunk is the first with other text (quotes, escapes, control
    characters, any Unicode), or a chunk of another form altogether: other
    delta members, a finish reason, tool calls.
    """

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj: dict[str, Any] = {"id": "c", "created": 1, "model": "m", "choices": [choice]}
        if null_usage:
            obj["usage"] = None
        return json.dumps(obj, separators=sep, ensure_ascii=ascii_only).encode()

    assume(first not in _TEXT)  # a text that is a key's name is one more key: no shape
    learned_delta = {key: first} if alone else {**delta, key: first}
    learned = chunk(learned_delta, None)
    reading = plain_chunk(learned)
    if reading is None:
        # tool calls or a second index: the full parse's cases
        assert "tool_calls" in delta or any(isinstance(v, list) for v in delta.values())
        return
    assert reading == (1, "null_usage" if null_usage else "keep")
    shape = shape_of(learned, reading[1])
    if sep[1] not in (":", ": ") or any(k in learned_delta for k in _TEXT if k != key):
        assert shape is None  # other spacing, other text members: every chunk takes plain_chunk
        return
    assert shape is not None
    assert shaped_chunk(learned, shape) == reading
    rest = {k: v for k, v in delta.items() if k != key}
    others = [{key: text}, {**delta, key: text}, {**learned_delta, key: text}, {key: text, **rest}]
    for other in (chunk(d, f) for d in others for f in (None, finish)):
        fast = shaped_chunk(other, shape)
        if fast is not None:  # plain_chunk's reading, or the full parse's where it is unsure
            (choice,) = json.loads(other)["choices"]
            # the byte reading takes a text member in the delta whatever its name
            texts = [v for k, v in choice["delta"].items() if k in _TEXT and isinstance(v, str)]
            full = (1 if has_output(choice) or any(texts) else 0, reading[1])
            assert fast == (plain_chunk(other) or full)
    assert shaped_chunk(chunk({**learned_delta, key: "plain text"}, None), shape) == reading
    assert shaped_chunk(chunk({**learned_delta, key: ""}, None), shape) == (0, reading[1])
