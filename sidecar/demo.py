"""``llm-energy-sidecar demo``: the whole product on one machine, no GPU needed.

An embedded OpenAI-compatible model server batches concurrent requests
(continuous batching: a request joins the running batch at the next step),
streams tokens, and drives a simulated GPU: idle power plus each request's
prefill or decode cost, discounted alike for every member of a larger batch.
The sidecar proxies it exactly as it would proxy vLLM, and a load generator
sends bursts and quiet spells so standby appears. A live line every second,
a final summary, and ``/metrics`` on the metrics port while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import Settings, split_host_port
from sidecar.power.simulated import SimulatedGpus

STEP_S: Final = 1 / 30
PREFILL_TOKENS_PER_S: Final = 8000.0
PREFILL_J_PER_TOKEN: Final = 0.05
DECODE_J_PER_TOKEN: Final = 3.0
BATCH_DISCOUNT: Final = 0.15
WORDS: Final = (
    "energy",
    "carbon",
    "token",
    "model",
    "batch",
    "watts",
    "grid",
    "idle",
    "memory",
    "sample",
)


@dataclass(slots=True)
class _Job:
    id: str
    prompt_tokens: int
    max_tokens: int
    arrived_s: float
    prefill_done_s: float | None = None
    emitted: int = 0
    out: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)


class ModelServer:
    """A tiny batching LLM server: OpenAI chat/completions, streamed or not."""

    def __init__(self, gpu: SimulatedGpus, clock: Any = time.monotonic, seed: int = 0) -> None:
        self.gpu = gpu
        self.clock = clock
        self.rnd = random.Random(seed)
        self.jobs: dict[str, _Job] = {}
        self._ids = 0
        self._engine: asyncio.Task[None] | None = None

    async def engine(self) -> None:
        """One step every ``STEP_S``: prefill whoever is new, one token for everyone else."""
        while True:
            await asyncio.sleep(STEP_S)
            now = self.clock()
            batch = list(self.jobs.values())
            discount = 1.0 / (1.0 + BATCH_DISCOUNT * max(0, len(batch) - 1))
            for job in batch:
                if job.prefill_done_s is None:
                    ttft = 0.02 + job.prompt_tokens / PREFILL_TOKENS_PER_S
                    if now - job.arrived_s >= ttft:
                        job.prefill_done_s = now
                    else:
                        self.gpu.set_load(
                            job.id, now, PREFILL_J_PER_TOKEN * job.prompt_tokens / ttft * discount
                        )
                        continue
                if job.emitted >= job.max_tokens:
                    continue
                job.emitted += 1
                self.gpu.set_load(job.id, now, DECODE_J_PER_TOKEN / STEP_S * discount)
                job.out.put_nowait(self.rnd.choice(WORDS) + " ")
                if job.emitted >= job.max_tokens:
                    self._retire(job, now)

    def _retire(self, job: _Job, now: float) -> None:
        self.gpu.set_load(job.id, now, 0.0)
        self.gpu.forget(job.id)
        self.jobs.pop(job.id, None)
        job.out.put_nowait(None)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
        chat = request.path.endswith("/chat/completions")
        text = json.dumps(body.get("messages") if chat else body.get("prompt"))
        prompt_tokens = max(1, len(text) // 4)
        max_tokens = int(body.get("max_tokens") or 64)
        model = str(body.get("model") or "demo-llm")
        self._ids += 1
        job = _Job(f"job-{self._ids}", prompt_tokens, max_tokens, self.clock())
        self.jobs[job.id] = job
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": max_tokens,
            "total_tokens": prompt_tokens + max_tokens,
        }
        try:
            if not body.get("stream"):
                pieces = []
                while (piece := await job.out.get()) is not None:
                    pieces.append(piece)
                content = "".join(pieces)
                choice: dict[str, Any] = (
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "length",
                    }
                    if chat
                    else {"index": 0, "text": content, "finish_reason": "length"}
                )
                return web.json_response(
                    {
                        "id": job.id,
                        "object": obj,
                        "created": created,
                        "model": model,
                        "choices": [choice],
                        "usage": usage,
                    }
                )
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            while (piece := await job.out.get()) is not None:
                delta: dict[str, Any] = {"delta": {"content": piece}} if chat else {"text": piece}
                chunk = {
                    "id": job.id,
                    "object": obj + ".chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, **delta, "finish_reason": None}],
                }
                if include_usage:
                    chunk["usage"] = None
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if include_usage:
                last = {
                    "id": job.id,
                    "object": obj + ".chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            if job.id in self.jobs:  # client left early: free the batch slot
                self._retire(job, self.clock())

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.cleanup_ctx.append(self._run_engine)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "demo-llm", "object": "model"}]}
        )

    async def _run_engine(self, app: web.Application) -> Any:
        self._engine = asyncio.create_task(self.engine())
        yield
        self._engine.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._engine


async def load_generator(
    url: str, rps: float, stop: asyncio.Event, seed: int = 1
) -> dict[str, int]:
    """Bursts and quiet spells: 20 s cycles of busy, normal and silent stretches."""
    rnd = random.Random(seed)
    counts = {"sent": 0, "ok": 0, "failed": 0}
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            chat = rnd.random() < 0.8
            words = " ".join(rnd.choice(WORDS) for _ in range(int(rnd.expovariate(1 / 120)) + 5))
            body: dict[str, Any] = {
                "model": rnd.choice(["demo-llm", "demo-llm", "demo-llm-mini"]),
                "max_tokens": rnd.randint(8, 96),
                "stream": rnd.random() < 0.85,
            }
            if chat:
                body["messages"] = [{"role": "user", "content": words}]
            else:
                body["prompt"] = words
            if body["stream"] and rnd.random() < 0.7:
                body["stream_options"] = {"include_usage": True}
            path = "/v1/chat/completions" if chat else "/v1/completions"
            try:
                async with session.post(url + path, json=body) as r:
                    await r.read()
                    counts["ok" if r.status < 400 else "failed"] += 1
            except aiohttp.ClientError:
                counts["failed"] += 1

        while not stop.is_set():
            phase = ((time.monotonic() - t0) / 20.0) % 1.0
            rate = rps * (2.5 if phase < 0.3 else 0.0 if phase > 0.65 else 1.0)
            if rate <= 0:
                await asyncio.sleep(0.25)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), rnd.expovariate(rate))
            if stop.is_set():
                break
            counts["sent"] += 1
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=15)
    return counts


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(doc: dict[str, Any]) -> str:
    w = doc["last_minute"]
    return (
        f"power {doc['power_watts']:7.1f} W | idle share {_fmt(w['idle_share'] and w['idle_share'] * 100, '5.1f')} % | "
        f"{_fmt(w['joules_per_request_attributed'], '7.1f')} J/req | {_fmt(w['joules_per_output_token'], '5.2f')} J/token | "
        f"{_fmt(w['grams_per_request'] and w['grams_per_request'] * 1000, '6.2f')} mgCO2e/req | "
        f"{w['requests'] / max(w['seconds'], 1e-9):5.2f} req/s"
    )


async def run_demo(duration_s: float, rps: float, listen: str, metrics_listen: str) -> int:
    gpu = SimulatedGpus(gpus=1, idle_w=75.0, noise_w=1.5, seed=42)
    server = ModelServer(gpu)
    model_runner = web.AppRunner(server.app(), access_log=None)
    await model_runner.setup()
    model_site = web.TCPSite(model_runner, "127.0.0.1", 0)
    await model_site.start()
    model_port = model_runner.addresses[0][1]
    settings = Settings.without_env(
        upstream=f"http://127.0.0.1:{model_port}",
        listen=listen,
        metrics_listen=metrics_listen,
        power_source="simulated",
        inject_usage=True,
        model="demo-llm",
    )
    sidecar = Sidecar(settings, env={}, simulated=gpu, drive_simulated=False)
    await sidecar.start()
    runners = [model_runner]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        metrics_runner = web.AppRunner(sidecar.metrics_app(), access_log=None)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, *split_host_port(metrics_listen)).start()
        proxy_runner = web.AppRunner(
            sidecar.proxy_app(), access_log=None, handler_cancellation=True
        )
        await proxy_runner.setup()
        await web.TCPSite(proxy_runner, *split_host_port(listen)).start()
        runners = [proxy_runner, metrics_runner, model_runner]
        host, port = split_host_port(listen)
        mhost, mport = split_host_port(metrics_listen)
        page_host = "127.0.0.1" if mhost in ("", "0.0.0.0", "::") else mhost
        print(f"demo: live page on http://{page_host}:{mport}/", flush=True)
        print(
            f"demo: model server on 127.0.0.1:{model_port}, sidecar proxy on {host}:{port}, "
            f"metrics on http://{mhost}:{mport}/metrics  ({duration_s:g} s at ~{rps:g} req/s; Ctrl-C ends early)"
        )
        gen = asyncio.create_task(load_generator(f"http://{host}:{port}", rps, stop))
        t_end = time.monotonic() + duration_s
        assert sidecar.meter is not None
        while not stop.is_set() and time.monotonic() < t_end:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            print(_line(sidecar.meter.summary(sidecar.stats().last_power_w)), flush=True)
        stop.set()
        counts = await gen
        await asyncio.sleep(0.5)
    finally:
        for runner in runners:
            await runner.cleanup()
        await sidecar.stop()
    assert sidecar.meter is not None
    doc = sidecar.meter.summary(sidecar.stats().last_power_w)
    print_final(doc, counts)
    return 0


def print_final(doc: dict[str, Any], counts: dict[str, int]) -> None:
    s = doc["since_start"]
    e = s["energy_joules"]
    ci = doc["carbon_intensity"]
    rows = [
        ("requests sent / finished", f"{counts['sent']} / {s['requests']}"),
        (
            "GPU energy",
            f"{e['total']:.0f} J (dynamic {e['dynamic']:.0f}, idle serving {e['idle_serving']:.0f}, standby {e['idle_standby']:.0f})",
        ),
        ("idle baseline", f"{doc['idle_baseline_watts']:.1f} W"),
        (
            "idle share",
            f"{_fmt(s['idle_share'] and s['idle_share'] * 100, '.1f')} % (standby {_fmt(s['standby_share'] and s['standby_share'] * 100, '.1f')} %)",
        ),
        (
            "energy per request",
            f"{_fmt(s['joules_per_request_attributed'], '.1f')} J attributed, {_fmt(s['joules_per_request_all_in'], '.1f')} J all-in",
        ),
        (
            "energy per output token",
            f"{_fmt(s['joules_per_output_token'], '.3f')} J attributed, {_fmt(s['joules_per_output_token_all_in'], '.3f')} J all-in",
        ),
        ("carbon intensity", f"{ci['grams_per_kwh']:g} g/kWh ({ci['source']}, {ci['region']})"),
        (
            "gCO2e per request",
            f"{_fmt(s['grams_per_request'], '.5f')} g operational, SCI {_fmt(s['sci_grams_per_request'], '.5f')} g",
        ),
        (
            "SCI per 1,000 output tokens",
            f"{_fmt(s['sci_grams_per_1k_tokens'], '.4f')} gCO2e (operational + embodied)",
        ),
    ]
    print("\nsummary")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    sys.stdout.flush()
