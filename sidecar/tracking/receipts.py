"""Energy receipts: each response tells its client what the request cost.

An SSE response gets it as a comment (conforming clients ignore comments),
after the upstream's last byte and before a held-back ``data: [DONE]``; a
non-streamed JSON object, as a top-level ``energy`` member written into its
bytes (the body is held whole, within the parse budget, and goes out with
its new length). The request's end for attribution is the upstream's last
byte: the meter is told first, then the proxy waits at most :data:`WAIT_S`
for the figure to become final (the sampler is asked to reconcile samples
past that end at once, see :meth:`sidecar.reconcile.Reconciler.cut`).
Whatever goes wrong in here, the response goes out as the upstream sent it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Final

import structlog
from aiohttp import ClientResponse, web

from sidecar.carbon.emissions import operational_grams
from sidecar.ledger import FinishedRequest
from sidecar.meter import Meter
from sidecar.tracking.budget import ParseBudget

log = structlog.get_logger("sidecar.proxy")

WAIT_S: Final = 0.5
"""The most a stream's end is held for its request's energy to become final."""
ATTRIBUTION: Final = "llm-energy-sidecar/v1"
DONE: Final = b"data: [DONE]"
_MAX_HOLD: Final = 64
"""A held tail longer than this cannot be a ``[DONE]`` event (bounded memory)."""
MAX_HELD_BYTES: Final = 1 << 20
"""Largest JSON body held for its member: the proxy's cap on a parsed body (``MAX_PARSED_BODY``)."""
_WS: Final = b" \t\r\n"
"""JSON's whitespace."""
_wait = asyncio.wait
"""The receipt's one bounded wait (a test swaps it to see the timeout it is given)."""


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

    __slots__ = ("_held", "_prev", "_response")

    def __init__(self, response: web.StreamResponse | None = None) -> None:
        self._response = response
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

    async def prepare(self, request: web.Request) -> None:
        assert self._response is not None
        await self._response.prepare(request)  # a stream's headers go at once

    async def end(
        self, meter: Meter, rid: str, waiter: asyncio.Future[FinishedRequest], request: web.Request
    ) -> None:
        """After the upstream's last byte (the meter told): the comment, then ``[DONE]``."""
        assert self._response is not None
        data = await settle(meter, rid, waiter)
        note = b": llm-energy " + data + b"\n\n" if data and self.at_line_start else b""
        await self._response.write(note + self.held())

    def release(self) -> None:
        return None


class JsonHold:
    """Holds a non-streamed JSON body whole (its size known and within the parse
    budget), so it can go out with its ``energy`` member and the new length."""

    __slots__ = ("_budget", "_parts", "_reserved", "_response")

    def __init__(self, response: web.StreamResponse, budget: ParseBudget, size: int) -> None:
        self._response = response
        self._budget, self._reserved = budget, size
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        if data:
            self._parts.append(data)
        return b""

    async def prepare(self, request: web.Request) -> None:
        return None  # the headers wait for the body's new length

    async def end(
        self, meter: Meter, rid: str, waiter: asyncio.Future[FinishedRequest], request: web.Request
    ) -> None:
        """After the upstream's last byte (the meter told): headers, then the body with
        its energy; the upstream's bytes as they came where it cannot carry one."""
        body, self._parts = b"".join(self._parts), []
        out = body
        data = await settle(meter, rid, waiter)
        if data:
            try:
                out = with_energy(body, data) or body
            except Exception:
                meter.tracking_errors += 1
                log.exception("proxy.tracking_failed", step="receipt_json")
        response = self._response
        response.headers["Content-Length"] = str(len(out))
        await response.prepare(request)
        await response.write(out)

    def release(self) -> None:
        """Return the budget (however the response ended)."""
        self._parts = []
        self._budget.give(self._reserved)
        self._reserved = 0


def receipt_hold(
    on: bool,
    upstream: ClientResponse,
    response: web.StreamResponse,
    streamed: bool,
    budget: ParseBudget,
) -> SseHold | JsonHold | None:
    """How ``response`` carries its receipt (``on``: receipts are on and the request
    metered): an SSE stream, a comment; a non-streamed 2xx ``application/json`` body,
    identity-encoded, of a known length up to :data:`MAX_HELD_BYTES` and within
    ``budget``, a member; anything else (NDJSON, compressed, error statuses, unknown
    or larger lengths) none, and it passes untouched."""
    if not on:
        return None
    status, headers = upstream.status, upstream.headers
    if is_sse(headers):
        return SseHold(response)
    main = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    length = headers.get("Content-Length", "")
    if streamed or not 200 <= status < 300 or main != "application/json":
        return None
    if encoding not in ("", "identity") or not length.isdigit():
        return None
    size = int(length)
    if size > MAX_HELD_BYTES or not budget.take(size):
        return None
    return JsonHold(response, budget, size)


def with_energy(body: bytes, receipt: bytes) -> bytes | None:
    """``body`` with ``"energy": receipt`` as its last top-level member, written into
    its bytes (nothing else changes); ``None`` unless it is one UTF-8 JSON object
    without an ``energy`` member of its own."""
    try:
        doc: Any = json.loads(body.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(doc, dict) or "energy" in doc:
        return None
    end = len(body.rstrip(_WS)) - 1  # the closing brace
    head = body[:end]
    sep = b"" if head.rstrip(_WS).endswith(b"{") else b","  # `{}` takes no comma
    return head + sep + b'"energy":' + receipt + body[end:]


def receipt_json(f: FinishedRequest, *, final: bool, g_per_kwh: float, pue: float) -> bytes:
    """A request's receipt (CONTRACT.md, Receipts) as compact JSON bytes."""
    body = {  # unrounded: a final receipt equals what the metrics booked
        "energy_joules": f.energy_j,
        "dynamic_joules": f.dynamic_j,
        "idle_joules": f.idle_j,
        "prefill_joules": f.prefill_j,
        "decode_joules": f.decode_j,
        "co2e_grams": operational_grams(f.energy_j, g_per_kwh, pue),
        "duration_seconds": round(max(f.end_s - f.start_s, 0.0), 6),
        "attribution": ATTRIBUTION,
        "final": final,
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def settle(meter: Meter, rid: str, waiter: asyncio.Future[FinishedRequest]) -> bytes:
    """``rid``'s receipt, after waiting at most :data:`WAIT_S` (by construction: one
    bounded ``wait``) for its final figure, else the provisional one; empty on any
    fault (fail open: the response ends as it would have), and in traces mode, where
    the figure is the server span's, seconds later, and the ledger has none before."""
    try:
        if meter.join is not None:  # traces mode: the figure comes with the server's span, later
            return b""
        await _wait({waiter}, timeout=WAIT_S)
        final = waiter.done() and not waiter.cancelled()
        f = waiter.result() if final else meter.provisional_receipt(rid)
        if f is None:
            return b""
        g_per_kwh = meter.intensity.g_per_kwh
        return receipt_json(f, final=final, g_per_kwh=g_per_kwh, pue=meter.pue)
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
