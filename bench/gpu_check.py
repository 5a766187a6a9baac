"""What a real NVIDIA GPU gives the sidecar: ``python3 bench/gpu_check.py [--out DIR]``.

Prepared to run in one short call on an H100 or H200 where torch and
transformers are installed but nothing can be downloaded, and where the
sidecar's own dependencies may be missing (bring them as wheels: see
bench/README.md and bench/gpu_wheels.sh). It needs only the repository,
pynvml (nvidia-ml-py), aiohttp, structlog, pydantic, pydantic-settings,
prometheus-client, stamina and pyyaml; torch and transformers for the model.

It reports, as JSON and text, in ``$OUT`` (or ``--out``, or bench/results/):

1. which NVML readings work: the instant power field (186), the 1-second
   average, the energy counter, the driver's power-sample buffer, and what
   each call costs;
2. the highest useful sampling rate: how often each reading really changes;
3. the error of integrated instant power against the energy counter, polled
   at 10 and at 50 Hz, idle and under load (a bf16 matrix-product loop);
4. idle against loaded power;
5. joules per prompt token against joules per output token of a small model
   (the ratio the proposed prefill weighting needs);
6. 60 s of the sidecar (``sidecar.app.Sidecar``, ``--power-source nvml``) in
   front of a tiny local OpenAI-compatible server running a transformer with
   random weights on the GPU, streaming: per-request energy, and conservation
   against the energy counter.

Without a GPU it says so in one line and writes a report marked ``skipped``
(exit status 0). ``--rehearse`` runs every step against a fake NVML (the
tests' fake pynvml, made to move with the clock) and a CPU stand-in model
server, so the logic is exercised where no GPU exists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script on a machine where the package is not installed
    sys.path.insert(0, str(ROOT))

FIELD_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT
DEPENDENCIES = (
    ("pynvml", "nvidia-ml-py"),
    ("aiohttp", "aiohttp"),
    ("structlog", "structlog"),
    ("pydantic", "pydantic"),
    ("pydantic_settings", "pydantic-settings"),
    ("prometheus_client", "prometheus-client"),
    ("stamina", "stamina"),
    ("yaml", "pyyaml"),
)


def say(msg: str) -> None:
    sys.stderr.write(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def missing_dependencies() -> list[str]:
    out: list[str] = []
    for module, dist in DEPENDENCIES:
        try:
            importlib.import_module(module)
        except ImportError:
            out.append(dist)
    return out


# --------------------------------------------------------------------- NVML access


@dataclass(slots=True)
class Nvml:
    """The pynvml module (real or fake) and the handle of the GPU under test."""

    mod: Any
    handle: Any
    index: int = 0

    def instant_mw(self) -> tuple[int, int]:
        """(mW, driver timestamp µs) of the instant power field; raises on failure."""
        (f,) = self.mod.nvmlDeviceGetFieldValues(self.handle, [FIELD_POWER_INSTANT])
        if f.nvmlReturn != self.mod.NVML_SUCCESS:
            raise self.mod.NVMLError(f.nvmlReturn)
        return int(f.value.uiVal), int(getattr(f, "timestamp", 0))

    def average_mw(self) -> int:
        return int(self.mod.nvmlDeviceGetPowerUsage(self.handle))

    def energy_mj(self) -> int:
        return int(self.mod.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def buffer(self, since_us: int) -> list[tuple[int, int]]:
        """(wall-clock µs, mW) samples newer than ``since_us`` from the driver's buffer."""
        try:
            _, raw = self.mod.nvmlDeviceGetSamples(
                self.handle, self.mod.NVML_TOTAL_POWER_SAMPLES, since_us
            )
        except self.mod.NVMLError_NotFound:
            return []
        return sorted((int(s.timeStamp), int(s.sampleValue.uiVal)) for s in raw)


def open_nvml(fake: bool, index: int) -> tuple[Nvml | None, str]:
    """The GPU under test, or ``None`` and why not (no driver, no GPU)."""
    if fake:
        from bench.fakegpu import LiveFakeNvml, fake_gpus

        mod: Any = LiveFakeNvml(fake_gpus(1, buffer=True))
    else:
        try:
            import pynvml

            mod = pynvml
        except ImportError as e:
            return None, f"pynvml is not importable ({e}): pip install nvidia-ml-py"
    try:
        mod.nvmlInit()
    except Exception as e:
        return None, f"NVML did not start ({e}): no NVIDIA driver here"
    count = int(mod.nvmlDeviceGetCount())
    if count <= index:
        mod.nvmlShutdown()
        return None, f"NVML sees {count} GPU(s); GPU {index} is not there"
    return Nvml(mod, mod.nvmlDeviceGetHandleByIndex(index), index), "ok"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _try(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, fn()
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"


def _cost_us(fn: Callable[[], Any], n: int = 200) -> float | None:
    """Median wall time of one call, µs (None if it fails)."""
    times: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:
            return None
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def probe(nv: Nvml) -> dict[str, Any]:
    """Which readings work on this GPU, their raw values and what one call costs."""
    m = nv.mod
    out: dict[str, Any] = {}
    ok, v = _try(lambda: _text(m.nvmlSystemGetDriverVersion()))
    out["driver"] = v if ok else None
    out["name"] = _text(m.nvmlDeviceGetName(nv.handle))
    out["uuid"] = _text(m.nvmlDeviceGetUUID(nv.handle))
    ok, v = _try(lambda: int(m.nvmlDeviceGetPowerManagementLimit(nv.handle)) / 1000.0)
    out["power_limit_w"] = v if ok else None
    # the instant field, every member of the value union, to settle uiVal against siVal
    ok, v = _try(lambda: m.nvmlDeviceGetFieldValues(nv.handle, [FIELD_POWER_INSTANT])[0])
    if ok:
        members = {}
        for name in ("uiVal", "siVal", "ulVal", "ullVal", "sllVal", "dVal"):
            with contextlib.suppress(Exception):
                members[name] = getattr(v.value, name)
        out["instant_field"] = {
            "works": int(v.nvmlReturn) == int(m.NVML_SUCCESS),
            "nvml_return": int(v.nvmlReturn),
            "value_type": int(getattr(v, "valueType", -1)),
            "value_members": members,
            "timestamp_us": int(getattr(v, "timestamp", 0)),
            "latency_us": int(getattr(v, "latencyUsec", 0)),
        }
    else:
        out["instant_field"] = {"works": False, "error": v}
    ok, v = _try(nv.average_mw)
    out["average_power"] = {"works": ok, "mw": v if ok else None, "error": None if ok else v}
    ok, v = _try(nv.energy_mj)
    out["energy_counter"] = {"works": ok, "mj": v if ok else None, "error": None if ok else v}
    ok, v = _try(lambda: nv.buffer(0))
    if ok:
        stamps = [t for t, _ in v]
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        out["sample_buffer"] = {
            "works": True,
            "samples": len(v),
            "median_gap_us": statistics.median(gaps) if gaps else None,
            "span_s": (stamps[-1] - stamps[0]) / 1e6 if len(stamps) > 1 else 0.0,
            "mw_range": [min(p for _, p in v), max(p for _, p in v)] if v else None,
        }
    else:
        out["sample_buffer"] = {"works": False, "error": v}
    out["call_cost_us"] = {
        "instant_field": _cost_us(nv.instant_mw),
        "average_power": _cost_us(nv.average_mw),
        "energy_counter": _cost_us(nv.energy_mj, 50),
        "sample_buffer": _cost_us(lambda: nv.buffer(int(time.time() * 1e6) - 200_000), 50),
    }
    return out


def sidecar_probe(fake_mod: Any | None, index: int) -> dict[str, Any]:
    """The sidecar's own NvmlSource on this GPU: what it decided to use, and a few reads."""
    from sidecar.power.nvml import NvmlSource

    src = NvmlSource([str(index)], nvml=fake_mod, env={})
    try:
        infos = src.open()
        caps = src.capabilities[infos[0].gpu]
        reads = []
        for _ in range(5):
            batch = src.read()
            reads.append(
                [{"t": getattr(s, "time_s", None), "w": getattr(s, "power_w", None)} for s in batch]
            )
            time.sleep(0.1)
        return {
            "instant_power": caps.instant_power,
            "energy_counter": caps.energy_counter,
            "sample_buffer": caps.sample_buffer,
            "mig": caps.mig,
            "samples_per_read": [len(r) for r in reads],
        }
    finally:
        src.close()


# ------------------------------------------------------------------ rates, errors


def refresh_rates(nv: Nvml, seconds: float) -> dict[str, Any]:
    """How often each reading changes: poll as fast as possible, count changes per second."""
    t_end = time.monotonic() + seconds
    polls = 0
    last_val: int | None = None
    last_ts: int | None = None
    val_changes = ts_changes = 0
    energy_changes = 0
    last_e: int | None = None
    steps: list[int] = []
    avg_changes = 0
    last_avg: int | None = None
    while time.monotonic() < t_end:
        polls += 1
        with contextlib.suppress(Exception):
            v, ts = nv.instant_mw()
            if last_val is not None and v != last_val:
                val_changes += 1
            if last_ts is not None and ts != last_ts:
                ts_changes += 1
            last_val, last_ts = v, ts
        if polls % 4 == 0:  # the counter call is dearer: every fourth poll
            with contextlib.suppress(Exception):
                e = nv.energy_mj()
                if last_e is not None and e != last_e:
                    energy_changes += 1
                    steps.append(e - last_e)
                last_e = e
            with contextlib.suppress(Exception):
                a = nv.average_mw()
                if last_avg is not None and a != last_avg:
                    avg_changes += 1
                last_avg = a
    since = int(time.time() * 1e6 - seconds * 1e6)
    buf: list[tuple[int, int]] = []
    with contextlib.suppress(Exception):
        buf = nv.buffer(since)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(buf)]
    return {
        "seconds": seconds,
        "polls_per_s": polls / seconds,
        "instant_value_changes_per_s": val_changes / seconds,
        "instant_timestamp_changes_per_s": ts_changes / seconds,
        "average_value_changes_per_s": avg_changes / seconds,
        "energy_counter_changes_per_s": energy_changes / seconds,
        "energy_counter_median_step_mj": statistics.median(steps) if steps else None,
        "buffer_samples_per_s": len(buf) / seconds if buf else 0.0,
        "buffer_median_gap_ms": statistics.median(gaps) / 1e3 if gaps else None,
    }


def poll(nv: Nvml, hz: float, seconds: float) -> dict[str, Any]:
    """Instant power at ``hz`` and the counter at both ends: integral against counter.

    The 10 Hz figure comes from every fifth sample of a 50 Hz run, so both
    rates integrate the very same stretch of power. The 1-second average is
    integrated too, polled every fifth sample, and the buffer's own samples.
    """
    period = 1.0 / hz
    samples: list[tuple[float, float]] = []
    averages: list[tuple[float, float]] = []
    e0 = nv.energy_mj()
    t0 = time.monotonic()
    buf_since = int(time.time() * 1e6)
    buf: list[tuple[int, int]] = []
    buf_last = buf_since
    next_t = t0
    k = 0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        with contextlib.suppress(Exception):
            mw, _ = nv.instant_mw()
            samples.append((now, mw / 1000.0))
        if k % 5 == 0:
            with contextlib.suppress(Exception):
                averages.append((now, nv.average_mw() / 1000.0))
        if k % 25 == 0:  # the driver's buffer holds a few seconds at most: drain it as we go
            with contextlib.suppress(Exception):
                fresh = nv.buffer(buf_last)
                if fresh:
                    buf.extend(fresh)
                    buf_last = fresh[-1][0]
        k += 1
        next_t += period
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    e1 = nv.energy_mj()
    t1 = time.monotonic()
    with contextlib.suppress(Exception):
        buf.extend(nv.buffer(buf_last))
    counter_j = (e1 - e0) / 1000.0
    span = t1 - t0

    def integral(points: list[tuple[float, float]]) -> float | None:
        """Trapezoid over the points, held flat to the window's ends (t0, t1)."""
        if len(points) < 2:
            return None
        total = points[0][1] * (points[0][0] - t0) + points[-1][1] * (t1 - points[-1][0])
        for (a, pa), (b, pb) in itertools.pairwise(points):
            total += (pa + pb) / 2.0 * (b - a)
        return total

    def err(j: float | None) -> float | None:
        return None if j is None or counter_j <= 0 else (j - counter_j) / counter_j * 100.0

    buf_points = [(t0 + (ts - buf_since) / 1e6, mw / 1000.0) for ts, mw in buf]
    i50 = integral(samples)
    i10 = integral(samples[::5])
    return {
        "seconds": span,
        "counter_j": counter_j,
        "counter_mean_w": counter_j / span if span > 0 else None,
        "instant_mean_w": statistics.fmean(p for _, p in samples) if samples else None,
        "samples_50hz": len(samples),
        "error_percent_50hz": err(i50),
        "error_percent_10hz": err(i10),
        "error_percent_average_10hz": err(integral(averages)),
        "error_percent_buffer": err(integral(buf_points)),
        "buffer_samples": len(buf),
        "buffer_coverage_s": (buf[-1][0] - buf[0][0]) / 1e6 if len(buf) > 1 else 0.0,
    }


# ------------------------------------------------------------------------- load


class MatmulLoad:
    """A bf16 matrix-product loop on the GPU in a background thread (the 'loaded' state)."""

    def __init__(self, size: int = 8192) -> None:
        self._size = size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def __enter__(self) -> MatmulLoad:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(1.5)  # clocks and power settle
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        time.sleep(1.5)  # power falls back before the next idle reading

    def _run(self) -> None:
        try:
            torch = importlib.import_module("torch")  # on the GPU machine only
            a = torch.randn(self._size, self._size, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(self._size, self._size, device="cuda", dtype=torch.bfloat16)
            while not self._stop.is_set():
                for _ in range(8):
                    a = torch.matmul(a, b)
                    a = a / (a.abs().amax() + 1.0)
                torch.cuda.synchronize()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"


class NoLoad:
    """Rehearsal stand-in for :class:`MatmulLoad` (the fake GPU swings by itself)."""

    error: str | None = None

    def __enter__(self) -> NoLoad:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------- model server

MODEL_SERVER = r"""
import asyncio, json, sys, time
import torch
from aiohttp import web
from transformers import LlamaConfig, LlamaForCausalLM

DEVICE = sys.argv[2] if len(sys.argv) > 2 else "cuda"
torch.manual_seed(0)
if DEVICE == "cuda":  # about 200 M parameters: small, but each token is real GPU work
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=4096)
else:  # rehearsal on a CPU: the same code path, a toy size
    cfg = LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=4096)
model = LlamaForCausalLM(cfg).to(device=DEVICE, dtype=torch.bfloat16).eval()
lock = asyncio.Lock()

@torch.inference_mode()
def prefill(ids):
    out = model(input_ids=torch.tensor([ids], device=DEVICE), use_cache=True)
    return int(out.logits[0, -1].argmax()), out.past_key_values

@torch.inference_mode()
def decode(tok, past):
    out = model(input_ids=torch.tensor([[tok]], device=DEVICE), past_key_values=past, use_cache=True)
    return int(out.logits[0, -1].argmax()), out.past_key_values

def chunk(text, usage=None, finish=None):
    doc = {"id": "cmpl-gpu", "object": "chat.completion.chunk", "created": 1, "model": "tiny-llama",
           "choices": [] if usage else [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    if usage:
        doc["usage"] = usage
    return b"data: " + json.dumps(doc).encode() + b"\n\n"

async def chat(request):
    body = await request.json()
    text = "".join(m.get("content", "") for m in body.get("messages", []))
    ids = [b % 32000 for b in text.encode()][:3000] or [1]
    n = int(body.get("max_tokens", 16))
    stream = bool(body.get("stream"))
    async with lock:  # one request at a time on the GPU: no batching
        if stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
        tok, past = await asyncio.to_thread(prefill, ids)
        out = [tok]
        if stream:
            await resp.write(chunk(f" t{tok}"))
        for k in range(1, n):
            tok, past = await asyncio.to_thread(decode, tok, past)
            out.append(tok)
            if stream:
                await resp.write(chunk(f" t{tok}", finish="stop" if k == n - 1 else None))
    usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
    if not stream:
        return web.json_response({"id": "cmpl-gpu", "object": "chat.completion", "model": "tiny-llama",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(f"t{t}" for t in out)}}],
            "usage": usage})
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(chunk("", usage=usage))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp

async def health(request):
    return web.Response(text="ok")

prefill([1, 2, 3])  # warm the kernels before the first request (argmax synchronises)
app = web.Application(client_max_size=1 << 24)
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_model_server(
    rehearse: bool, port: int, log_path: Path, *, model_cpu: bool = False
) -> subprocess.Popen[bytes]:
    """The tiny model server (GPU), or in rehearsal the tests' stand-in or the model on CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if model_cpu:
        cmd = [sys.executable, "-c", MODEL_SERVER, str(port), "cpu"]
    elif rehearse:
        cmd = [sys.executable, "-m", "bench.upstream", str(port)]
    else:
        cmd = [sys.executable, "-c", MODEL_SERVER, str(port)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_path.open("wb")
    )


async def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the model server exited with status {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    await r.read()
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")
            await asyncio.sleep(0.25)


def _prompt(rnd: random.Random, n_bytes: int) -> str:
    return "".join(chr(97 + rnd.randrange(26)) for _ in range(n_bytes))


async def _chat(
    session: Any, url: str, prompt: str, max_tokens: int, *, rehearse: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if rehearse:
        body["delay"] = 0.01  # the stand-in streams with a pause between chunks
    async with session.post(url, json=body) as r:
        data = await r.read()
        return {"status": r.status, "bytes": len(data), "done": data.endswith(b"[DONE]\n\n")}


async def prefill_decode_ratio(
    nv: Nvml, url: str, seconds: float, *, rehearse: bool
) -> dict[str, Any]:
    """J per prompt token and per output token from the counter: long prompts, then long outputs."""
    import aiohttp

    rnd = random.Random(1)
    out: dict[str, Any] = {}
    idle_w = _mean_power(nv, 2.0)
    async with aiohttp.ClientSession() as s:
        for kind, prompt_len, max_tokens in (("prefill", 2048, 1), ("decode", 16, 256)):
            e0, t0 = nv.energy_mj(), time.monotonic()
            prompt_tokens = output_tokens = requests = 0
            while time.monotonic() - t0 < seconds:
                await _chat(s, url, _prompt(rnd, prompt_len), max_tokens, rehearse=rehearse)
                prompt_tokens += prompt_len
                output_tokens += max_tokens
                requests += 1
            e1, t1 = nv.energy_mj(), time.monotonic()
            dyn_j = (e1 - e0) / 1000.0 - idle_w * (t1 - t0)
            out[kind] = {
                "requests": requests,
                "prompt_tokens": prompt_tokens,
                "output_tokens": output_tokens,
                "seconds": t1 - t0,
                "dynamic_j": dyn_j,
                "mean_w": (e1 - e0) / 1000.0 / (t1 - t0),
            }
    # prefill runs also decode 1 token each; decode runs also prefill 16 tokens each:
    # solve the 2x2 system dyn = a * prompt + b * output for the two runs
    p1, o1, d1 = (out["prefill"][k] for k in ("prompt_tokens", "output_tokens", "dynamic_j"))
    p2, o2, d2 = (out["decode"][k] for k in ("prompt_tokens", "output_tokens", "dynamic_j"))
    det = p1 * o2 - p2 * o1
    if det:
        a = (d1 * o2 - d2 * o1) / det
        b = (p1 * d2 - p2 * d1) / det
        out["j_per_prompt_token"] = a
        out["j_per_output_token"] = b
        out["prompt_weight"] = a / b if b > 0 else None
    out["idle_w"] = idle_w
    return out


def _mean_power(nv: Nvml, seconds: float) -> float:
    e0, t0 = nv.energy_mj(), time.monotonic()
    time.sleep(seconds)
    return (nv.energy_mj() - e0) / 1000.0 / (time.monotonic() - t0)


@dataclass(slots=True)
class E2E:
    finished: list[Any] = field(default_factory=list)


async def sidecar_e2e(
    nv: Nvml,
    model_url: str,
    seconds: float,
    *,
    rehearse: bool,
    fake_mod: Any | None,
    gpu: int,
    trace_dir: Path,
) -> dict[str, Any]:
    """The sidecar in front of the model server: per-request energy and conservation.

    The sidecar records its trace (``--record``) into ``trace_dir``: the raw
    samples carry the hardware counter, so the counter's increase over exactly
    the sampled span is the yardstick for the ledger's total; ``attribute`` on
    the same trace checks that offline attribution agrees with the live one.
    """
    import aiohttp
    from aiohttp import web

    from sidecar.app import Sidecar
    from sidecar.config import Settings
    from sidecar.ledger import FinishedRequest

    if fake_mod is not None:  # rehearsal: the sidecar's NvmlSource gets the fake module
        import sidecar.power.nvml as nvml_mod

        nvml_mod._import_pynvml = lambda: fake_mod

    got = E2E()

    class RecordingSidecar(Sidecar):
        def _record_request(self, finished: FinishedRequest) -> None:
            got.finished.append(finished)
            super()._record_request(finished)  # and on to the recorder

    port, mport = free_port(), free_port()
    settings = Settings.without_env(
        upstream=model_url,
        power_source="nvml",
        gpus=(str(gpu),),
        listen=f"127.0.0.1:{port}",
        metrics_listen=f"127.0.0.1:{mport}",
        sample_hz=10.0,
        record=trace_dir,
    )
    for old in ("power.csv", "requests.csv"):
        (trace_dir / old).unlink(missing_ok=True)
    e_before = nv.energy_mj()
    sc = RecordingSidecar(settings, env={})
    await sc.start()
    runners: list[web.AppRunner] = []
    try:
        for app, p in ((sc.proxy_app(), port), (sc.metrics_app(), mport)):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", p).start()
            runners.append(runner)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        rnd = random.Random(2)
        ok = failed = 0
        t_end = time.monotonic() + seconds

        async def client() -> None:
            nonlocal ok, failed
            async with aiohttp.ClientSession() as s:
                while time.monotonic() < t_end:
                    prompt_len = int(math.exp(rnd.uniform(math.log(32), math.log(2048))))
                    max_tokens = int(math.exp(rnd.uniform(math.log(8), math.log(256))))
                    r = await _chat(s, url, _prompt(rnd, prompt_len), max_tokens, rehearse=rehearse)
                    if r["status"] == 200 and r["done"]:
                        ok += 1
                    else:
                        failed += 1
                    await asyncio.sleep(rnd.uniform(0.0, 0.6))  # some standby between requests

        await asyncio.gather(client(), client())
        await asyncio.sleep(3.0)  # samples past the last end: energy final
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{mport}/summary") as r,
        ):
            summary = await r.json()
    finally:
        for runner in runners:
            await runner.cleanup()
        await sc.stop()
    e_after = nv.energy_mj()
    meter = sc.meter
    assert meter is not None
    ledger = meter.ledger
    total_j = ledger.total_j
    counter_j = (e_after - e_before) / 1000.0
    reqs = [f for f in got.finished if f.endpoint != "other"]
    energies = [f.energy_j for f in reqs]
    dyn = [f.dynamic_j for f in reqs]
    tokens = [f.completion_tokens or 0 for f in reqs]
    per_token = [f.dynamic_j / t for f, t in zip(reqs, tokens, strict=True) if t]
    sum_req = sum(energies)
    span = _recorded_span(trace_dir, str(gpu))
    try:
        offline = _offline_agreement(trace_dir, reqs)
    except Exception as e:  # the live figures stand on their own
        offline = {"error": f"{type(e).__name__}: {e}"}
    return {
        "seconds": seconds,
        "requests_ok": ok,
        "requests_failed": failed,
        "requests_metered": len(reqs),
        "energy_j": {k: ledger.phase_j[k] for k in ("dynamic", "idle_serving", "idle_standby")},
        "ledger_total_j": total_j,
        "counter_j_sampled_span": span,
        "ledger_vs_counter_sampled_span_percent": (total_j - span) / span * 100.0 if span else None,
        "counter_j_whole_run": counter_j,
        "ledger_vs_counter_percent": (total_j - counter_j) / counter_j * 100.0
        if counter_j
        else None,
        "conservation_error": abs(sum_req + ledger.phase_j["idle_standby"] - total_j) / total_j
        if total_j
        else None,
        "idle_baseline_w": ledger.idle_baseline_w(),
        "request_j_median": statistics.median(energies) if energies else None,
        "request_dynamic_j_median": statistics.median(dyn) if dyn else None,
        "dynamic_j_per_output_token_median": statistics.median(per_token) if per_token else None,
        "dynamic_vs_tokens_r2": _r2(tokens, dyn),
        "sampler_interval_s": sc.stats().mean_interval_s,
        "offline_attribute": offline,
        "summary_since_start": summary.get("since_start"),
        "requests": [
            {
                "prompt": f.prompt_tokens,
                "completion": f.completion_tokens,
                "seconds": round(f.end_s - f.start_s, 3),
                "dynamic_j": round(f.dynamic_j, 3),
                "idle_j": round(f.idle_j, 3),
            }
            for f in reqs[:400]
        ],
    }


def _recorded_span(trace_dir: Path, gpu: str) -> float | None:
    """The hardware counter's increase between the first and last recorded sample, J."""
    from sidecar.trace import read_power

    rows = [r for r in read_power(trace_dir / "power.csv") if r.gpu == gpu and r.energy_j]
    if len(rows) < 2:
        return None
    rows.sort(key=lambda r: r.time_s)
    first, last = rows[0].energy_j, rows[-1].energy_j
    assert first is not None
    assert last is not None
    return last - first


def _offline_agreement(trace_dir: Path, live: list[Any]) -> dict[str, Any]:
    """``attribute`` on the recorded trace against the live per-request figures."""
    from sidecar.attribute import attribute
    from sidecar.trace import read_power, read_requests

    doc = attribute(read_power(trace_dir / "power.csv"), read_requests(trace_dir / "requests.csv"))
    offline = {q["id"]: float(q["energy_joules"]) for q in doc["requests"]}
    diffs = [
        abs(offline[f.id] - f.energy_j) / f.energy_j * 100.0
        for f in live
        if f.id in offline and f.energy_j > 0
    ]
    return {
        "total_j": doc["energy_joules"]["total"],
        "idle_baseline_w": doc["idle_baseline_watts"],
        "requests": len(offline),
        "median_abs_diff_percent_vs_live": statistics.median(diffs) if diffs else None,
    }


def _r2(xs: list[int], ys: list[float]) -> float | None:
    """Share of the variance of per-request dynamic energy explained by output tokens."""
    if len(xs) < 3:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy * sxy / (sxx * syy) if sxx and syy else None


# ---------------------------------------------------------------------- report


def out_dir(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    env = os.environ.get("OUT")
    return Path(env) if env else ROOT / "bench" / "results"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _flatten(prefix: str, doc: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _flatten(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(doc, list) and doc and isinstance(doc[0], dict):
        yield prefix, f"[{len(doc)} rows in the JSON]"
    else:
        yield prefix, doc


def text_report(report: dict[str, Any]) -> str:
    return "\n".join(f"{k:<60} {_fmt(v)}" for k, v in _flatten("", report))


def write(report: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = "rehearsal" if report.get("rehearsal") else "gpu-check"
    j = directory / f"{tag}-{stamp}.json"
    t = directory / f"{tag}-{stamp}.txt"
    j.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    t.write_text(text_report(report) + "\n", encoding="utf-8")
    return j, t


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(Exception):
        torch = importlib.import_module("torch")
        info["torch"] = torch.__version__
        info["cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(Exception):
        transformers = importlib.import_module("transformers")
        info["transformers"] = transformers.__version__
    return info


# ------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "rehearsal": bool(args.rehearse),
        "machine": machine(),
        "errors": [],
    }
    missing = missing_dependencies()
    report["missing_dependencies"] = missing
    if missing:
        report["status"] = "failed"
        report["errors"].append(
            "missing: " + ", ".join(missing) + " (install the wheels: bench/gpu_wheels.sh)"
        )
        return report
    from sidecar import logs

    logs.configure("warning", json=True)
    nv, why = open_nvml(args.rehearse, args.gpu)
    if nv is None:
        say(f"no NVIDIA GPU: {why}; the GPU checks are skipped (--rehearse runs them on a fake)")
        report["status"] = "skipped"
        report["reason"] = why
        return report
    fake_mod = nv.mod if args.rehearse else None
    scale = 0.25 if args.short else 1.0

    def step(name: str, fn: Callable[[], Any]) -> None:
        say(name)
        try:
            report[name] = fn()
        except Exception as e:
            report["errors"].append(f"{name}: {type(e).__name__}: {e}")
            report[name] = {"error": traceback.format_exc(limit=3)}

    try:
        step("probe", lambda: probe(nv))
        step("sidecar_nvml_source", lambda: sidecar_probe(fake_mod, args.gpu))
        step("rates_idle", lambda: refresh_rates(nv, 3.0 * scale))
        step("integration_idle_10_50hz", lambda: poll(nv, 50.0, 8.0 * scale))
        load: MatmulLoad | NoLoad = NoLoad() if args.rehearse else MatmulLoad()
        with load:
            step("rates_loaded", lambda: refresh_rates(nv, 3.0 * scale))
            step("integration_loaded_10_50hz", lambda: poll(nv, 50.0, 8.0 * scale))
        if load.error:
            report["errors"].append(f"matmul load: {load.error}")
        idle = report.get("integration_idle_10_50hz", {})
        busy = report.get("integration_loaded_10_50hz", {})
        report["power"] = {
            "idle_w": idle.get("counter_mean_w"),
            "loaded_w": busy.get("counter_mean_w"),
            "idle_instant_mean_w": idle.get("instant_mean_w"),
            "loaded_instant_mean_w": busy.get("instant_mean_w"),
        }
        rates = report.get("rates_loaded", {})
        report["highest_useful_hz"] = {
            # the driver stamps each refresh of the field: distinct stamps are its refresh rate
            "instant_field": rates.get("instant_timestamp_changes_per_s")
            or rates.get("instant_value_changes_per_s"),
            "energy_counter": rates.get("energy_counter_changes_per_s"),
            "sample_buffer": rates.get("buffer_samples_per_s"),
            "average_power": rates.get("average_value_changes_per_s"),
        }
        asyncio.run(model_steps(report, nv, args, fake_mod, scale))
    finally:
        with contextlib.suppress(Exception):
            nv.mod.nvmlShutdown()
    report["status"] = "ok" if not report["errors"] else "partial"
    return report


async def model_steps(
    report: dict[str, Any], nv: Nvml, args: argparse.Namespace, fake_mod: Any | None, scale: float
) -> None:
    directory = out_dir(args.out)
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if args.model_cpu:
        say("model server: the same transformer code, toy size, on the CPU (rehearsal)")
    elif args.rehearse:
        say("model server: the tests' stand-in (rehearsal)")
    else:
        say("model server: a transformer with random weights on the GPU")
    proc = start_model_server(
        args.rehearse, port, directory / "model-server.log", model_cpu=args.model_cpu
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/health", proc, 240.0)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        say("joules per prompt token against per output token")
        try:
            report["prefill_decode"] = await prefill_decode_ratio(
                nv, url, 10.0 * scale, rehearse=args.rehearse
            )
        except Exception as e:
            report["errors"].append(f"prefill_decode: {type(e).__name__}: {e}")
        say(f"the sidecar in front of it for {args.seconds * scale:.0f} s")
        try:
            report["sidecar_e2e"] = await sidecar_e2e(
                nv,
                f"http://127.0.0.1:{port}",
                args.seconds * scale,
                rehearse=args.rehearse,
                fake_mod=fake_mod,
                gpu=args.gpu,
                trace_dir=directory / "e2e-trace",
            )
        except Exception as e:
            report["errors"].append(f"sidecar_e2e: {type(e).__name__}: {e}")
            report["sidecar_e2e"] = {"error": traceback.format_exc(limit=4)}
    except Exception as e:
        report["errors"].append(f"model server: {type(e).__name__}: {e}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, help="report folder (default $OUT, else bench/results)")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU under test")
    parser.add_argument("--seconds", type=float, default=60.0, help="sidecar end-to-end run")
    parser.add_argument("--short", action="store_true", help="every step at a quarter length")
    parser.add_argument(
        "--rehearse", action="store_true", help="fake NVML and a CPU stand-in server"
    )
    parser.add_argument(
        "--model-cpu",
        action="store_true",
        help="with --rehearse: the real model server code on the CPU (needs torch, transformers)",
    )
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    report = run(args)
    report["wall_s"] = round(time.monotonic() - t0, 1)
    j, t = write(report, out_dir(args.out))
    sys.stdout.write(text_report(report) + "\n")
    say(f"status {report['status']}; report in {j} and {t}")
    return 0 if report["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
