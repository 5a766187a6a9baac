"""The OTLP/HTTP receiver: ``POST /v1/traces`` from the model server.

It answers at once and never slows or fails the server's export beyond what the
protocol asks: a body that is not an export gets 400 (the exporter does not retry it),
one over the size cap 413 (read no further than the cap, so a 50 MB body is never held
whole), a content type it does not speak 415, and more bodies in progress than
``max_pending`` 503 with ``Retry-After`` (bounded work; the exporter backs off). Each
body read whole is queued for the forward target before it is decoded, so the user's
collector sees every export unchanged. A retried export carries the same span ids: a
bounded memory of ids seen makes each span count once.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, Final, Literal

import structlog
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from sidecar.traces.decode import (
    JSON,
    PROTOBUF,
    ExportTooLarge,
    MalformedExport,
    UnsupportedExport,
    decode_export,
    media_type,
)
from sidecar.traces.forward import TRACES_PATH, Forwarder
from sidecar.traces.span import RequestSpan
from sidecar.traces.vllm import Decoded, request_spans

log = structlog.get_logger("sidecar.traces.receiver")

ExportResult = Literal["ok", "malformed", "too_large", "unsupported", "overloaded"]
EXPORT_RESULTS: Final[tuple[ExportResult, ...]] = (
    "ok",
    "malformed",
    "too_large",
    "unsupported",
    "overloaded",
)
SpanResult = Literal["accepted", "duplicate", "invalid", "ignored", "failed"]
SPAN_RESULTS: Final[tuple[SpanResult, ...]] = (
    "accepted",
    "duplicate",
    "invalid",
    "ignored",
    "failed",
)
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
THREAD_DECODE_BYTES: Final = 256 * 1024  # larger bodies decode off the event loop
READ_CHUNK: Final = 64 * 1024
RUNNER_KWARGS: Final[dict[str, Any]] = {"auto_decompress": False}
"""Server options the receiver needs: aiohttp inflates gzip request bodies by default,
which would forward a different body than the server sent and lift the size cap."""


class Receiver:
    """Decodes exports into :class:`RequestSpan` and hands each new one to ``on_span``."""

    def __init__(
        self,
        on_span: Callable[[RequestSpan], None],
        *,
        to_monotonic_s: Callable[[float], float],
        forward: Forwarder | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_pending: int = 16,
        max_seen: int = 65_536,
    ) -> None:
        self._on_span = on_span
        self._to_monotonic_s = to_monotonic_s
        self._forward = forward
        self._max_body_bytes = max_body_bytes
        self._max_pending = max_pending
        self._pending = 0
        self._seen: OrderedDict[bytes | str, None] = OrderedDict()
        self._max_seen = max_seen
        self.exports: Counter[ExportResult] = Counter()
        self.spans: Counter[SpanResult] = Counter()
        self._logged: set[str] = set()

    def app(self) -> web.Application:
        """An application serving only ``POST /v1/traces`` (its own port: ``--otlp-listen``);
        run it with :data:`RUNNER_KWARGS`."""
        app = web.Application(client_max_size=self._max_body_bytes)
        app.router.add_post(TRACES_PATH, self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._pending >= self._max_pending:
            self.exports["overloaded"] += 1
            return _error(request, 503, "receiver busy, retry later", retry_after_s=1)
        self._pending += 1
        try:
            return await self._handle(request)
        finally:
            self._pending -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        content_type = request.headers.get("Content-Type")
        content_encoding = request.headers.get("Content-Encoding")
        try:
            media_type(content_type)
            body = await self._read(request)
            if self._forward is not None:
                self._forward.submit(body, content_type, content_encoding)
            if len(body) > THREAD_DECODE_BYTES:
                decoded = await asyncio.to_thread(
                    self._decode, body, content_type, content_encoding
                )
            else:
                decoded = self._decode(body, content_type, content_encoding)
        except UnsupportedExport as e:
            return self._refuse(request, "unsupported", 415, str(e))
        except ExportTooLarge as e:
            return self._refuse(request, "too_large", 413, str(e))
        except MalformedExport as e:
            return self._refuse(request, "malformed", 400, str(e))
        self.exports["ok"] += 1
        self._take(decoded)
        return _success(request, decoded)

    async def _read(self, request: web.Request) -> bytes:
        """The whole body, or :class:`ExportTooLarge` as soon as it passes the cap."""
        cap = self._max_body_bytes
        if request.content_length is not None and request.content_length > cap:
            raise ExportTooLarge(f"body of {request.content_length} bytes is over {cap} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(READ_CHUNK):
            size += len(chunk)
            if size > cap:
                raise ExportTooLarge(f"body is over {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode(
        self, body: bytes, content_type: str | None, content_encoding: str | None
    ) -> Decoded:
        export = decode_export(body, content_type, content_encoding, self._max_body_bytes)
        return request_spans(export, self._to_monotonic_s)

    def _take(self, decoded: Decoded) -> None:
        self.spans["ignored"] += decoded.ignored
        if decoded.invalid:
            self.spans["invalid"] += decoded.invalid
            self._log_once("otlp.span_invalid", detail=decoded.first_error)
        for span in decoded.spans:
            key: bytes | str = span.trace_id + span.span_id or span.request_id
            if key in self._seen:
                self._seen.move_to_end(key)
                self.spans["duplicate"] += 1
                continue
            self._seen[key] = None
            if len(self._seen) > self._max_seen:
                self._seen.popitem(last=False)
            try:
                self._on_span(span)
            except Exception:  # fail open: the accounting's fault is not the server's
                self.spans["failed"] += 1
                log.exception("otlp.span_failed", request_id=span.request_id)
                continue
            self.spans["accepted"] += 1

    def _refuse(
        self, request: web.Request, result: ExportResult, status: int, detail: str
    ) -> web.Response:
        self.exports[result] += 1
        self._log_once("otlp.export_refused", result=result, status=status, detail=detail)
        return _error(request, status, detail)

    def _log_once(self, event: str, **data: object) -> None:
        key = f"{event}:{data.get('result', '')}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning(event, **data)


def _success(request: web.Request, decoded: Decoded) -> web.Response:
    """OTLP's success answer, in the request's encoding; rejected spans as partial success."""
    reply = ExportTraceServiceResponse()
    if decoded.invalid:
        reply.partial_success.CopyFrom(
            ExportTracePartialSuccess(
                rejected_spans=decoded.invalid, error_message=decoded.first_error or ""
            )
        )
    if _is_json(request):
        from google.protobuf import json_format

        text = json_format.MessageToJson(reply, indent=None) if decoded.invalid else "{}"
        return web.Response(body=text.encode(), content_type=JSON)
    return web.Response(body=reply.SerializeToString(), content_type=PROTOBUF)


def _error(
    request: web.Request, status: int, detail: str, retry_after_s: int | None = None
) -> web.Response:
    """An error answer: a ``google.rpc.Status``-shaped body with the message."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    if _is_json(request):
        import json

        body = json.dumps({"code": status, "message": detail}).encode()
        return web.Response(status=status, body=body, content_type=JSON, headers=headers)
    return web.Response(
        status=status, body=_status_proto(status, detail), content_type=PROTOBUF, headers=headers
    )


def _status_proto(code: int, message: str) -> bytes:
    """``google.rpc.Status{code, message}`` by hand (two fields; no googleapis dependency)."""
    text = message.encode()[:1024]
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _is_json(request: web.Request) -> bool:
    return request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower() == JSON
