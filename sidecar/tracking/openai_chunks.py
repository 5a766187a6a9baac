"""OpenAI stream chunks read at the byte level: the hot path of a proxied stream.

A stream is mostly one-choice chunks with one delta of text; decoding each as
JSON was the proxy's largest cost, so these helpers answer from bytes and
leave anything unusual to a full parse.
"""

from __future__ import annotations

import json
import re
from typing import Final, Literal, NamedTuple

__all__ = [
    "STRING_STOP",
    "Edit",
    "Shape",
    "has_output",
    "is_terminal",
    "plain_chunk",
    "shape_of",
    "shaped_chunk",
    "stripped_shape",
    "text_span",
    "with_fingerprint",
    "without_null_usage",
]

Edit = Literal["keep", "drop", "null_usage"]
# A top-level `"usage": null` member, after another member or before one. A quote
# inside a JSON string is escaped, so these cannot match inside text.
_NULL_USAGE_AFTER: Final = re.compile(rb'[ \t]*,[ \t]*"usage"[ \t]*:[ \t]*null(?=[ \t]*[,}])')
_NULL_USAGE_FIRST: Final = re.compile(rb'(?<=\{)[ \t]*"usage"[ \t]*:[ \t]*null[ \t]*,[ \t]*')

_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null\s*[,}]')
_TEXT = re.compile(rb'"(?:content|text|reasoning_content|reasoning)"\s*:\s*"(?!")')
_TEXT_KEYS: Final = (b'"content"', b'"text"', b'"reasoning_content"', b'"reasoning"')
_BLANKS: Final = b" \t"  # the patterns also cut blanks before the comma: leave those to them
_SEPARATORS: Final = {b':"': 2, b': "': 3}  # after a key: where its string value starts
_TERMINAL: Final = re.compile(rb'"finish_reason"\s*:\s*"')
_COMPLEX: Final = re.compile(rb'"(?:tool_calls|function_call|token|details|error)"')
"""Keys that send a chunk to the full parse: one search, not one ``in`` per key (half the cost)."""
STRING_STOP: Final = re.compile(rb'["\\\x00-\x1f]')
"""What ends a JSON string's plain run of bytes: its closing quote, an escape, a control byte."""


class Shape(NamedTuple):
    """A stream's plain chunk around its text value: the bytes before it and after it.

    A server writes every chunk of a stream from one template (the same id,
    ``created``, model, index and nulls); only the text changes. A chunk that
    starts with ``head``, ends with ``tail`` and has a plain string between
    is that chunk with other text, so it reads as :func:`plain_chunk` read
    the chunk the shape was taken from, for the price of two compares and one
    scan of the text.
    """

    head: bytes
    tail: bytes
    edit: Edit


def plain_chunk(data: bytes) -> tuple[int, Edit] | None:
    """A plain one-choice OpenAI chunk, read without decoding it; ``None`` when unsure.

    A stream is mostly such chunks (one delta of text each); decoding every one
    as JSON was the proxy's largest cost, and a regular expression per key
    still was a large part of what was left, so keys are found with
    ``bytes.find`` and a pattern runs only where the compact form is absent.
    Anything that might carry usage, tool calls, TGI fields, errors or several
    choices takes the full parse.
    """
    if data.count(b'"index"') != 1 or b'"choices"' not in data or _COMPLEX.search(data):
        return None
    edit: Edit = "keep"
    at = data.find(b'"usage"')
    if at >= 0:
        if data.find(b'"usage"', at + 7) >= 0 or not _null_usage(data, at + 7):
            return None
        edit = "null_usage"
    return (1 if _has_text(data) else 0), edit


def shape_of(data: bytes, edit: Edit) -> Shape | None:
    """The shape of a chunk :func:`plain_chunk` read as one token with ``edit``, if it has one.

    It needs exactly one text member, a string with no escapes: the other
    members are then bytes that cannot move the reading (any other text key,
    empty or not, would).
    """
    key = b""
    for candidate in _TEXT_KEYS:
        n = data.count(candidate)
        if n > 1 or (n and key):
            return None
        if n:
            key = candidate
    if not key:
        return None
    after = data.find(key) + len(key)
    sep = _SEPARATORS.get(data[after : after + 3], 0) or _SEPARATORS.get(data[after : after + 2], 0)
    if not sep:
        return None
    start = after + sep
    stop = STRING_STOP.search(data, start)
    if stop is None or stop.group() != b'"' or stop.start() == start:
        return None
    return Shape(data[:start], data[stop.start() :], edit)


def stripped_shape(shape: Shape) -> tuple[bytes, bytes] | None:
    """The bytes around the text once :func:`without_null_usage` cut a chunk of ``shape``.

    The member cut is in the head or the tail, never in the text (it holds quotes, the
    text none), so every chunk of the shape loses the same bytes; two probe texts find
    them. ``None`` if nothing is cut.
    """
    one = without_null_usage(shape.head + b"x" + shape.tail)
    two = without_null_usage(shape.head + b"yy" + shape.tail)
    at = next((i for i, (a, b) in enumerate(zip(one, two, strict=False)) if a != b), -1)
    if at < 0 or one == shape.head + b"x" + shape.tail:
        return None
    head, tail = one[:at], one[at + 1 :]
    return (head, tail) if two == head + b"yy" + tail else None


def text_span(buf: bytes, pos: int, stop: int, head: bytes, tail: bytes) -> tuple[int, int] | None:
    """Where the text is in ``buf[pos:stop]`` if that is ``head``, a plain string, ``tail``
    (a chunk of a :class:`Shape`); ``None`` if it is not. The tracker's two hottest loops
    inline this test (a call per event was most of their cost); it is their reference."""
    start, end = pos + len(head), stop - len(tail)
    if (
        end >= start
        and buf.startswith(head, pos)
        and buf.startswith(tail, end)
        and STRING_STOP.search(buf, start, end) is None
    ):
        return start, end
    return None


def shaped_chunk(data: bytes, shape: Shape) -> tuple[int, Edit] | None:
    """:func:`plain_chunk`'s reading of a chunk of this ``shape``; ``None`` if it is not one."""
    span = text_span(data, 0, len(data), shape.head, shape.tail)
    if span is None:
        return None
    return (1 if span[1] > span[0] else 0), shape.edit


def _has_text(data: bytes) -> bool:
    """Whether a text member is a non-empty string; compact JSON (``"content":"x"``) first."""
    spaced = False
    for key in _TEXT_KEYS:
        at = data.find(key)
        if at < 0:
            continue
        after = at + len(key)
        sep = _SEPARATORS.get(data[after : after + 3], 0) or _SEPARATORS.get(
            data[after : after + 2], 0
        )
        if sep:
            if data[after + sep : after + sep + 1] != b'"':
                return True
            if data.count(key) == 1:
                continue  # the one such member is empty
        spaced = True  # another spelling, or the key twice: let the pattern decide
    return spaced and _TEXT.search(data) is not None


def _null_usage(data: bytes, after: int) -> bool:
    """Whether the one ``"usage"`` key, ending at ``after``, is ``null``: compact or
    Python-spaced read in place, other spacing by the pattern."""
    for form in (b":null", b": null"):
        end = after + len(form)
        if data[after:end] == form:
            return data[end : end + 1] in (b",", b"}")
    return _NULL_USAGE.search(data) is not None


def has_output(choice: object) -> bool:
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


def without_null_usage(raw: bytes) -> bytes:
    """``raw`` minus its one ``"usage": null`` member; unchanged unless exactly one is found."""
    if raw.count(b'"usage"') == 1:  # the usual spellings, cut without a pattern
        for form in (b',"usage":null', b', "usage": null'):
            at = raw.find(form)
            end = at + len(form)
            if at > 0 and raw[at - 1] not in _BLANKS and raw[end : end + 1] in (b",", b"}"):
                return raw[:at] + raw[end:]
    for pattern in (_NULL_USAGE_AFTER, _NULL_USAGE_FIRST):
        matches = pattern.findall(raw)
        if len(matches) == 1:
            return pattern.sub(b"", raw, count=1)
        if matches:
            return raw
    return raw


def is_terminal(raw: bytes) -> bool:
    """Whether a chunk event has a ``finish_reason`` string (most have ``null``: one find)."""
    at = raw.find(b'"finish_reason"')
    if at < 0:
        return False
    after = raw[at + 15 : at + 18]
    if after.startswith((b':"', b': "')):
        return True
    if after.startswith((b":n", b": n")) and raw.count(b'"finish_reason"') == 1:
        return False  # null
    return _TERMINAL.search(raw) is not None


def with_fingerprint(raw: bytes, fingerprint: str) -> bytes:
    """One chunk event with ``system_fingerprint`` as its last member, as vLLM writes it."""
    end = raw.rfind(b"}")
    if end <= 0:
        return raw
    return raw[:end] + b',"system_fingerprint":' + json.dumps(fingerprint).encode() + raw[end:]
