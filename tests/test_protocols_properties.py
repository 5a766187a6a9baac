"""Property-based tests of the response tracker: chunking never matters, bytes are never changed."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.tracking.openai_chunks import is_terminal, plain_chunk, without_null_usage
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
            st.sampled_from(["token", "role", "usage", "comment", "junk", "big", "multi"]),
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
        else:
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
    for strip in (False, True):
        out, n, usage = feed_all(
            CHAT, "text/event-stream", split(body, cuts), strip=strip, max_buffer=2048
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
    whole = feed_all(OLLAMA, "application/x-ndjson", [body], strip=False, max_buffer=256)
    chunked = feed_all(
        OLLAMA, "application/x-ndjson", split(body, cuts), strip=False, max_buffer=256
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
    assert plain_chunk(data) == (1 if text else 0, "null_usage" if null_usage else "keep")
    assert is_terminal(data) == (finish is not None)
    cut = without_null_usage(data)
    assert json.loads(cut) == {k: v for k, v in obj.items() if k != "usage"}
    assert (cut == data) == (not null_usage)
