"""OTLP/HTTP trace export bodies to ``ExportTraceServiceRequest``, with the official bindings.

Two encodings (binary protobuf, JSON) and two content encodings (identity, gzip). A
gzip body is inflated with a cap on its output, so a small bomb cannot become a large
allocation. OTLP/JSON differs from protobuf's generic JSON mapping in one place that
matters here: trace and span ids are hex strings, where ``json_format`` expects base64,
so they are rewritten before parsing (the OTLP spec, "JSON Protobuf Encoding").
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any, Final, Literal

from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

Encoding = Literal["protobuf", "json"]
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
_ID_KEYS: Final = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


class MalformedExport(ValueError):
    """A body that is not an OTLP trace export: one line saying what is wrong (HTTP 400)."""


class UnsupportedExport(ValueError):
    """A content type or encoding the receiver does not speak (HTTP 415)."""


class ExportTooLarge(ValueError):
    """A body, or its inflated form, over the size cap (HTTP 413)."""


def media_type(content_type: str | None) -> Encoding:
    """``protobuf`` or ``json`` from a Content-Type header (parameters ignored)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == PROTOBUF:
        return "protobuf"
    if kind == JSON:
        return "json"
    raise UnsupportedExport(f"Content-Type {kind or '(none)'!r}: expected {PROTOBUF} or {JSON}")


def inflate(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body as sent before compression; gzip output stops at ``max_bytes``."""
    coding = (content_encoding or "identity").strip().lower()
    if coding == "identity" or not coding:
        return body
    if coding != "gzip":
        raise UnsupportedExport(f"Content-Encoding {coding!r}: expected gzip or identity")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise MalformedExport(f"gzip body does not inflate: {e}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise ExportTooLarge(f"gzip body inflates past {max_bytes} bytes")
    if not inflater.eof:
        raise MalformedExport("gzip body is truncated")
    return out


def decode_export(
    body: bytes, content_type: str | None, content_encoding: str | None, max_bytes: int
) -> ExportTraceServiceRequest:
    """One export request, or :class:`MalformedExport` / :class:`UnsupportedExport` /
    :class:`ExportTooLarge`."""
    encoding = media_type(content_type)
    raw = inflate(body, content_encoding, max_bytes)
    message = ExportTraceServiceRequest()
    if encoding == "protobuf":
        try:
            message.ParseFromString(raw)
        except ProtobufDecodeError as e:
            raise MalformedExport(f"protobuf body does not parse: {e}") from None
        return message
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MalformedExport(f"JSON body does not parse: {e}") from None
    if not isinstance(doc, dict):
        raise MalformedExport("JSON body is not an object")
    try:
        json_format.ParseDict(_hex_ids_to_base64(doc), message, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError, RecursionError) as e:
        raise MalformedExport(f"JSON body is not an OTLP trace export: {e}") from None
    return message


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON's hex ids as the base64 that ``json_format`` reads; everything else as is."""
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _ID_KEYS and isinstance(value, str):
            out[key] = _hex_to_base64(key, value)
        else:
            out[key] = _hex_ids_to_base64(value)
    return out


def _hex_to_base64(key: str, value: str) -> str:
    try:
        raw = binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise MalformedExport(
            f"{key} {value[:40]!r} is not hex (OTLP/JSON writes ids in hex)"
        ) from None
    return base64.b64encode(raw).decode("ascii")
