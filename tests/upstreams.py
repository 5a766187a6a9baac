"""Stand-in model servers speaking the real wire shapes of vLLM, TGI and Ollama.

Deterministic bodies, so a test can compare what the client got through the
proxy with what the server sent, byte for byte.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

from aiohttp import web

WORDS = ["The", " sidecar", " counts", " every", " joule", "."]
STATE = web.AppKey("state", dict)


def openai_chunks(
    model: str, n: int, include_usage: bool, chat: bool = True, null_usage: bool | None = None
) -> list[bytes]:
    """OpenAI stream chunks; ``null_usage`` (default: as ``include_usage``) adds `"usage": null`."""
    null_usage = include_usage if null_usage is None else null_usage
    out = []
    for i in range(n):
        delta: dict[str, Any] = (
            {"delta": {"content": WORDS[i % len(WORDS)]}}
            if chat
            else {"text": WORDS[i % len(WORDS)]}
        )
        chunk: dict[str, Any] = {
            "id": "cmpl-1",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, **delta, "finish_reason": None if i < n - 1 else "stop"}],
        }
        if null_usage:
            chunk["usage"] = None
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    if include_usage:
        last = {
            "id": "cmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n},
        }
        out.append(b"data: " + json.dumps(last).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


async def chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state["auth"] = request.headers.get("Authorization")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return web.json_response({"error": {"message": "bad json"}}, status=400)
    if body.get("malformed") == "json":
        return web.Response(
            body=b'{"usage": {"prompt_tokens": 3,', headers={"Content-Type": "application/json"}
        )
    if body.get("malformed") == "sse":
        return web.Response(
            body=b"data: {not json\n\ndata: [DONE]\n\n",
            headers={"Content-Type": "text/event-stream"},
        )
    if body.get("gzip"):
        payload = json.dumps(
            {"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "x": "y" * 1000}
        ).encode()
        return web.Response(
            body=gzip.compress(payload, mtime=0),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
    if state.get("refuse_stream_options") and "stream_options" in body:
        state["refused"] = state.get("refused", 0) + 1
        return web.json_response(  # the shape of a strict server's validation error
            {
                "object": "error",
                "message": "stream_options: Extra inputs are not permitted",
                "type": "BadRequestError",
                "code": 400,
            },
            status=400,
        )
    if state.get("reject_all"):
        return web.json_response({"error": {"message": "model overloaded"}}, status=429)
    model = body.get("model", "served-model")
    n = int(body.get("max_tokens", 6))
    chat_api = request.path.endswith("chat/completions")
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        delay = float(body.get("delay", 0.0))
        state["streams_open"] = state.get("streams_open", 0) + 1
        try:
            always_null = bool(state.get("always_null"))  # SGLang writes it unasked
            never_null = bool(state.get("never_null"))  # vLLM omits it even when asked
            nulls = (include or always_null) and not never_null
            for piece in openai_chunks(model, n, include, chat_api, nulls):
                await resp.write(piece)
                if delay:
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            state["cancelled"] = state.get("cancelled", 0) + 1
            raise
        finally:
            state["streams_open"] -= 1
        await resp.write_eof()
        return resp
    text = "".join(WORDS[i % len(WORDS)] for i in range(n))
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}}
        if chat_api
        else {"index": 0, "text": text}
    )
    return web.json_response(
        {
            "id": "cmpl-2",
            "object": "chat.completion",
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n},
        }
    )


async def embeddings(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response(
        {
            "object": "list",
            "data": [{"embedding": [0.1, 0.2], "index": 0}],
            "model": "embedder",
            "usage": {"prompt_tokens": 5, "total_tokens": 5},
        }
    )


async def tgi_generate(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response(
        {
            "generated_text": "hello world",
            "details": {
                "finish_reason": "length",
                "generated_tokens": 2,
                "seed": None,
                "prefill": [],
                "tokens": [],
            },
        },
        headers={"x-prompt-tokens": "4", "x-generated-tokens": "2"},
    )


async def tgi_stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(3):
        last = i == 2
        ev = {
            "index": i,
            "token": {"id": i, "text": WORDS[i], "logprob": -0.1, "special": False},
            "top_tokens": None,
            "generated_text": "The sidecar counts" if last else None,
            "details": {
                "finish_reason": "length",
                "generated_tokens": 3,
                "seed": None,
                "input_length": 9,
            }
            if last
            else None,
        }
        await resp.write(b"data:" + json.dumps(ev).encode() + b"\n\n")
    await resp.write_eof()
    return resp


async def ollama(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = body.get("model", "llama3")
    chat_api = request.path == "/api/chat"
    objs = []
    for i in range(3):
        piece = (
            {"message": {"role": "assistant", "content": WORDS[i]}}
            if chat_api
            else {"response": WORDS[i]}
        )
        objs.append({"model": model, "created_at": "2024-01-01T00:00:00Z", **piece, "done": False})
    objs.append(
        {
            "model": model,
            "created_at": "2024-01-01T00:00:01Z",
            "done": True,
            "done_reason": "stop",
            "total_duration": 5000000,
            "prompt_eval_count": 12,
            "eval_count": 3,
            "eval_duration": 100,
        }
    )
    if body.get("stream") is False:
        return web.json_response(objs[-1])
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for o in objs:
        await resp.write(json.dumps(o).encode() + b"\n")
    await resp.write_eof()
    return resp


async def echo_digest(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        size += len(chunk)
    return web.json_response({"sha256": h.hexdigest(), "size": size})


async def status(request: web.Request) -> web.Response:
    await request.read()
    code = int(request.match_info["code"])
    return web.json_response({"error": {"message": f"status {code}"}}, status=code)


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text="# HELP up x\n# TYPE up gauge\nup 1\n", content_type="text/plain")


VLLM_SAMPLES = Path(__file__).parent / "data" / "vllm-0.32"


async def vllm_replay(request: web.Request) -> web.Response:
    """Answers /v1/responses and /v1/messages with bytes a real vLLM 0.32 sent."""
    body = await request.json()
    name = "responses" if request.path.endswith("/responses") else "messages"
    stream = body.get("stream") is True
    data = (VLLM_SAMPLES / f"{name}{'-stream' if stream else ''}.body").read_bytes()
    ctype = "text/event-stream; charset=utf-8" if stream else "application/json"
    return web.Response(body=data, headers={"Content-Type": ctype})


def create_upstream() -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app[STATE] = {}
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", vllm_replay)
    app.router.add_post("/v1/messages", vllm_replay)
    app.router.add_post("/generate", tgi_generate)
    app.router.add_post("/generate_stream", tgi_stream)
    app.router.add_post("/api/generate", ollama)
    app.router.add_post("/api/chat", ollama)
    app.router.add_post("/upload", echo_digest)
    app.router.add_post("/status/{code}", status)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
