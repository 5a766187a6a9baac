"""OpenAI stream chunks read at the byte level: the hot path of a proxied stream.

A stream is mostly one-choice chunks with one delta of text; decoding each as
JSON was the proxy's largest cost, so these helpers answer from bytes and
leave anything unusual to a full parse.
"""

from __future__ import annotations

import re
from typing import Final, Literal

__all__ = ["Edit", "has_output", "plain_chunk", "without_null_usage"]

Edit = Literal["keep", "drop", "null_usage"]
# A top-level `"usage": null` member, after another member or before one. A quote
# inside a JSON string is escaped, so these cannot match inside text.
_NULL_USAGE_AFTER: Final = re.compile(rb'[ \t]*,[ \t]*"usage"[ \t]*:[ \t]*null(?=[ \t]*[,}])')
_NULL_USAGE_FIRST: Final = re.compile(rb'(?<=\{)[ \t]*"usage"[ \t]*:[ \t]*null[ \t]*,[ \t]*')

_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null\s*[,}]')
_TEXT = re.compile(rb'"(?:content|text|reasoning_content|reasoning)"\s*:\s*"(?!")')
_COMPLEX = re.compile(rb'"(?:tool_calls|function_call|token|details|error)"')


def plain_chunk(data: bytes) -> tuple[int, Edit] | None:
    """A plain one-choice OpenAI chunk, read without decoding it; ``None`` when unsure.

    A stream is mostly such chunks (one delta of text each); decoding every one
    as JSON was the proxy's largest cost. Anything that might carry usage, tool
    calls, TGI fields, errors or several choices takes the full parse.
    """
    if data.count(b'"index"') != 1 or b'"choices"' not in data:
        return None
    if _COMPLEX.search(data):
        return None
    edit: Edit = "keep"
    if b'"usage"' in data:
        if data.count(b'"usage"') != 1 or not _NULL_USAGE.search(data):
            return None
        edit = "null_usage"
    return (1 if _TEXT.search(data) else 0), edit


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
    for pattern in (_NULL_USAGE_AFTER, _NULL_USAGE_FIRST):
        matches = pattern.findall(raw)
        if len(matches) == 1:
            return pattern.sub(b"", raw, count=1)
        if matches:
            return raw
    return raw
