"""Traces mode beside a real vLLM: its own spans meter each request, nothing in the data path.

vLLM (CPU build) is started with ``--otlp-traces-endpoint`` pointing at a tap, a relay that
keeps each body as vLLM sent it and passes it to the sidecar's ``--otlp-listen``; the sidecar
(a real process, simulated GPU, ``--observe`` on vLLM's metrics) forwards to a stand-in
collector and adds energy spans. Clients talk to vLLM directly. Checked: tokens equal vLLM's
counters, every request appears once in ``llm_energy_request_joules``, prefill + decode =
each request's energy, the collector receives the tap's bodies byte for byte, each energy
span lands in its request's trace (the client's own, where it sent ``traceparent``).
Run with ``-rP`` to see the delay from a request's end to its final figure.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from procs import free_port, start_sidecar
from vllm_counts import SETTLE_TIMEOUT_S, Sidecar, run_sidecar, scrape, total
from vllm_server import VllmFactory, VllmServer

pytestmark = pytest.mark.vllm

REQUESTS = 6
MODEL = "tiny-llama"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


@dataclass
class Wire:
    """A plain HTTP endpoint that keeps every POST body as received; with ``relay_to`` it
    also passes the body on (keeping it only when the relay took it, 200) and answers with
    the relay's answer."""

    relay_to: str | None = None
    bodies: list[tuple[bytes, str | None, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        wire = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ctype, coding = (
                    self.headers.get("Content-Type"),
                    self.headers.get("Content-Encoding"),
                )
                status, answer = 200, b""
                if wire.relay_to is not None:
                    headers = {"Content-Type": ctype or ""}
                    if coding:
                        headers["Content-Encoding"] = coding
                    req = urllib.request.Request(wire.relay_to, data=body, headers=headers)
                    try:
                        with urllib.request.urlopen(req, timeout=10) as r:
                            status, answer = r.status, r.read()
                    except OSError:
                        status = 503
                if status == 200:  # kept once the sidecar took it (not while it was not up yet)
                    with wire.lock:
                        wire.bodies.append((body, ctype, coding))
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def snapshot(self) -> list[tuple[bytes, str | None, str | None]]:
        with self.lock:
            return list(self.bodies)


@dataclass
class Rig:
    vllm: VllmServer
    sidecar: Sidecar
    tap: Wire
    collector: Wire


@pytest.fixture(scope="module")
def rig(vllm_factory: VllmFactory) -> Generator[Rig, None, None]:
    otlp_port, mport = free_port(), free_port()
    collector = Wire()
    collector_url = collector.start()
    tap = Wire(relay_to=f"http://127.0.0.1:{otlp_port}/v1/traces")
    tap_url = tap.start()
    vllm = vllm_factory(
        args=("--otlp-traces-endpoint", tap_url),
        env={
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_RESOURCE_ATTRIBUTES": f"llm_energy.model={MODEL}",  # vLLM names none itself
        },
    )
    proc = start_sidecar(
        "--otlp-listen",
        f"127.0.0.1:{otlp_port}",
        "--otlp-forward",
        collector_url,
        "--otlp-energy-spans",
        "--observe",
        vllm.metrics_url,
        "--power-source",
        "simulated",
        "--metrics-listen",
        f"127.0.0.1:{mport}",
    )
    sidecar = run_sidecar(proc, free_port(), mport)
    try:
        yield Rig(vllm, sidecar, tap, collector)
    finally:
        sidecar.stop()
        tap.stop()
        collector.stop()


def spans_of(body: bytes) -> list[Span]:
    msg = ExportTraceServiceRequest.FromString(body)
    return [s for rs in msg.resource_spans for ss in rs.scope_spans for s in ss.spans]


async def chat(base: str, i: int, headers: dict[str, str]) -> tuple[str, float]:
    """One chat completion (streamed on odd ``i``); its response id and when it ended."""
    payload = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": f"the sidecar counts every joule {i}"}],
        "max_tokens": 8 + 4 * i,
        "seed": i,
        "stream": i % 2 == 1,
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/v1/chat/completions", json=payload, headers=headers) as r,
    ):
        assert r.status == 200
        if i % 2:
            text = await r.text()
            first = next(line for line in text.splitlines() if line.startswith("data: {"))
            rid = str(json.loads(first[6:])["id"])
        else:
            rid = str((await r.json())["id"])
    return rid, time.monotonic()


async def test_traces_mode_beside_vllm(rig: Rig) -> None:
    """Every request once, vLLM's tokens, stages that sum, byte-identical forwarding, energy
    spans in the right traces."""
    before_ours = await scrape(rig.sidecar.metrics_url)
    before_vllm = await scrape(rig.vllm.metrics_url)
    traced = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}
    results = [await chat(rig.vllm.url, i, traced if i == 0 else {}) for i in range(REQUESTS)]
    ids = [rid for rid, _ in results]
    last_end = max(t for _, t in results)

    # Final figures: once every interval the requests ran in has been heard from.
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    final_at: float | None = None
    while time.monotonic() < deadline:
        ours = await scrape(rig.sidecar.metrics_url)
        booked = total(ours, "llm_energy_request_joules_count") - total(
            before_ours, "llm_energy_request_joules_count"
        )
        if booked >= REQUESTS:
            final_at = time.monotonic()
            break
        await asyncio.sleep(0.1)
    theirs = await scrape(rig.vllm.metrics_url)
    vllm_prompt = total(theirs, "vllm:prompt_tokens_total") - total(
        before_vllm, "vllm:prompt_tokens_total"
    )
    vllm_completion = total(theirs, "vllm:generation_tokens_total") - total(
        before_vllm, "vllm:generation_tokens_total"
    )
    print(
        "traces mode:",
        {
            "requests": REQUESTS,
            "booked": booked,
            "final_after_last_end_s": None if final_at is None else round(final_at - last_end, 2),
            "prompt_tokens": (
                total(ours, "llm_energy_tokens_total", kind="prompt")
                - total(before_ours, "llm_energy_tokens_total", kind="prompt"),
                vllm_prompt,
            ),
            "completion_tokens": (
                total(ours, "llm_energy_tokens_total", kind="completion")
                - total(before_ours, "llm_energy_tokens_total", kind="completion"),
                vllm_completion,
            ),
        },
    )
    assert booked == REQUESTS  # each request once in llm_energy_request_joules
    assert (
        total(ours, "llm_energy_request_joules_count", model=MODEL)
        - total(before_ours, "llm_energy_request_joules_count", model=MODEL)
        == REQUESTS
    )  # the model named by the resource, not --model's "default"
    assert (
        total(ours, "llm_energy_tokens_total", kind="prompt")
        - total(before_ours, "llm_energy_tokens_total", kind="prompt")
        == vllm_prompt
    )
    assert (
        total(ours, "llm_energy_tokens_total", kind="completion")
        - total(before_ours, "llm_energy_tokens_total", kind="completion")
        == vllm_completion
    )

    # The request spans vLLM sent, as the tap saw them.
    sent = rig.tap.snapshot()
    request_spans = {
        s.attributes[
            [kv.key for kv in s.attributes].index("gen_ai.request.id")
        ].value.string_value: s
        for body, _, _ in sent
        for s in spans_of(body)
        if s.name == "llm_request"
    }
    assert set(ids) <= set(request_spans)
    assert request_spans[ids[0]].trace_id.hex() == CLIENT_TRACE

    # Energy spans: one per request, in its trace, child of its span; stages sum to it.
    energy: dict[str, Span] = {}
    for _ in range(100):
        got = rig.collector.snapshot()
        energy = {
            kv.value.string_value: s
            for body, _, _ in got
            for s in spans_of(body)
            if s.name == "llm_energy.request"
            for kv in s.attributes
            if kv.key == "gen_ai.request.id"
        }
        if set(ids) <= set(energy):
            break
        await asyncio.sleep(0.1)
    assert set(ids) <= set(energy)
    print(
        "energy spans (J, prefill, decode):",
        [
            tuple(
                round(kv.value.double_value, 3)
                for key in ("joules", "prefill_joules", "decode_joules")
                for kv in energy[rid].attributes
                if kv.key == f"llm_energy.{key}"
            )
            for rid in ids
        ],
    )
    for rid in ids:
        e, parent = energy[rid], request_spans[rid]
        assert (e.trace_id, e.parent_span_id) == (parent.trace_id, parent.span_id)
        a = {kv.key: kv.value.double_value for kv in e.attributes}
        assert a["llm_energy.joules"] > 0
        assert a["llm_energy.prefill_joules"] + a["llm_energy.decode_joules"] == pytest.approx(
            a["llm_energy.joules"], rel=1e-9
        )
        assert a["llm_energy.dynamic_joules"] + a["llm_energy.idle_joules"] == pytest.approx(
            a["llm_energy.joules"], rel=1e-9
        )

    # Forwarding: every body vLLM sent reached the collector unchanged, with its headers.
    forwarded: list[tuple[bytes, str | None, str | None]] = []
    for _ in range(100):
        forwarded = [b for b in rig.collector.snapshot() if b[0] in {body for body, _, _ in sent}]
        if len(forwarded) >= len(sent):
            break
        await asyncio.sleep(0.1)
    assert sorted(forwarded) == sorted(sent)


async def test_duplicate_export_counts_once(rig: Rig) -> None:
    """vLLM's own export sent a second time (a retry) adds no request and no token."""
    rid, _ = await chat(rig.vllm.url, 2, {})
    body = None
    for _ in range(int(SETTLE_TIMEOUT_S * 10)):
        body = next(
            (
                b
                for b, _, _ in rig.tap.snapshot()
                for s in spans_of(b)
                if any(kv.value.string_value == rid for kv in s.attributes)
            ),
            None,
        )
        if body is not None:
            break
        await asyncio.sleep(0.1)
    assert body is not None
    before = await scrape(rig.sidecar.metrics_url)
    url = rig.tap.relay_to
    assert url is not None
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=body, headers={"Content-Type": "application/x-protobuf"}) as r,
    ):
        assert r.status == 200
    after = await scrape(rig.sidecar.metrics_url)
    for name, labels in (
        ("llm_energy_tokens_total", {"kind": "prompt"}),
        ("llm_energy_requests_total", {}),
    ):
        assert total(after, name, **labels) == total(before, name, **labels)
    assert total(after, "llm_energy_otlp_spans_total", result="duplicate") > total(
        before, "llm_energy_otlp_spans_total", result="duplicate"
    )


async def test_malformed_and_huge_bodies_beside_vllm(rig: Rig) -> None:
    """Bodies that are not exports are refused (400, 413) and the receiver keeps serving vLLM."""
    url = rig.tap.relay_to
    assert url is not None
    async with aiohttp.ClientSession() as s:
        async with s.post(
            url, data=b"\xff\x00garbage", headers={"Content-Type": "application/x-protobuf"}
        ) as r:
            assert r.status == 400
        async with s.post(
            url, data=b"\0" * (50 * 1024 * 1024), headers={"Content-Type": "application/x-protobuf"}
        ) as r:
            assert r.status == 413
    rid, _ = await chat(rig.vllm.url, 1, {})
    for _ in range(int(SETTLE_TIMEOUT_S * 10)):
        if any(
            s.name == "llm_request" and any(kv.value.string_value == rid for kv in s.attributes)
            for body, _, _ in rig.tap.snapshot()
            for s in spans_of(body)
        ):
            break
        await asyncio.sleep(0.1)
    ours = await scrape(rig.sidecar.metrics_url)
    assert total(ours, "llm_energy_otlp_exports_total", result="malformed") == 1
    assert total(ours, "llm_energy_otlp_exports_total", result="too_large") == 1
    assert total(ours, "llm_energy_otlp_spans_total", result="failed") == 0
