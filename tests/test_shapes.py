"""Every inference path and its wire shape: routes from vLLM's and SGLang's source, real vLLM bytes.

The `data/vllm-0.32/` bodies were captured from a real vLLM 0.32.0 (CPU build,
tiny random Llama, 20 output tokens) with curl, no proxy in between.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sidecar.tracking.budget import ParseBudget
from sidecar.tracking.protocols import (
    Api,
    Endpoint,
    RequestInfo,
    ResponseTracker,
    Usage,
    classify,
    parse_request,
)

DATA = Path(__file__).parent / "data" / "vllm-0.32"
SSE = "text/event-stream; charset=utf-8"


def sample(name: str) -> bytes:
    return (DATA / f"{name}.body").read_bytes()


def info(
    endpoint: Endpoint, api: Api, stream: bool, model: str | None = "tiny-llama"
) -> RequestInfo:
    return RequestInfo(endpoint, api, model, stream, 10, False)


def track(
    req: RequestInfo, body: bytes, content_type: str, step: int = 0, **kw: Any
) -> tuple[Usage, bytes, int]:
    """Feed ``body`` whole (step 0) or ``step`` bytes at a time; (usage, bytes out, token events)."""
    t = ResponseTracker(req, content_type, None, {}, **kw)
    out, tokens = [], 0
    pieces = [body] if step == 0 else [body[i : i + step] for i in range(0, len(body), step)]
    for piece in pieces:
        fed = t.feed(piece)
        out.append(fed.out)
        tokens += fed.tokens
    out.append(t.flush())
    return t.finish(), b"".join(out), tokens


class TestRoutes:
    """Paths from the servers' own route lists (vLLM 0.32 routers, SGLang 0.5 http_server.py)."""

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/v1/responses", ("responses", "responses")),
            ("/v1/messages", ("chat", "anthropic")),
            ("/v1/chat/completions/batch", ("chat", "openai")),
            ("/pooling", ("pooling", "openai")),
            ("/classify", ("pooling", "openai")),
            ("/v1/classify", ("pooling", "openai")),
            ("/score", ("pooling", "openai")),
            ("/v1/score", ("pooling", "openai")),
            ("/rerank", ("pooling", "openai")),
            ("/v1/rerank", ("pooling", "openai")),
            ("/v2/rerank", ("pooling", "openai")),
            ("/v2/embed", ("embedding", "openai")),
            ("/encode", ("embedding", "openai")),
            ("/generate", ("generate", "tgi")),
            ("/inference/v1/generate", ("generate", "tgi")),
            ("/v1/chat/completions/", ("chat", "openai")),
        ],
    )
    def test_inference_routes(self, path: str, expected: tuple[Endpoint, Api]) -> None:
        """Each known inference route maps to its endpoint and dialect."""
        assert classify("POST", path) == expected

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/llm/v1/chat/completions", ("chat", "openai")),
            ("/team-a/qwen/v1/responses", ("responses", "responses")),
            ("/models/m1/api/generate", ("generate", "ollama")),
            ("/x/generate", ("generate", "tgi")),
            ("/gateway/v1/messages/count_tokens", ("other", "none")),
            ("/gateway/tokenize", ("other", "none")),
        ],
    )
    def test_path_prefix_matches_by_suffix(self, path: str, expected: tuple[Endpoint, Api]) -> None:
        """Behind a path prefix the longest known route ending the path wins."""
        assert classify("POST", path) == expected

    @pytest.mark.parametrize(
        "path",
        [
            "/ping",
            "/tokenize",
            "/detokenize",
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/sleep",
            "/wake_up",
            "/pause",
            "/resume",
            "/reset_prefix_cache",
            "/start_profile",
            "/stop_profile",
            "/v1/messages/count_tokens",
            "/v1/responses/resp_123/cancel",
            "/flush_cache",
            "/load_lora_adapter",
            "/update_weights_from_disk",
            "/abort_request",
            "/api/pull",
            "/api/push",
            "/api/create",
            "/api/copy",
            "/api/delete",
            "/api/show",
            "/api/blobs/sha256:abc",
        ],
    )
    def test_admin_posts_are_other(self, path: str) -> None:
        """Tokenisers, health, LoRA, sleep, pause, cache, profiling and Ollama model admin hold no energy."""
        assert classify("POST", path) == ("other", "none")

    @pytest.mark.parametrize("path", ["/", "/invocations", "/v1/audio/transcriptions", "/my/route"])
    def test_other_posts_are_unknown(self, path: str) -> None:
        """A POST nobody knows is inference without token information."""
        assert classify("POST", path) == ("unknown", "none")

    def test_unknown_reads_nothing(self) -> None:
        """An unknown request carries no estimate and its response is never parsed."""
        req = parse_request("unknown", "none", b'{"prompt": "x"}', "application/json")
        assert req.prompt_tokens_estimate is None
        usage, out, _ = track(req, b'{"usage": {"prompt_tokens": 5}}', "application/json")
        assert usage.prompt_tokens is None
        assert out == b'{"usage": {"prompt_tokens": 5}}'


class TestRealVllmBodies:
    """Usage read from bytes a real vLLM sent, whole or a few bytes at a time."""

    @pytest.mark.parametrize("step", [0, 1, 7, 64])
    @pytest.mark.parametrize(
        ("name", "endpoint", "api", "stream", "prompt"),
        [
            ("chat", "chat", "openai", False, 24),
            ("completion", "completion", "openai", False, 3),
            ("chat-stream-usage", "chat", "openai", True, 24),
            ("completion-stream-usage", "completion", "openai", True, 3),
            ("responses", "responses", "responses", False, 24),
            ("responses-stream", "responses", "responses", True, 24),
            ("messages", "chat", "anthropic", False, 24),
            ("messages-stream", "chat", "anthropic", True, 24),
        ],
    )
    def test_exact_usage(
        self, name: str, endpoint: Endpoint, api: Api, stream: bool, prompt: int, step: int
    ) -> None:
        """Every API shape yields vLLM's own prompt and completion counts, bytes untouched."""
        body = sample(name)
        ctype = SSE if stream else "application/json"
        usage, out, _ = track(info(endpoint, api, stream, model=None), body, ctype, step)
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, 20)
        assert usage.model == "tiny-llama"
        assert out == body

    @pytest.mark.parametrize(
        ("name", "endpoint", "api", "deltas"),
        [
            ("responses-stream", "responses", "responses", b'"response.output_text.delta"'),
            ("messages-stream", "chat", "anthropic", b'"content_block_delta"'),
        ],
    )
    def test_stream_token_times_from_deltas(
        self, name: str, endpoint: Endpoint, api: Api, deltas: bytes
    ) -> None:
        """Each non-empty text delta is one token time (read from bytes, not JSON)."""
        body = sample(name)
        non_empty = sum(
            1
            for line in body.split(b"\n")
            if deltas in line and not re.search(rb'"(?:delta|text)":""', line)
        )
        _usage, _out, tokens = track(info(endpoint, api, True), body, SSE, 5)
        assert tokens == non_empty > 0

    def test_chat_stream_without_usage_is_an_estimate(self) -> None:
        """Without usage a stream's chunks are all there is: fewer than vLLM's 20 tokens here."""
        usage, out, tokens = track(info("chat", "openai", True), sample("chat-stream"), SSE, 3)
        assert usage.completion_tokens is None
        assert 0 < usage.token_events == tokens < 20
        assert out == sample("chat-stream")


def _events(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e]


FINGERPRINT = re.compile(rb',"system_fingerprint":"[^"]*"')


def without_fingerprint(name: str) -> bytes:
    """A captured stream minus vLLM's `system_fingerprint`, for tests about other members."""
    return FINGERPRINT.sub(b"", sample(name))


def same_ids(event: bytes, like: bytes) -> bytes:
    """``event`` with the `id` and `created` of ``like`` (two captures differ only there)."""
    for key in (rb'"id":"[^"]*"', rb'"created":\d+'):
        found = re.search(key, like)
        assert found is not None
        event = re.sub(key, found.group(0).replace(b"\\", b"\\\\"), event, count=1)
    return event


class TestStripOnVllmShapes:
    """The injected usage chunk and `usage: null` members go; nothing else changes."""

    @pytest.mark.parametrize("name", ["chat-stream", "completion-stream"])
    def test_terminal_chunk_gets_vllm_fingerprint_back(self, name: str) -> None:
        """vLLM moves `system_fingerprint` to the usage chunk when asked: stripping moves it back.

        The stripped terminal chunk equals the one vLLM sent to a client that did
        not ask (another capture: only `id` and `created` differ).
        """
        asked = _events(sample(f"{name}-usage"))
        unasked = _events(sample(name))
        out = track(
            info("chat" if name.startswith("chat") else "completion", "openai", True),
            b"".join(asked),
            SSE,
            5,
            strip_usage_chunk=True,
        )[1]
        stripped = _events(out)
        assert b'"choices":[]' not in out
        terminal = [e for e in stripped if b'"finish_reason":"' in e]
        assert len(terminal) == 1
        assert b"system_fingerprint" not in b"".join(e for e in stripped if e not in terminal)
        expected = [e for e in unasked if b'"finish_reason":"' in e]
        assert [same_ids(terminal[0], expected[0])] == expected
        assert stripped[-1] == b"data: [DONE]\n\n"

    def test_known_fingerprint_goes_on_every_terminal_chunk(self) -> None:
        """With n > 1 the terminal chunks interleave: an upstream's known fingerprint is added at once."""

        def chunk(index: int, text: str, finish: str | None, fp: bool = False) -> bytes:
            choice = {"index": index, "delta": {"content": text}, "finish_reason": finish}
            obj: dict[str, Any] = {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [choice],
            }
            if fp:
                obj["system_fingerprint"] = "vllm-fp"
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                 "system_fingerprint": "vllm-fp"}  # fmt: skip
        asked = [
            chunk(0, "a", None),
            chunk(1, "b", None),
            chunk(0, "c", "stop"),
            chunk(1, "d", None),
            chunk(1, "e", "length"),
            b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n",
            b"data: [DONE]\n\n",
        ]
        unasked = [
            chunk(0, "a", None),
            chunk(1, "b", None),
            chunk(0, "c", "stop", fp=True),
            chunk(1, "d", None),
            chunk(1, "e", "length", fp=True),
            b"data: [DONE]\n\n",
        ]
        req = info("chat", "openai", True)
        _, out, _ = track(
            req, b"".join(asked), SSE, 7, strip_usage_chunk=True, fingerprint="vllm-fp"
        )
        assert out == b"".join(unasked)
        t = ResponseTracker(req, SSE, None, {}, strip_usage_chunk=True)
        t.feed(b"".join(asked))
        t.flush()
        assert t.usage_fingerprint == "vllm-fp"  # what the proxy keeps for the next stream

    def test_a_chunk_after_a_terminal_one_of_its_shape_is_held_too(self) -> None:
        """Two terminal chunks of one choice in a row, each its own read, as a server flushes
        them: both wait for the usage chunk and both get its fingerprint back, though the
        second is of the first one's shape (strip mode reads no terminal chunk in place)."""

        def chunk(text: str, finish: str | None, fp: bool = False) -> bytes:
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            obj: dict[str, Any] = {"id": "c", "model": "m", "choices": [choice]}
            if fp:
                obj["system_fingerprint"] = "vllm-fp"
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        usage = {"id": "c", "model": "m", "choices": [],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 3},
                 "system_fingerprint": "vllm-fp"}  # fmt: skip
        done = b"data: [DONE]\n\n"
        last = b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"
        asked = [chunk("a", None), chunk("b", None), chunk("c", "stop"), chunk("d", "stop")]
        unasked = [*asked[:2], chunk("c", "stop", fp=True), chunk("d", "stop", fp=True), done]
        for known in (None, "vllm-fp"):  # known: each goes at once, the fingerprint added
            t = ResponseTracker(
                info("chat", "openai", True), SSE, None, {}, strip_usage_chunk=True,
                fingerprint=known,
            )  # fmt: skip
            out = [t.feed(event).out for event in [*asked, last, done]]
            assert b"".join([*out, t.flush()]) == b"".join(unasked)
            assert t.finish().token_events == 4

    def test_vllm_usage_chunk_dropped(self) -> None:
        """vLLM's usage chunk (choices [] with usage) is removed, every other byte kept."""
        body = without_fingerprint("chat-stream-usage")
        expected = b"".join(e for e in _events(body) if b'"choices":[]' not in e)
        for step in (0, 1, 13):
            usage, out, _ = track(
                info("chat", "openai", True), body, SSE, step, strip_usage_chunk=True
            )
            assert out == expected
            assert (usage.prompt_tokens, usage.completion_tokens) == (24, 20)

    @pytest.mark.parametrize(
        ("before", "after"),
        [
            (b'{"id":', b'{"usage":null,"id":'),
            (b'{"id":', b'{"usage": null, "id":'),
            (b',"choices":', b',"usage":null,"choices":'),
        ],
    )
    def test_null_usage_anywhere_removed(self, before: bytes, after: bytes) -> None:
        """`"usage": null` first, in the middle or spaced out is removed from each chunk."""
        plain = without_fingerprint("chat-stream-usage")
        events = _events(plain)
        injected = b"".join(
            e.replace(before, after, 1) if b'"choices":[]' not in e and b"[DONE]" not in e else e
            for e in events
        )
        expected = b"".join(e for e in events if b'"choices":[]' not in e)
        assert injected != plain
        _usage, out, _ = track(
            info("chat", "openai", True), injected, SSE, 11, strip_usage_chunk=True
        )
        assert out == expected

    @pytest.mark.parametrize("first", [True, False])
    def test_null_usage_python_spacing_removed(self, first: bool) -> None:
        """A server writing `", "` and `": "` separators: first or last `usage: null` goes."""
        plain, injected = [], []
        for e in _events(without_fingerprint("chat-stream-usage")):
            data = e[len(b"data: ") : -2]
            if data == b"[DONE]":
                plain.append(e)
                injected.append(e)
                continue
            obj = json.loads(data)
            if obj["choices"] == []:
                injected.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
                continue
            with_null = {"usage": None, **obj} if first else {**obj, "usage": None}
            plain.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
            injected.append(b"data: " + json.dumps(with_null).encode() + b"\n\n")
        _usage, out, _ = track(
            info("chat", "openai", True), b"".join(injected), SSE, 8, strip_usage_chunk=True
        )
        assert out == b"".join(plain)

    def test_null_usage_at_the_end_removed(self) -> None:
        """`"usage":null` as the last member is removed with its comma."""
        events = _events(without_fingerprint("completion-stream-usage"))
        injected = b"".join(
            e.replace(b"}\n\n", b',"usage":null}\n\n', 1)
            if b'"choices":[]' not in e and b"[DONE]" not in e
            else e
            for e in events
        )
        expected = b"".join(e for e in events if b'"choices":[]' not in e)
        _usage, out, _ = track(
            info("completion", "openai", True), injected, SSE, 9, strip_usage_chunk=True
        )
        assert out == expected

    def test_server_that_always_writes_null_keeps_it(self) -> None:
        """An upstream that writes `usage: null` unasked (SGLang) keeps it; only the chunk goes."""
        events = _events(without_fingerprint("chat-stream-usage"))
        always = [
            e.replace(b'{"id":', b'{"usage":null,"id":', 1) if b'"choices":[]' not in e else e
            for e in events
            if b"[DONE]" not in e
        ] + [b"data: [DONE]\n\n"]
        expected = b"".join(e for e in always if b'"choices":[]' not in e)
        _usage, out, _ = track(
            info("chat", "openai", True),
            b"".join(always),
            SSE,
            17,
            strip_usage_chunk=True,
            keep_null_usage=True,
        )
        assert out == expected

    def test_forced_continuous_usage_keeps_the_usage_chunk(self) -> None:
        """vLLM's --enable-force-include-usage sends usage unasked: the client gets it as sent."""
        events = _events(sample("chat-stream-usage"))
        forced, n = [], 0
        for e in events:
            if b'"choices":[{' in e:
                n += 1
                usage = {"prompt_tokens": 24, "completion_tokens": n, "total_tokens": 24 + n}
                e = e.replace(b"}\n\n", b',"usage":' + json.dumps(usage).encode() + b"}\n\n", 1)
            forced.append(e)
        body = b"".join(forced)
        usage_out, out, _ = track(
            info("chat", "openai", True), body, SSE, 0, strip_usage_chunk=True
        )
        assert out == body
        assert usage_out.completion_tokens == 20


class TestSglangGenerate:
    """SGLang's native /generate: counts in `meta_info`, not TGI's `details`."""

    def test_stream_counts_from_meta_info(self) -> None:
        """Cumulative `meta_info.completion_tokens` in every event gives exact token times."""
        events = [
            {"text": "a" * (i + 1), "meta_info": {"id": "x", "prompt_tokens": 7,
             "completion_tokens": c, "cached_tokens": 0}, "index": 0}
            for i, c in enumerate([1, 3, 4, 6])
        ]  # fmt: skip
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        body += b"data: [DONE]\n\n"
        req = parse_request("generate", "tgi", b'{"text": "hello", "stream": true}', None)
        assert req.stream
        usage, out, tokens = track(req, body, SSE, 10)
        assert (usage.prompt_tokens, usage.completion_tokens) == (7, 6)
        assert tokens == 6
        assert out == body

    def test_non_stream_and_batch(self) -> None:
        """One object or a batch list: prompt and completion counts summed over entries."""
        req = parse_request("generate", "tgi", b'{"text": ["a", "b"]}', "application/json")
        one = {"text": "x", "meta_info": {"prompt_tokens": 4, "completion_tokens": 9}}
        usage, _, _ = track(req, json.dumps(one).encode(), "application/json")
        assert (usage.prompt_tokens, usage.completion_tokens) == (4, 9)
        two = [one, {"text": "y", "meta_info": {"prompt_tokens": 5, "completion_tokens": 1}}]
        usage, _, _ = track(req, json.dumps(two).encode(), "application/json")
        assert (usage.prompt_tokens, usage.completion_tokens) == (9, 10)

    def test_tgi_shape_still_read(self) -> None:
        """TGI's `details` on the same path still counts."""
        req = parse_request("generate", "tgi", b'{"inputs": "hi"}', "application/json")
        assert not req.stream
        body = {"generated_text": "x", "details": {"generated_tokens": 3, "input_length": 2}}
        usage, _, _ = track(req, json.dumps(body).encode(), "application/json")
        assert (usage.prompt_tokens, usage.completion_tokens) == (2, 3)

    def test_prompt_fields(self) -> None:
        """SGLang `text`/`input_ids` and Responses `instructions` feed the prompt estimate."""
        assert (
            parse_request(
                "generate", "tgi", b'{"input_ids": [1, 2, 3]}', None
            ).prompt_tokens_estimate
            == 3
        )
        est = parse_request(
            "responses", "responses", b'{"instructions": "abcdefgh", "input": "abcd"}', None
        ).prompt_tokens_estimate
        assert est == 3


class TestPooling:
    """Rerank, score, classify and pooling answer with embedding-like usage."""

    def test_pooling_usage(self) -> None:
        """Prompt tokens from `usage`; no completion tokens."""
        body = {
            "id": "x",
            "model": "rr",
            "results": [],
            "usage": {"prompt_tokens": 12, "total_tokens": 12},
        }
        usage, _, _ = track(
            info("pooling", "openai", False), json.dumps(body).encode(), "application/json"
        )
        assert (usage.prompt_tokens, usage.completion_tokens) == (12, 0)

    def test_anthropic_cached_input_added_back(self) -> None:
        """Messages' input_tokens leaves cached input out; the model still read it. Of it,
        `cache_read_input_tokens` were read from the cache (no prefill work) and
        `cache_creation_input_tokens` computed (and written to it)."""
        body = {"model": "m", "usage": {"input_tokens": 4, "cache_read_input_tokens": 20,
                "cache_creation_input_tokens": 1, "output_tokens": 3}}  # fmt: skip
        usage, _, _ = track(
            info("chat", "anthropic", False), json.dumps(body).encode(), "application/json"
        )
        assert (usage.prompt_tokens, usage.completion_tokens) == (25, 3)
        assert usage.cached_tokens == 20


class TestCachedPrompt:
    """Prompt tokens the server read from its prefix cache, in every dialect that says so."""

    def test_chat_reply(self) -> None:
        """OpenAI's `prompt_tokens_details.cached_tokens` (vLLM, --enable-prompt-tokens-details)."""
        body = {"model": "m", "usage": {"prompt_tokens": 30, "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 16}}}  # fmt: skip
        usage, _, _ = track(
            info("chat", "openai", False), json.dumps(body).encode(), "application/json"
        )
        assert (usage.prompt_tokens, usage.cached_tokens) == (30, 16)

    def test_chat_stream_usage_chunk(self) -> None:
        """The last chunk's usage, read from a stream of plain chunks, byte for byte."""
        chunk = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "ab"}}]}
        last = {"id": "c", "model": "m", "choices": [], "usage": {"prompt_tokens": 40,
                "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}}  # fmt: skip
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in [chunk] * 3 + [last])
        body += b"data: [DONE]\n\n"
        for step in (0, 7):
            usage, out, tokens = track(info("chat", "openai", True), body, SSE, step)
            assert out == body
            assert (usage.prompt_tokens, usage.cached_tokens, tokens) == (40, 32, 3)

    def test_responses_completed(self) -> None:
        """Responses' `input_tokens_details.cached_tokens` in `response.completed`."""
        done = {"type": "response.completed", "response": {"id": "r", "model": "m", "usage": {
            "input_tokens": 50, "output_tokens": 4,
            "input_tokens_details": {"cached_tokens": 48}}}}  # fmt: skip
        body = b"event: response.completed\ndata: " + json.dumps(done).encode() + b"\n\n"
        usage, _, _ = track(info("responses", "responses", True), body, SSE)
        assert (usage.prompt_tokens, usage.cached_tokens) == (50, 48)

    def test_sglang_meta_info(self) -> None:
        """SGLang's native answer: `meta_info.cached_tokens`, summed over a batch."""
        req = parse_request("generate", "tgi", b'{"text": ["a", "b"]}', "application/json")
        two = [{"text": "x", "meta_info": {"prompt_tokens": 9, "completion_tokens": 2,
                "cached_tokens": 8}}, {"text": "y", "meta_info": {"prompt_tokens": 9,
                "completion_tokens": 2, "cached_tokens": 0}}]  # fmt: skip
        usage, _, _ = track(req, json.dumps(two).encode(), "application/json")
        assert (usage.prompt_tokens, usage.cached_tokens) == (18, 8)

    @pytest.mark.parametrize(
        "details",
        [None, {}, {"cached_tokens": None}, {"cached_tokens": -3}, {"cached_tokens": True},
         {"cached_tokens": 31}, "16"],
    )  # fmt: skip
    def test_absent_or_unusable(self, details: object) -> None:
        """No count, a malformed one, or more cached than the prompt: none is taken."""
        body = {"model": "m", "usage": {"prompt_tokens": 30, "completion_tokens": 5,
                "prompt_tokens_details": details}}  # fmt: skip
        usage, out, _ = track(
            info("chat", "openai", False), json.dumps(body).encode(), "application/json"
        )
        assert (usage.prompt_tokens, usage.cached_tokens) == (30, None)
        assert out == json.dumps(body).encode()


class TestBudget:
    """The shared parse budget: past it a body passes unparsed, and nothing stays reserved."""

    def test_json_over_budget_passes_unparsed(self) -> None:
        """A JSON body that does not fit is forwarded as is and its reservation returned."""
        budget = ParseBudget(100)
        body = sample("chat")
        usage, out, _ = track(
            info("chat", "openai", False), body, "application/json", 50, budget=budget
        )
        assert out == body
        assert usage.prompt_tokens is None
        assert budget.held_bytes == 0
        assert budget.refused >= 1

    def test_within_budget_parses_and_returns_everything(self) -> None:
        """A body that fits is parsed; the budget is whole again afterwards."""
        budget = ParseBudget(1 << 20)
        usage, _, _ = track(
            info("chat", "openai", True), sample("chat-stream-usage"), SSE, 40, budget=budget
        )
        assert usage.completion_tokens == 20
        assert budget.held_bytes == 0

    def test_release_midway(self) -> None:
        """A response cut short gives its reservation back on release()."""
        budget = ParseBudget(1 << 20)
        t = ResponseTracker(
            info("chat", "openai", False), "application/json", None, {}, budget=budget
        )
        t.feed(sample("chat")[:300])
        assert budget.held_bytes == 300
        t.release()
        assert budget.held_bytes == 0

    def test_stripped_stream_stays_exact_over_budget(self) -> None:
        """Injected streams keep framing past the budget, so the client still gets exact bytes."""
        budget = ParseBudget(10)
        body = without_fingerprint("chat-stream-usage")
        expected = b"".join(e for e in _events(body) if b'"choices":[]' not in e)
        _usage, out, _ = track(
            info("chat", "openai", True), body, SSE, 30, strip_usage_chunk=True, budget=budget
        )
        assert out == expected
        assert budget.held_bytes == 0
