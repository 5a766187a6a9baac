"""OTLP bodies to request spans: encodings, vLLM's and SGLang's attributes, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp_build import ARRIVAL_NS, export, gz, kv, llm_request, otlp_json

from sidecar.traces.decode import (
    ExportTooLarge,
    MalformedExport,
    UnsupportedExport,
    decode_export,
)
from sidecar.traces.vllm import request_spans

CAP = 1 << 20
WALL_OFFSET_S = 1_796_100_000.0  # monotonic = unix - offset


def to_mono(unix_s: float) -> float:
    return unix_s - WALL_OFFSET_S


class TestEncodings:
    def test_protobuf_identity(self) -> None:
        """A binary protobuf export decodes to the same message."""
        msg = export(llm_request())
        got = decode_export(msg.SerializeToString(), "application/x-protobuf", None, CAP)
        assert got == msg

    def test_protobuf_gzip(self) -> None:
        """A gzip protobuf export decodes to the same message."""
        msg = export(llm_request())
        got = decode_export(gz(msg.SerializeToString()), "application/x-protobuf", "gzip", CAP)
        assert got == msg

    def test_json_hex_ids(self) -> None:
        """OTLP/JSON's hex trace and span ids decode to the same bytes as protobuf's."""
        msg = export(llm_request(trace_id=bytes(range(16)), span_id=bytes(range(8, 16))))
        body = otlp_json(msg)
        assert b"000102030405060708090a0b0c0d0e0f" in body
        got = decode_export(body, "application/json; charset=utf-8", None, CAP)
        assert got == msg

    def test_json_gzip(self) -> None:
        """A gzip OTLP/JSON export decodes to the same message."""
        msg = export(llm_request())
        assert decode_export(gz(otlp_json(msg)), "application/json", "gzip", CAP) == msg

    def test_json_ignores_unknown_fields(self) -> None:
        """Fields from a newer OTLP version are skipped, not refused."""
        doc = json.loads(otlp_json(export(llm_request())))
        doc["resourceSpans"][0]["someFutureField"] = 1
        got = decode_export(json.dumps(doc).encode(), "application/json", None, CAP)
        assert len(got.resource_spans[0].scope_spans[0].spans) == 1


class TestBadBodies:
    @pytest.mark.parametrize(
        ("body", "ctype", "coding"),
        [
            (b"\xff\xff\xff\xff", "application/x-protobuf", None),
            (b"not json", "application/json", None),
            (b"[1, 2]", "application/json", None),
            (
                b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
                "application/json",
                None,
            ),
            (b'{"resourceSpans": "nope"}', "application/json", None),
            (b"plain", "application/x-protobuf", "gzip"),
            (gzip.compress(b"x" * 100)[:-8], "application/x-protobuf", "gzip"),
            (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "application/json", None),
        ],
        ids=[
            "protobuf",
            "json",
            "json-array",
            "json-bad-hex",
            "json-shape",
            "not-gzip",
            "truncated-gzip",
            "json-too-deep",
        ],
    )
    def test_malformed(self, body: bytes, ctype: str, coding: str | None) -> None:
        """A body that is not an export is refused with a one-line reason."""
        with pytest.raises(MalformedExport) as e:
            decode_export(body, ctype, coding, CAP)
        assert "\n" not in str(e.value)

    @pytest.mark.parametrize(
        ("ctype", "coding", "named"),
        [
            ("text/plain", None, "text/plain"),
            (None, None, "none"),
            ("application/x-protobuf", "br", "'br'"),
        ],
    )
    def test_unsupported(self, ctype: str | None, coding: str | None, named: str) -> None:
        """An unknown content type or encoding is named in the refusal."""
        with pytest.raises(UnsupportedExport, match=named):
            decode_export(b"", ctype, coding, CAP)

    def test_gzip_bomb_stops_at_cap(self) -> None:
        """A small gzip body that inflates past the cap is refused as too large."""
        bomb = gzip.compress(b"\0" * (8 * CAP))
        assert len(bomb) < CAP // 10
        with pytest.raises(ExportTooLarge):
            decode_export(bomb, "application/x-protobuf", "gzip", CAP)


class TestVllmSpan:
    def test_times_from_first_token(self) -> None:
        """Times follow CONTRACT.md: first token = arrival + ttft; scheduled = first - prefill;
        end = first + decode (queue and prefill are not added up)."""
        out = request_spans(export(llm_request()), to_mono)
        (span,) = out.spans
        arrival = to_mono(ARRIVAL_NS / 1e9)
        assert span.arrival_s == pytest.approx(arrival)
        assert span.first_token_s == pytest.approx(arrival + 0.0802)
        assert span.scheduled_s == pytest.approx(arrival + 0.0802 - 0.0344)
        assert span.end_s == pytest.approx(arrival + 0.0802 + 0.161)
        assert span.scheduled_s > arrival + 6.5e-05  # the front end's time is in neither stamp
        assert (span.prompt_tokens, span.completion_tokens) == (17, 20)
        assert span.request_id == "chatcmpl-a8755a5006221020"
        assert span.model is None  # vLLM names none; the meter's --model applies

    def test_ids_kept(self) -> None:
        """The span's trace id and span id travel with it (the energy span's parent)."""
        s = llm_request(trace_id=b"t" * 16, span_id=b"s" * 8)
        (span,) = request_spans(export(s), to_mono).spans
        assert (span.trace_id, span.span_id) == (b"t" * 16, b"s" * 8)

    def test_model_from_span_then_resource(self) -> None:
        """The model is the span's gen_ai.response.model, else the resource's llm_energy.model;
        service.name never is."""
        on_span = llm_request(extra={"gen_ai.response.model": "llama-8b"})
        (a,) = request_spans(export(on_span, resource={"llm_energy.model": "x"}), to_mono).spans
        (b,) = request_spans(
            export(llm_request(), resource={"llm_energy.model": "x"}), to_mono
        ).spans
        (c,) = request_spans(
            export(llm_request(), resource={"service.name": "vllm"}), to_mono
        ).spans
        assert (a.model, b.model, c.model) == ("llama-8b", "x", None)

    def test_prefill_longer_than_ttft_is_clamped(self) -> None:
        """Scheduling never lands before arrival, even if the engine's stamps say so."""
        (span,) = request_spans(export(llm_request(ttft_s=0.05, prefill_s=0.08)), to_mono).spans
        assert span.scheduled_s == pytest.approx(span.arrival_s)

    def test_other_spans_ignored(self) -> None:
        """Start-up spans (Executor init, ...) are counted as ignored, not requests."""
        other = Span(
            trace_id=b"a" * 16, span_id=b"b" * 8, name="Executor init", start_time_unix_nano=1
        )
        out = request_spans(export(other, llm_request()), to_mono)
        assert (len(out.spans), out.ignored, out.invalid) == (1, 1, 0)

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"gen_ai.latency.time_to_first_token": "soon"}, "time_to_first_token"),
            ({"gen_ai.latency.time_in_model_decode": -1.0}, "time_in_model_decode"),
            ({"gen_ai.latency.time_in_model_prefill": float("nan")}, "time_in_model_prefill"),
            ({"gen_ai.usage.prompt_tokens": -3}, "prompt_tokens"),
            ({"gen_ai.request.id": ""}, "gen_ai.request.id"),
            ({"gen_ai.latency.time_in_model_decode": 1e9}, "time_in_model_decode"),
        ],
    )
    def test_invalid_spans_counted_with_reason(self, change: dict[str, object], field: str) -> None:
        """A request span whose facts do not hold is counted invalid; the reason names the attribute."""
        out = request_spans(export(llm_request(extra=change), llm_request("ok")), to_mono)
        assert [s.request_id for s in out.spans] == ["ok"]
        assert out.invalid == 1
        assert out.first_error is not None
        assert field in out.first_error


class TestSglangSpan:
    def test_root_span_by_attributes(self) -> None:
        """SGLang's root span (named ``Req <rid>``) is a request span by its attributes, with
        its cached tokens and model."""
        span = llm_request(
            "5f3c9a",
            extra={"gen_ai.usage.cached_tokens": 8, "gen_ai.response.model": "qwen"},
        )
        span.name = "Req 5f3c9a"
        child = Span(
            trace_id=span.trace_id, span_id=b"c" * 8, name="Tokenize", start_time_unix_nano=1
        )
        child.attributes.append(kv("rid", "5f3c9a"))
        out = request_spans(export(span, child, resource={"service.name": "sglang"}), to_mono)
        (got,) = out.spans
        assert (got.request_id, got.cached_tokens, got.model) == ("5f3c9a", 8, "qwen")
        assert out.ignored == 1


class TestRealVllmCapture:
    """Bodies a real vLLM 0.32 sent (tests/data/vllm-0.32/otlp.md)."""

    DATA = Path(__file__).parent / "data" / "vllm-0.32"

    def test_request_spans(self) -> None:
        """Both requests come out with the response ids, exact tokens and the client's trace."""
        body = (self.DATA / "otlp-llm_request.pb").read_bytes()
        out = request_spans(decode_export(body, "application/x-protobuf", None, CAP), to_mono)
        assert [(s.request_id, s.prompt_tokens, s.completion_tokens) for s in out.spans] == [
            ("chatcmpl-a09ff9496639d18b", 24, 12),
            ("chatcmpl-9c77b4c7961a1c8e", 24, 13),
        ]
        assert out.spans[1].trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
        for s in out.spans:
            assert s.arrival_s <= s.scheduled_s < s.first_token_s < s.end_s
            assert s.model is None

    def test_startup_spans_ignored(self) -> None:
        """Start-up spans are not requests."""
        body = (self.DATA / "otlp-startup.pb").read_bytes()
        out = request_spans(decode_export(body, "application/x-protobuf", None, CAP), to_mono)
        assert (out.spans, out.ignored, out.invalid) == ([], 3, 0)
