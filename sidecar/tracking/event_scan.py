"""Stream events of the Responses, Messages and SGLang APIs, read from bytes.

Only the few events that carry usage are decoded as JSON (``response.completed``,
``message_start``, ``message_delta``); text deltas, the bulk of a stream, are
counted from their bytes, and SGLang's cumulative ``meta_info`` counts are read
with one regular expression. A quote inside a JSON string is escaped, so a
match outside strings is a real member.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from sidecar.tracking.wire import escaped

__all__ = ["Scan", "anthropic_event", "meta_counts", "responses_event"]

Scan = Literal["skip", "token", "parse"]
"""What an event needs: nothing, one token time, or a full JSON parse for its usage."""

# Responses API: the final event (completed, incomplete or failed) holds `usage`.
_RESPONSES_FINAL: Final = re.compile(rb'"type"\s*:\s*"response\.(?:completed|incomplete|failed)"')
_RESPONSES_DELTA: Final = re.compile(
    rb'"type"\s*:\s*"response\.(?:output_text|reasoning_text|reasoning_summary_text|refusal'
    rb'|function_call_arguments)\.delta"'
)
_ANTHROPIC_USAGE: Final = re.compile(rb'"type"\s*:\s*"message_(?:start|delta)"')
_ANTHROPIC_DELTA: Final = re.compile(rb'"type"\s*:\s*"content_block_delta"')
_NON_EMPTY_DELTA: Final = re.compile(rb'"delta"\s*:\s*"(?!")')
_NON_EMPTY_BLOCK: Final = re.compile(rb'"(?:text|thinking|partial_json)"\s*:\s*"(?!")')
_META_COUNT: Final = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')


def responses_event(data: bytes) -> Scan:
    """A Responses stream event: its final event is parsed, a non-empty delta is a token."""
    if _RESPONSES_FINAL.search(data):
        return "parse"
    if _RESPONSES_DELTA.search(data):
        return "token" if _NON_EMPTY_DELTA.search(data) else "skip"
    return "skip"


def anthropic_event(data: bytes) -> Scan:
    """A Messages stream event: ``message_start``/``message_delta`` parsed, text deltas counted."""
    if _ANTHROPIC_USAGE.search(data):
        return "parse"
    if _ANTHROPIC_DELTA.search(data):
        return "token" if _NON_EMPTY_BLOCK.search(data) else "skip"
    return "skip"


def meta_counts(data: bytes) -> tuple[int | None, int | None]:
    """SGLang's ``meta_info`` (prompt, completion) counts in one event; the last match wins.

    SGLang repeats the cumulative counts in every streamed event, so the
    event is never decoded; ``None`` where a count is absent.
    """
    prompt = completion = None
    for m in _META_COUNT.finditer(data):
        if escaped(data, m.start()):
            continue
        if m.group(1) == b"prompt_tokens":
            prompt = int(m.group(2))
        else:
            completion = int(m.group(2))
    return prompt, completion
