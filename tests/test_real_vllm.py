"""A real vLLM behind the sidecar: every API shape counts the tokens vLLM itself counted.

The reference is vLLM's own ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total``,
read before and after each shape's requests; the sidecar (a real process, simulated GPU)
must book the same deltas within 1 %. Clients are the official ``openai`` package where it
speaks the shape, raw HTTP for the Anthropic-shape ``/v1/messages``.
Run with ``-rP`` to see the measured figures per shape.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import aiohttp
import openai
import pytest
from procs import free_port, start_sidecar, start_simulated
from vllm_counts import (
    SETTLE_TIMEOUT_S,
    Sidecar,
    counts,
    exactly,
    run_sidecar,
    settled,
    steady,
    within_1_percent,
)
from vllm_server import VllmServer

pytestmark = pytest.mark.vllm

MAX_TOKENS = 40
REQUESTS_PER_SHAPE = 3
PROMPTS = (
    "the sidecar counts every joule",
    "café naïve über 東京: how many watts does a prefill of this prompt take",
    "idle baseline carbon grams model server batch queue decode",
)


@pytest.fixture(scope="module")
def proxy(vllm: VllmServer) -> Generator[Sidecar, None, None]:
    """The sidecar in proxy mode in front of the session's vLLM, default flags (debug logs)."""
    port, mport = free_port(), free_port()
    # Debug level: the per-request ``request.finished`` lines are what the log test reads.
    proc = start_simulated(vllm.url, port, mport, "--log-level", "debug")
    sidecar = run_sidecar(proc, port, mport)
    yield sidecar
    sidecar.stop()


# ------------------------------------------------------------------ shapes

Shape = Callable[[str, str, int], Awaitable[None]]  # (base url, prompt, seed)


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="test-key", max_retries=0)


async def chat_chunks(base: str, prompt: str, seed: int, **shape: Any) -> list[Any]:
    """One streamed chat request's chunks; ``shape`` is what a chat shape adds to the call."""
    async with client(base) as c:
        stream = await c.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            seed=seed,
            stream=True,
            **shape,
        )
        return [chunk async for chunk in stream]


async def completion_chunks(base: str, prompt: str, seed: int, **shape: Any) -> list[Any]:
    """One streamed completion request's chunks; ``shape`` as for :func:`chat_chunks`."""
    async with client(base) as c:
        stream = await c.completions.create(
            model="tiny-llama",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            seed=seed,
            stream=True,
            **shape,
        )
        return [chunk async for chunk in stream]


async def chat_stream(base: str, prompt: str, seed: int) -> None:
    chunks = await chat_chunks(base, prompt, seed)
    assert chunks
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)  # asked for none


async def chat_stream_usage(base: str, prompt: str, seed: int) -> None:
    chunks = await chat_chunks(base, prompt, seed, stream_options={"include_usage": True})
    assert chunks[-1].usage is not None
    assert chunks[-1].choices == []


async def chat_stream_continuous_usage(base: str, prompt: str, seed: int) -> None:
    chunks = await chat_chunks(
        base,
        prompt,
        seed,
        stream_options={"include_usage": True},
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    assert all(chunk.usage is not None for chunk in chunks)  # vLLM's usage in every chunk


async def chat_stream_two_choices(base: str, prompt: str, seed: int) -> None:
    chunks = await chat_chunks(base, prompt, seed, n=2)
    assert {choice.index for chunk in chunks for choice in chunk.choices} == {0, 1}


async def chat(base: str, prompt: str, seed: int) -> None:
    async with client(base) as c:
        done = await c.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            seed=seed,
        )
    assert done.usage is not None


async def completion_stream(base: str, prompt: str, seed: int) -> None:
    chunks = await completion_chunks(base, prompt, seed)
    assert chunks
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


async def completion_stream_usage(base: str, prompt: str, seed: int) -> None:
    chunks = await completion_chunks(base, prompt, seed, stream_options={"include_usage": True})
    assert chunks[-1].usage is not None


async def completion(base: str, prompt: str, seed: int) -> None:
    async with client(base) as c:
        done = await c.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, seed=seed
        )
    assert done.usage is not None


async def responses_stream(base: str, prompt: str, seed: int) -> None:
    async with client(base) as c:
        stream = await c.responses.create(
            model="tiny-llama",
            input=prompt,
            max_output_tokens=MAX_TOKENS,
            stream=True,
            extra_body={"seed": seed},
        )
        events = [event async for event in stream]
    assert events[-1].type == "response.completed"


async def responses(base: str, prompt: str, seed: int) -> None:
    async with client(base) as c:
        done = await c.responses.create(
            model="tiny-llama",
            input=prompt,
            max_output_tokens=MAX_TOKENS,
            extra_body={"seed": seed},
        )
    assert done.usage is not None


async def messages_call(base: str, prompt: str, seed: int, stream: bool) -> None:
    body = {
        "model": "tiny-llama",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
    }
    async with aiohttp.ClientSession() as s, s.post(f"{base}/v1/messages", json=body) as r:
        text = await r.text()
        assert r.status == 200, text[:500]
    if stream:
        assert "event: message_stop" in text


async def messages_stream(base: str, prompt: str, seed: int) -> None:
    await messages_call(base, prompt, seed, stream=True)


async def messages(base: str, prompt: str, seed: int) -> None:
    await messages_call(base, prompt, seed, stream=False)


SHAPES: dict[str, tuple[Shape, str]] = {  # name: (client call, contract endpoint label)
    "chat-stream": (chat_stream, "chat"),
    "chat-stream-usage": (chat_stream_usage, "chat"),
    "chat-stream-continuous-usage": (chat_stream_continuous_usage, "chat"),
    "chat-stream-n2": (chat_stream_two_choices, "chat"),
    "chat": (chat, "chat"),
    "completion-stream": (completion_stream, "completion"),
    "completion-stream-usage": (completion_stream_usage, "completion"),
    "completion": (completion, "completion"),
    "responses-stream": (responses_stream, "responses"),
    "responses": (responses, "responses"),
    "messages-stream": (messages_stream, "chat"),
    "messages": (messages, "chat"),
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_tokens_match_vllm_counters(proxy: Sidecar, vllm: VllmServer, shape: str) -> None:
    """Through the proxy, each API shape books vLLM's own prompt and generation token deltas
    (within 1 %), under its contract endpoint label, and every request reaches the energy
    histogram."""
    call, endpoint = SHAPES[shape]
    n = REQUESTS_PER_SHAPE
    # vLLM runs each of n choices as a request of its own: it counts the prompt (and a
    # finished request) once per choice, where the usage the client gets counts it once.
    choices = 2 if shape.endswith("-n2") else 1
    before = await counts(proxy, vllm)
    await asyncio.gather(*(call(proxy.url, PROMPTS[i], 100 + i) for i in range(n)))
    d = await settled(
        proxy,
        vllm,
        before,
        n * choices,
        lambda d: (
            d.ours_requests >= n
            and within_1_percent(d.ours_prompt, d.vllm_prompt / choices)
            and within_1_percent(d.ours_completion, d.vllm_completion)
        ),
    )
    print(
        f"figures shape={shape} prompt ours={d.ours_prompt:g} vllm={d.vllm_prompt / choices:g}"
        f" completion ours={d.ours_completion:g} vllm={d.vllm_completion:g}"
        f" requests histogram={d.ours_requests:g} endpoint[{endpoint}]={d.ours_by_endpoint.get(endpoint, 0):g}"
    )
    assert d.vllm_finished == n * choices
    assert d.vllm_prompt > 0
    assert d.vllm_completion > 0
    assert d.ours_requests == n, "every request in llm_energy_request_joules"
    assert d.ours_by_endpoint.get(endpoint, 0.0) == n, d.ours_by_endpoint
    assert within_1_percent(d.ours_prompt, d.vllm_prompt / choices), (
        d.ours_prompt,
        d.vllm_prompt / choices,
    )
    assert within_1_percent(d.ours_completion, d.vllm_completion), (
        d.ours_completion,
        d.vllm_completion,
    )


# ------------------------------------------------------------------ what the client receives


def keys(value: Any) -> Any:
    """The shape of a JSON value: member names all the way down, values left out."""
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [keys(v) for v in value]
    return type(value).__name__


async def sse_events(url: str, body: dict[str, Any]) -> list[Any]:
    """The ``data:`` payloads of a streamed response, JSON-decoded (``[DONE]`` kept as is)."""
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        raw = await r.text()
        assert r.status == 200, raw[:300]
    assert raw.endswith("data: [DONE]\n\n")
    out: list[Any] = []
    for line in raw.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def shapes(events: list[Any]) -> set[str]:
    return {json.dumps(keys(e), sort_keys=True) for e in events}


def text_of(events: list[Any]) -> dict[int, str]:
    """Each choice's text, by choice index."""
    out: dict[int, str] = {}
    for e in events:
        for choice in e["choices"] if isinstance(e, dict) else ():
            piece = choice.get("delta", {}).get("content") or choice.get("text") or ""
            out[choice["index"]] = out.get(choice["index"], "") + piece
    return out


def terminal(events: list[Any]) -> list[str]:
    """The shapes of the chunks that end a choice, and of the usage chunk (order aside: the
    choices of n > 1 interleave by timing)."""
    return sorted(
        json.dumps(keys(e), sort_keys=True)
        for e in events
        if isinstance(e, dict)
        and (not e["choices"] or any(c.get("finish_reason") for c in e["choices"]))
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("n", [1, 2])
async def test_client_receives_what_vllm_sends(
    proxy: Sidecar, vllm: VllmServer, path: str, include_usage: bool, n: int
) -> None:
    """A greedy (or seeded) stream through the proxy has the same kinds of chunks (member names), first
    and terminal chunks and text per choice as the same request sent to vLLM directly: no
    usage chunk and no ``"usage": null`` for a client that asked for none, the usage chunk
    for one that asked."""
    body: dict[str, Any] = {
        "model": "tiny-llama",
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0 if n == 1 else 1.0,  # vLLM: greedy only with n=1; seeded otherwise
        "seed": 7,
        "n": n,
        "stream": True,
    }
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": PROMPTS[1]}]
    else:
        body["prompt"] = PROMPTS[1]
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    direct = await sse_events(vllm.url + path, body)
    proxied = await sse_events(proxy.url + path, body)
    # vLLM merges the tokens of steps its front end has not sent yet into one chunk, so the
    # number of chunks depends on timing; the kinds of chunk and the text do not.
    assert shapes(proxied) == shapes(direct)
    assert keys(proxied[0]) == keys(direct[0])
    assert terminal(proxied) == terminal(direct)
    assert text_of(proxied) == text_of(direct)
    assert sorted(text_of(proxied)) == list(range(n))
    chunks = [e for e in proxied if isinstance(e, dict)]
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["prompt_tokens"] > 0
    else:
        assert all("usage" not in c and c["choices"] for c in chunks)


async def test_logs_name_requests_without_text_or_key(proxy: Sidecar, vllm: VllmServer) -> None:
    """Each proxied request gets its ``request.finished`` line with its tokens, and no log line
    holds the prompt, the completion or the API key."""
    secret_key = "sk-do-not-log-4f1c9a"
    prompt = "zebra quartz marker 7731 café"
    before = await steady(proxy, vllm)  # earlier tests' requests finalised first
    async with openai.AsyncOpenAI(
        base_url=f"{proxy.url}/v1", api_key=secret_key, max_retries=0
    ) as c:
        done = await c.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
        )
    answer = done.choices[0].message.content or ""
    await settled(proxy, vllm, before, 1, lambda d: d.ours_requests >= 1)
    lines = [json.loads(line) for line in list(proxy.log) if line.startswith("{")]
    finished = [x for x in lines if x.get("event") == "request.finished"]
    assert finished
    assert finished[-1]["endpoint"] == "chat"
    assert done.usage is not None
    assert finished[-1]["prompt_tokens"] == done.usage.prompt_tokens
    text = "".join(proxy.log)
    assert secret_key not in text
    assert "zebra quartz" not in text
    assert len(answer) > 8
    assert answer not in text
    assert json.dumps(answer)[1:-1] not in text  # nor JSON-escaped


async def test_first_stream_counted(vllm: VllmServer) -> None:
    """The very first streams through a fresh proxy, sent without ``stream_options``, book
    vLLM's prompt and generation tokens too (usage injection is on by default)."""
    port, mport = free_port(), free_port()
    fresh = await asyncio.to_thread(
        run_sidecar, start_simulated(vllm.url, port, mport), port, mport
    )
    try:
        before = await counts(fresh, vllm)
        n = 2
        await asyncio.gather(*(chat_stream(fresh.url, PROMPTS[i], 10 + i) for i in range(n)))
        d = await settled(
            fresh,
            vllm,
            before,
            n,
            exactly(n),
        )
        print(
            f"figures shape=first-chat-streams prompt ours={d.ours_prompt:g} vllm={d.vllm_prompt:g}"
            f" completion ours={d.ours_completion:g} vllm={d.vllm_completion:g}"
        )
        assert d.ours_requests == n
        assert (d.ours_prompt, d.ours_completion) == (d.vllm_prompt, d.vllm_completion)
    finally:
        await asyncio.to_thread(fresh.stop)


async def test_proxy_hold_books_each_request_once_after_the_hold(vllm: VllmServer) -> None:
    """``--proxy-hold 8``: streams end, and no request's energy is final until the hold has
    passed; then every one is, once, with vLLM's own prompt and generation counts."""
    port, mport = free_port(), free_port()
    held = await asyncio.to_thread(
        run_sidecar, start_simulated(vllm.url, port, mport, "--proxy-hold", "8"), port, mport
    )
    try:
        before = await counts(held, vllm)
        n = 3
        await asyncio.gather(*(chat_stream(held.url, PROMPTS[i], 20 + i) for i in range(n)))
        at_end = (await counts(held, vllm)).minus(before)
        d = await settled(
            held,
            vllm,
            before,
            n,
            exactly(n),
        )
        print(
            f"figures shape=proxy-hold requests at end={at_end.ours_requests:g} then"
            f" {d.ours_requests:g}; prompt ours={d.ours_prompt:g} vllm={d.vllm_prompt:g}"
        )
        assert at_end.vllm_finished == n
        assert at_end.ours_requests == 0, "final before the hold passed"
        assert d.ours_requests == n
        assert (d.ours_prompt, d.ours_completion) == (d.vllm_prompt, d.vllm_completion)
    finally:
        await asyncio.to_thread(held.stop)


# ------------------------------------------------------------------ observer mode


async def test_observer_tokens_exact(vllm: VllmServer) -> None:
    """``run --observe`` on vLLM's /metrics books exactly vLLM's own token deltas."""
    mport = free_port()
    proc = start_sidecar(
        "--observe",
        vllm.metrics_url,
        "--power-source",
        "simulated",
        "--metrics-listen",
        f"127.0.0.1:{mport}",
    )
    observer = await asyncio.to_thread(run_sidecar, proc, free_port(), mport)
    try:
        # Its first scrape is its zero: wait until a request is seen, then measure from there.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_TIMEOUT_S
        start = await counts(observer, vllm)
        while True:
            await completion(vllm.url, PROMPTS[0], 1)
            await asyncio.sleep(2.5)  # an observer scrapes once a second
            now = await counts(observer, vllm)
            if now.ours_completion > start.ours_completion or loop.time() > deadline:
                break
        assert now.ours_completion > start.ours_completion, "the observer never saw a request"
        before = await steady(observer, vllm)
        n = 4
        await asyncio.gather(
            chat_stream(vllm.url, PROMPTS[0], 1),
            chat(vllm.url, PROMPTS[1], 2),
            completion_stream(vllm.url, PROMPTS[2], 3),
            responses(vllm.url, PROMPTS[1], 4),
        )
        d = await settled(
            observer,
            vllm,
            before,
            n,
            lambda d: d.ours_prompt == d.vllm_prompt and d.ours_completion == d.vllm_completion,
        )
        print(
            f"figures observer prompt ours={d.ours_prompt:g} vllm={d.vllm_prompt:g}"
            f" completion ours={d.ours_completion:g} vllm={d.vllm_completion:g}"
        )
        assert d.vllm_finished == n
        assert d.ours_prompt == d.vllm_prompt
        assert d.ours_completion == d.vllm_completion
    finally:
        await asyncio.to_thread(observer.stop)


async def test_prefix_cached_prompt_is_named_in_the_finished_line(
    proxy: Sidecar, vllm: VllmServer
) -> None:
    """The same long prompt twice: vLLM serves most of the second from its prefix cache and
    says so in the usage (``prompt_tokens_details.cached_tokens``); the sidecar books that
    count with the request (its ``request.finished`` line), streamed or not, so those
    tokens weigh no prefill work."""
    prompt = " ".join(f"cache-line {i} of the shared system prompt" for i in range(12))
    before = await steady(proxy, vllm)
    usages: list[Any] = []
    async with client(proxy.url) as c:
        for _ in range(2):
            done = await c.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": prompt}],
                max_tokens=4, temperature=0.0,
            )  # fmt: skip
            usages.append(done.usage)
        stream = await c.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": prompt}],
            max_tokens=4, temperature=0.0, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        usages.append([chunk async for chunk in stream][-1].usage)
    await settled(proxy, vllm, before, 3, lambda d: d.ours_requests >= 3)
    assert all(u is not None and u.prompt_tokens_details is not None for u in usages)
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    print(f"prompt {usages[0].prompt_tokens} tokens; cached {cached}")
    assert cached[1] > 0  # served from the cache: vLLM's own claim
    assert cached[2] > 0
    assert cached[1] < usages[1].prompt_tokens
    lines = [json.loads(line) for line in list(proxy.log) if line.startswith("{")]
    finished = [x for x in lines if x.get("event") == "request.finished"][-3:]
    assert [x["prompt_tokens"] for x in finished] == [u.prompt_tokens for u in usages]
    assert [x["cached_tokens"] or 0 for x in finished] == cached


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
async def test_non_streamed_body_unchanged(proxy: Sidecar, vllm: VllmServer, path: str) -> None:
    """A greedy non-streamed answer through the proxy equals vLLM's direct one, ids and
    timestamps aside (no member added or removed with default flags)."""
    body: dict[str, Any] = {"model": "tiny-llama", "temperature": 0.0, "seed": 7}
    if path.endswith("chat/completions"):
        body |= {"messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": MAX_TOKENS}
    elif path.endswith("responses"):
        body |= {"input": PROMPTS[2], "max_output_tokens": MAX_TOKENS}
    else:
        body |= {"prompt": PROMPTS[2], "max_tokens": MAX_TOKENS}

    async def answer(base: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.post(base + path, json=body) as r:
            assert r.status == 200
            doc: dict[str, Any] = await r.json()
        return doc

    direct, proxied = await answer(vllm.url), await answer(proxy.url)
    assert keys(proxied) == keys(direct)

    def stable(doc: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in doc.items() if k not in {"id", "created", "created_at"}}
        if "output" in out:  # /v1/responses: its items carry fresh ids; keep their text
            out["output"] = [[c.get("text") for c in o.get("content", [])] for o in out["output"]]
        return out

    assert stable(proxied) == stable(direct)
