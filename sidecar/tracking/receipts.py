"""Energy receipts: each SSE response tells its client what the request cost.

The receipt goes out as an SSE comment (conforming clients ignore comments),
after the upstream's last byte and before a held-back ``data: [DONE]``. The
request's end for attribution is that last byte: the meter is told first,
then the proxy waits at most :data:`WAIT_S` for the figure to become final.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Final

import structlog

from sidecar.carbon.emissions import operational_grams
from sidecar.ledger import FinishedRequest
from sidecar.meter import Meter

log = structlog.get_logger("sidecar.proxy")

WAIT_S: Final = 0.5
"""The most a stream's end is held for its request's energy to become final."""
ATTRIBUTION: Final = "llm-energy-sidecar/v1"
DONE: Final = b"data: [DONE]"
_MAX_HOLD: Final = 64
"""A held tail longer than this cannot be a ``[DONE]`` event (bounded memory)."""


def _done_like(tail: bytes) -> bool:
    """Whether ``tail`` (from an event start) is ``data: [DONE]`` or a prefix of it."""
    if not tail or len(tail) > _MAX_HOLD:
        return False
    core = tail.rstrip(b"\r\n")
    if core == DONE:
        return True
    return core == tail and DONE.startswith(core)


class SseHold:
    """Passes SSE bytes on, holding back a trailing ``data: [DONE]`` event (or its start)."""

    __slots__ = ("_held", "_prev")

    def __init__(self) -> None:
        self._held = b""
        self._prev = b"\n\n"  # the stream begins at an event start

    def feed(self, data: bytes) -> bytes:
        """The bytes that may go to the client now."""
        buf = self._held + data
        self._held = b""
        ctx = self._prev + buf
        off = len(self._prev)
        starts = [0] if self._prev.endswith((b"\n\n", b"\r\n\r\n")) else []
        for sep in (b"\n\n", b"\r\n\r\n"):
            i = ctx.find(sep, max(off - len(sep) + 1, 0))
            while i != -1:
                starts.append(i + len(sep) - off)
                i = ctx.find(sep, i + 1)
        for s in sorted({s for s in starts if 0 <= s < len(buf)}, reverse=True)[:2]:
            if _done_like(buf[s:]):
                buf, self._held = buf[:s], buf[s:]
                break
        if buf:
            self._prev = (self._prev + buf)[-4:]
        return buf

    @property
    def at_line_start(self) -> bool:
        """Whether a comment written now starts a line of its own."""
        return self._prev.endswith((b"\n", b"\r"))

    def held(self) -> bytes:
        """What was held back (the ``[DONE]`` event), to go after the receipt."""
        out, self._held = self._held, b""
        return out


def receipt_json(f: FinishedRequest, *, final: bool, g_per_kwh: float, pue: float) -> bytes:
    """A request's receipt (CONTRACT.md, Receipts) as compact JSON bytes."""
    body = {
        "energy_joules": round(f.energy_j, 6),
        "dynamic_joules": round(f.dynamic_j, 6),
        "idle_joules": round(f.idle_j, 6),
        "prefill_joules": round(f.prefill_j, 6),
        "decode_joules": round(f.decode_j, 6),
        "co2e_grams": round(operational_grams(f.energy_j, g_per_kwh, pue), 9),
        "duration_seconds": round(max(f.end_s - f.start_s, 0.0), 6),
        "attribution": ATTRIBUTION,
        "final": final,
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def sse_receipt(meter: Meter, rid: str, waiter: asyncio.Future[FinishedRequest]) -> bytes:
    """The comment event for ``rid``, after waiting at most :data:`WAIT_S` (by
    construction: one bounded ``wait``) for its final figure, else the provisional
    one; empty on any fault (fail open: the stream ends as it would have)."""
    try:
        await asyncio.wait({waiter}, timeout=WAIT_S)
        final = waiter.done() and not waiter.cancelled()
        f = waiter.result() if final else meter.provisional_receipt(rid)
        if f is None:
            return b""
        g_per_kwh = meter.intensity.g_per_kwh
        data = receipt_json(f, final=final, g_per_kwh=g_per_kwh, pue=meter.pue)
        return b": llm-energy " + data + b"\n\n"
    except Exception:
        meter.tracking_errors += 1
        log.exception("proxy.tracking_failed", step="receipt")
        return b""
    finally:
        meter.drop_receipt(rid)


def is_sse(headers: Mapping[str, str]) -> bool:
    """Whether a response is an SSE stream (the only kind that gets a comment receipt)."""
    main = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return main == "text/event-stream" and headers.get(
        "Content-Encoding", "identity"
    ).strip().lower() in (
        "",
        "identity",
    )


def small_reads(limit: int) -> None:
    """Cap socket reads at ``limit`` (the proxy's ``READ_BYTES``) for the sidecar's event loop.

    A connection's first read happens before any handler runs, so the cap is
    set on CPython's selector transport class (its ``max_size``, 256 KiB by
    default), once, when the proxy starts: smaller reads cost a few more
    system calls and bound what 300 concurrent uploads hold. A loop without
    that class attribute (uvloop) is left as it is.
    """
    import asyncio.selector_events as selector_events

    transport = getattr(selector_events, "_SelectorSocketTransport", None)
    if transport is not None and getattr(transport, "max_size", 0) > limit:
        transport.max_size = limit
