"""The pure protocol layer: request classification and parsing, usage injection, response tracking."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sidecar.tracking.protocols import (
    Api,
    Endpoint,
    RequestInfo,
    ResponseTracker,
    Usage,
    classify,
    inject_include_usage,
    parse_request,
)
from sidecar.tracking.wire import loads

PROMPT = "Tell me about the secret llama password hunter2"


def sse(*objs: Any, eol: str = "\n", done: bool = True) -> bytes:
    """An SSE stream of JSON events, as vLLM and TGI write it."""
    events = [f"data: {json.dumps(o)}{eol}{eol}" for o in objs]
    if done:
        events.append(f"data: [DONE]{eol}{eol}")
    return "".join(events).encode()


def ndjson(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def chat_chunk(content: str | None, **extra: Any) -> dict[str, Any]:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "llama-3-8b",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        **extra,
    }


USAGE_CHUNK: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "model": "llama-3-8b",
    "choices": [],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}
CHAT_STREAM_NO_USAGE = sse(
    {
        "id": "chatcmpl-1",
        "model": "llama-3-8b",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    },
    chat_chunk("Hel"),
    chat_chunk("lo"),
    chat_chunk("!"),
    chat_chunk(None),
)
CHAT_STREAM_USAGE = sse(
    {
        "id": "chatcmpl-1",
        "model": "llama-3-8b",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    },
    chat_chunk("Hel"),
    chat_chunk("lo"),
    chat_chunk("!"),
    chat_chunk(None),
    USAGE_CHUNK,
)
USAGE_EVENT = f"data: {json.dumps(USAGE_CHUNK)}\n\n".encode()
COMPLETION_STREAM = sse(
    *[
        {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [{"text": t}]}
        for t in ("a", "b", "c", "d")
    ],
    {
        "id": "cmpl-1",
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 2, "completion_tokens": 4},
    },
)
TGI_STREAM = sse(
    *[
        {
            "index": i,
            "token": {"id": 100 + i, "text": t, "logprob": -0.1, "special": False},
            "generated_text": None,
            "details": None,
        }
        for i, t in enumerate(["Deep", " learning"], start=1)
    ],
    {
        "index": 3,
        "token": {"id": 2, "text": "</s>", "logprob": -0.2, "special": True},
        "generated_text": "Deep learning",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 3,
            "seed": None,
            "input_length": 7,
        },
    },
    done=False,
).replace(b"data: ", b"data:")  # TGI writes no space after the colon
OLLAMA_GENERATE_STREAM = ndjson(
    {"model": "llama3.2", "created_at": "2024-01-01T00:00:00Z", "response": "The", "done": False},
    {"model": "llama3.2", "created_at": "2024-01-01T00:00:00Z", "response": " sky", "done": False},
    {
        "model": "llama3.2",
        "created_at": "2024-01-01T00:00:01Z",
        "response": "",
        "done": True,
        "done_reason": "stop",
        "context": [1, 2, 3],
        "total_duration": 10706818083,
        "load_duration": 6338219291,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 130079000,
        "eval_count": 2,
        "eval_duration": 4232710000,
    },
)
OLLAMA_CHAT_STREAM = ndjson(
    {"model": "llama3.2", "message": {"role": "assistant", "content": "Hi"}, "done": False},
    {"model": "llama3.2", "message": {"role": "assistant", "content": "!"}, "done": False},
    {"model": "llama3.2", "message": {"role": "assistant", "content": "!"}, "done": False},
    {
        "model": "llama3.2",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "prompt_eval_count": 9,
        "eval_count": 3,
    },
)


def info(
    endpoint: Endpoint = "chat",
    api: Api = "openai",
    *,
    stream: bool = True,
    model: str | None = "llama-3-8b",
) -> RequestInfo:
    return RequestInfo(endpoint, api, model, stream, 10, False)


def track(
    req: RequestInfo,
    body: bytes,
    content_type: str | None,
    *,
    chunks: list[bytes] | None = None,
    encoding: str | None = None,
    headers: dict[str, str] | None = None,
    strip: bool = False,
    max_buffer: int = 1 << 20,
) -> tuple[bytes, int, Usage]:
    """Feed a body through a tracker; returns (bytes out, token events, usage)."""
    tracker = ResponseTracker(
        req,
        content_type,
        encoding,
        headers or {},
        strip_usage_chunk=strip,
        max_buffer=max_buffer,
    )
    out = bytearray()
    tokens = 0
    for chunk in chunks if chunks is not None else [body]:
        fed = tracker.feed(chunk)
        if not strip:
            assert fed.out == chunk
        out += fed.out
        tokens += fed.tokens
        assert tracker.held_bytes <= max_buffer + 1
    out += tracker.flush()
    return bytes(out), tokens, tracker.finish()


class TestClassify:
    """Which requests are inference, and of which API."""

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/v1/chat/completions", ("chat", "openai")),
            ("/v1/completions", ("completion", "openai")),
            ("/v1/embeddings", ("embedding", "openai")),
            ("/generate", ("generate", "tgi")),
            ("/generate_stream", ("generate", "tgi")),
            ("/api/generate", ("generate", "ollama")),
            ("/api/chat", ("chat", "ollama")),
            ("/api/embed", ("embedding", "ollama")),
            ("/api/embeddings", ("embedding", "ollama")),
            ("/v1/chat/completions?api-version=2024", ("chat", "openai")),
        ],
    )
    def test_inference_paths(self, path: str, expected: tuple[Endpoint, Api]) -> None:
        """Each documented POST path maps to its endpoint and API, query string ignored."""
        assert classify("POST", path) == expected
        assert classify("post", path) == expected

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/v1/chat/completions"),
            ("GET", "/health"),
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("POST", "/metrics"),
            ("POST", "/api/tags"),
            ("PUT", "/not/a/route"),
            ("DELETE", "/v1/chat/completions"),
        ],
    )
    def test_everything_else_is_other(self, method: str, path: str) -> None:
        """Non-POST methods and known non-inference paths hold no energy."""
        assert classify(method, path) == ("other", "none")


class TestParseRequest:
    """Model, streaming flag and prompt estimate read from request bodies."""

    def test_openai_chat_stream(self) -> None:
        """An OpenAI streaming chat names its model and counts message text at 4 bytes a token."""
        body = json.dumps(
            {
                "model": "llama-3-8b",
                "stream": True,
                "messages": [
                    {"role": "system", "content": "x" * 40},
                    {"role": "user", "content": [{"type": "text", "text": "y" * 20}]},
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "z" * 999}}],
                    },
                ],
            }
        ).encode()
        got = parse_request("chat", "openai", body, "application/json")
        assert got == RequestInfo("chat", "openai", "llama-3-8b", True, 15, False)

    @pytest.mark.parametrize(
        ("raw", "temperature"),
        [(b"NaN", "nan"), (b"Infinity", "inf"), (b"1e400", "inf"), (b'"\\ud800"', "\ud800")],
    )
    def test_json_the_fast_decoder_refuses_still_parses(self, raw: bytes, temperature: str) -> None:
        """Bodies orjson refuses but Python's json reads (non-finite numbers, a lone
        surrogate) still give their model and stream flag, as before orjson read first."""
        body = b'{"model": "m", "stream": true, "temperature": ' + raw + b', "prompt": "abcd"}'
        got = parse_request("completion", "openai", body, "application/json")
        assert got is not None
        assert (got.model, got.stream) == ("m", True)
        doc = loads(body)
        assert isinstance(doc, dict)
        assert str(doc["temperature"]) == temperature
        assert loads(b'{"model": "m",') is None
        assert loads(b"\xff{}") is None

    def test_openai_defaults_to_not_streaming(self) -> None:
        """Without ``stream: true`` an OpenAI request is not a stream."""
        body = b'{"model": "m", "prompt": "abcdefgh"}'
        got = parse_request("completion", "openai", body, "application/json; charset=utf-8")
        assert (got.stream, got.prompt_tokens_estimate) == (False, 2)

    def test_wants_usage(self) -> None:
        """``stream_options.include_usage: true`` is what the client asked for."""
        body = b'{"stream": true, "stream_options": {"include_usage": true}, "prompt": "a"}'
        assert parse_request("completion", "openai", body, None).wants_usage
        body = b'{"stream": true, "stream_options": {"include_usage": false}, "prompt": "a"}'
        assert not parse_request("completion", "openai", body, None).wants_usage

    def test_token_id_prompts_count_one_per_id(self) -> None:
        """Pre-tokenised prompts (lists of ids, batches of them) count one token per id."""
        body = b'{"model": "m", "prompt": [[1, 2, 3], [4, 5]]}'
        assert parse_request("completion", "openai", body, None).prompt_tokens_estimate == 5

    def test_embeddings_input_list(self) -> None:
        """Embedding inputs, string or list, are the prompt."""
        body = json.dumps({"model": "e5", "input": ["abcd", "efgh", "ij"]}).encode()
        got = parse_request("embedding", "openai", body, None)
        assert (got.model, got.stream, got.prompt_tokens_estimate) == ("e5", False, 3)

    def test_utf8_bytes_not_characters(self) -> None:
        """Non-ASCII text is measured in UTF-8 bytes, as tokenizers see it."""
        body = json.dumps({"messages": [{"role": "user", "content": "é" * 8}]}).encode()
        assert parse_request("chat", "openai", body, None).prompt_tokens_estimate == 4

    def test_lone_surrogate_does_not_raise(self) -> None:
        """A JSON escape for a lone surrogate is measured, not an error."""
        body = b'{"messages": [{"role": "user", "content": "\\ud800abc"}]}'
        assert parse_request("chat", "openai", body, None).prompt_tokens_estimate == 2

    def test_tgi_stream_by_path(self) -> None:
        """TGI streams on ``/generate_stream`` whatever the body says; ``/generate`` does not."""
        body = b'{"inputs": "abcdefgh", "parameters": {"max_new_tokens": 20}}'
        s = parse_request("generate", "tgi", body, "application/json", path="/generate_stream")
        n = parse_request("generate", "tgi", body, "application/json", path="/generate")
        assert (s.stream, s.model, s.prompt_tokens_estimate) == (True, None, 2)
        assert not n.stream

    def test_ollama_streams_unless_told_not_to(self) -> None:
        """Ollama generate and chat stream by default; ``"stream": false`` turns it off."""
        gen = b'{"model": "llama3.2", "prompt": "abcd", "system": "efgh"}'
        chat = b'{"model": "llama3.2", "messages": [{"role": "user", "content": "abcd"}], "stream": false}'
        g = parse_request("generate", "ollama", gen, "application/json")
        c = parse_request("chat", "ollama", chat, "application/json")
        e = parse_request("embedding", "ollama", b'{"model": "x", "input": "abcd"}', None)
        assert (g.stream, g.model, g.prompt_tokens_estimate) == (True, "llama3.2", 2)
        assert (c.stream, c.prompt_tokens_estimate) == (False, 1)
        assert not e.stream

    @pytest.mark.parametrize(
        "body", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"just a string"', b"[" * 100_000]
    )
    def test_malformed_body_estimates_from_length(self, body: bytes) -> None:
        """Bodies that are not a JSON object give no model and ~4 bytes per token, never an error."""
        got = parse_request("chat", "openai", body, "application/json")
        assert got.model is None
        assert got.prompt_tokens_estimate == -(-len(body) // 4)
        assert not got.stream

    def test_no_body(self) -> None:
        """Without a body (over the cap, not JSON) only the defaults are known."""
        got = parse_request("generate", "ollama", None, None)
        assert got == RequestInfo("generate", "ollama", None, True, None, False)

    def test_other_is_not_parsed(self) -> None:
        """Non-inference requests are not read at all."""
        got = parse_request("other", "none", b'{"model": "m", "prompt": "abcd"}', None)
        assert got == RequestInfo("other", "none", None, False, None, False)

    def test_no_prompt_field_is_unknown(self) -> None:
        """A body without any prompt-bearing field has no estimate rather than zero."""
        assert (
            parse_request("chat", "openai", b'{"model": "m"}', None).prompt_tokens_estimate is None
        )

    def test_absurd_model_name_is_dropped(self) -> None:
        """A model name beyond 256 characters is treated as absent, not kept as a label."""
        body = json.dumps({"model": "m" * 300, "prompt": "a"}).encode()
        assert parse_request("completion", "openai", body, None).model is None

    def test_prompt_text_is_not_kept(self) -> None:
        """The parsed record holds no prompt text."""
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
        ).encode()
        got = parse_request("chat", "openai", body, None)
        assert "hunter2" not in repr(got)


class TestInjectIncludeUsage:
    """Adding ``stream_options.include_usage`` to streaming OpenAI requests."""

    def test_appends_and_keeps_every_other_byte(self) -> None:
        """Without ``stream_options`` the field is appended and the client's bytes survive."""
        body = b'{"model": "m",  "temperature": 1.0, "stream": true, "prompt": "caf\\u00e9"}\n'
        got = inject_include_usage(body)
        assert got is not None
        assert got == body[:-2] + b',"stream_options":{"include_usage":true}}\n'
        parsed = json.loads(got)
        assert parsed["stream_options"] == {"include_usage": True}
        assert parsed["prompt"] == "café"
        assert parse_request("completion", "openai", got, None).wants_usage

    @pytest.mark.parametrize(
        "options", [None, {}, {"include_usage": False}, {"include_usage": None, "x": 1}]
    )
    def test_sets_it_in_existing_options(self, options: dict[str, Any] | None) -> None:
        """Existing ``stream_options`` get ``include_usage: true`` and keep their other keys."""
        body = json.dumps({"model": "m", "stream": True, "stream_options": options}).encode()
        got = inject_include_usage(body)
        assert got is not None
        parsed = json.loads(got)
        assert parsed["stream_options"] == {**(options or {}), "include_usage": True}
        assert parsed["model"] == "m"

    @pytest.mark.parametrize(
        "body",
        [
            b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}',
            b'{"model": "m", "stream": false}',
            b'{"model": "m"}',
            b'{"stream": true, "stream_options": "yes"}',
            b'{"stream": true, "stream_options": {"continuous_usage_stats": true}}',
            b"{broken",
            b"[1]",
            b"",
        ],
    )
    def test_not_applicable(self, body: bytes) -> None:
        """Requests that already ask, do not stream, or cannot be read are left alone."""
        assert inject_include_usage(body) is None


class TestOpenAI:
    """OpenAI-compatible responses: JSON usage and SSE streams."""

    def test_chat_non_stream(self) -> None:
        """A chat completion's ``usage`` and ``model`` come from the JSON body."""
        body = json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "llama-3-8b-served",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": PROMPT}}],
                "usage": {
                    "prompt_tokens": 9,
                    "completion_tokens": 12,
                    "total_tokens": 21,
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
            }
        ).encode()
        chunks = [body[:10], body[10:50], body[50:]]
        out, tokens, usage = track(info(stream=False), body, "application/json", chunks=chunks)
        assert out == body
        assert tokens == 0
        assert usage == Usage(9, 12, "llama-3-8b-served", 0, cached_tokens=0)  # none cached

    def test_stream_without_usage(self) -> None:
        """Each chunk carrying content is one token event; usage stays unknown."""
        out, tokens, usage = track(info(), CHAT_STREAM_NO_USAGE, "text/event-stream")
        assert out == CHAT_STREAM_NO_USAGE
        assert tokens == 3
        assert usage == Usage(None, None, "llama-3-8b", 3)

    def test_stream_with_usage_chunk(self) -> None:
        """The usage chunk before ``[DONE]`` gives exact counts and is not a token event."""
        out, tokens, usage = track(info(), CHAT_STREAM_USAGE, "text/event-stream; charset=utf-8")
        assert out == CHAT_STREAM_USAGE
        assert tokens == 3
        assert usage == Usage(12, 3, "llama-3-8b", 3)

    def test_completions_stream(self) -> None:
        """Completion streams carry ``text`` in their choices."""
        _, tokens, usage = track(
            info("completion", stream=True), COMPLETION_STREAM, "text/event-stream"
        )
        assert tokens == 4
        assert (usage.prompt_tokens, usage.completion_tokens) == (2, 4)

    def test_reasoning_and_tool_calls_are_tokens(self) -> None:
        """Reasoning deltas and tool-call deltas are generated tokens too."""
        body = sse(
            {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
            {
                "choices": [
                    {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}
                ]
            },
        )
        _, tokens, _ = track(info(), body, "text/event-stream")
        assert tokens == 2

    def test_continuous_usage_counts_reported_tokens(self) -> None:
        """vLLM's per-chunk cumulative usage gives the tokens of each chunk, several at once too."""
        body = sse(
            chat_chunk("", usage={"prompt_tokens": 5, "completion_tokens": 0}),
            chat_chunk("a", usage={"prompt_tokens": 5, "completion_tokens": 1}),
            chat_chunk("bcd", usage={"prompt_tokens": 5, "completion_tokens": 4}),
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}},
        )
        _, tokens, usage = track(info(), body, "text/event-stream")
        assert tokens == 4
        assert (usage.prompt_tokens, usage.completion_tokens) == (5, 4)

    def test_chunks_like_the_streams_shape_but_not_of_it(self) -> None:
        """A chunk that starts and ends as the stream's plain chunks but differs between is read
        in full: a second member after the text, a tool call, an escape, a newline in its data.

        Whole, the events go through the shape's reading in place; cut one byte at a time,
        through the splitter: both count the same.
        """

        def of(delta: dict[str, Any]) -> dict[str, Any]:
            return chat_chunk(None, choices=[{"index": 0, "delta": delta, "finish_reason": None}])

        plain = [chat_chunk(t) for t in ("a", "b")]
        body = sse(
            of({"role": "assistant", "content": ""}),
            *plain,
            of({"content": "", "role": "x"}),
            chat_chunk('say "hi"\n'),
            of({"content": "", "tool_calls": []}),
            chat_chunk(""),
            *plain,
        ).replace(b'"b"}', b'"b\nc"}', 1)  # one event's data on two lines: a cut chunk, a token
        for chunks in ([body], [body[i : i + 1] for i in range(len(body))]):
            _, tokens, usage = track(info(), body, "text/event-stream", chunks=chunks)
            assert (tokens, usage.token_events) == (5, 5)

    @pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
    def test_strip_cuts_null_usage_from_chunks_of_the_streams_shape(
        self, separators: tuple[str, str]
    ) -> None:
        """Asked for usage, a server writes `"usage": null` in every chunk; strip mode cuts
        it from chunks read by the stream's shape as from any other, however they are read."""

        def event(text: str, **extra: Any) -> bytes:
            obj = {**chat_chunk(text), **extra}
            return b"data: " + json.dumps(obj, separators=separators).encode() + b"\n\n"

        texts = ("a", "b", "c", "d", 'q"uote', "")
        asked = [event(t, usage=None) for t in texts] + [b"data: [DONE]\n\n"]
        expected = b"".join(event(t) for t in texts) + b"data: [DONE]\n\n"
        body = b"".join(asked)
        two = [*asked[:2], asked[2] + asked[3], *asked[4:]]  # two of the shape in one read
        for chunks in (asked, two, [body], [body[i : i + 5] for i in range(0, len(body), 5)]):
            out, tokens, _ = track(info(), body, "text/event-stream", chunks=chunks, strip=True)
            assert (out, tokens) == (expected, 5)

    @pytest.mark.parametrize("strip", [False, True])
    def test_a_run_of_three_newlines_ends_the_chunk_it_is_in(self, strip: bool) -> None:
        """Whole events cut at each blank line, as the splitter cuts them, where an event
        ends in three newlines (the third is the next event's empty first line): read in
        place, such a chunk once sent the tracker round in a loop that never ended."""
        import threading

        plain = sse(chat_chunk("a"), chat_chunk("b"), done=False)
        odd = [
            plain + sse(chat_chunk("c"), done=False)[:-2] + b"\n\n\n",
            plain.replace(b"\n\n", b"\n\n\n", 1) + b"data: [DONE]\n\n",
            plain + b"data: [DONE]\n\n\n",
        ]
        for body in odd:
            got: list[tuple[int, int]] = []

            def run(body: bytes = body, got: list[tuple[int, int]] = got) -> None:
                _, tokens, usage = track(info(), body, "text/event-stream", strip=strip)
                got.append((tokens, usage.token_events))

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            worker.join(10.0)
            assert got, f"the tracker did not return on {body[-40:]!r}"
            cut = [body[i : i + 7] for i in range(0, len(body), 7)]
            _, tokens, usage = track(info(), body, "text/event-stream", chunks=cut, strip=strip)
            assert got == [(tokens, usage.token_events)], body[-40:]

    def test_embeddings(self) -> None:
        """Embeddings report prompt tokens only; they generate none."""
        body = json.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
                "model": "e5",
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            }
        ).encode()
        out, _, usage = track(info("embedding", stream=False), body, "application/json")
        assert out == body
        assert usage == Usage(8, 0, "e5", 0)

    def test_error_body(self) -> None:
        """An error body teaches nothing and passes through."""
        body = b'{"object": "error", "message": "model not found", "code": 404}'
        out, _, usage = track(info(stream=False), body, "application/json")
        assert out == body
        assert usage == Usage(None, None, None, 0)

    def test_missing_content_type_on_stream(self) -> None:
        """A streaming request whose response lacks a content type is read as SSE."""
        _, tokens, usage = track(info(), CHAT_STREAM_USAGE, None)
        assert (tokens, usage.completion_tokens) == (3, 3)


class TestTGI:
    """TGI native responses: ``details``, headers, and the SSE stream's final details."""

    def test_generate_with_details_and_headers(self) -> None:
        """``details.generated_tokens`` and ``x-prompt-tokens`` give the counts."""
        body = json.dumps(
            {
                "generated_text": "Deep learning is",
                "details": {
                    "finish_reason": "length",
                    "generated_tokens": 3,
                    "seed": None,
                    "prefill": [],
                    "tokens": [],
                },
            }
        ).encode()
        headers = {"X-Prompt-Tokens": "7", "X-Generated-Tokens": "3", "x-time-per-token": "12"}
        out, _, usage = track(
            info("generate", "tgi", stream=False, model=None),
            body,
            "application/json",
            headers=headers,
        )
        assert out == body
        assert usage == Usage(7, 3, None, 0)

    def test_generate_headers_only(self) -> None:
        """Without ``details`` the headers still give both counts."""
        body = b'{"generated_text": "Deep learning is"}'
        headers = {"x-prompt-tokens": "5", "x-generated-tokens": "20"}
        _, _, usage = track(
            info("generate", "tgi", stream=False), body, "application/json", headers=headers
        )
        assert (usage.prompt_tokens, usage.completion_tokens) == (5, 20)

    def test_generate_list_answer(self) -> None:
        """The one-element list of TGI's compatibility route is read too."""
        body = b'[{"generated_text": "x", "details": {"generated_tokens": 4}}]'
        _, _, usage = track(info("generate", "tgi", stream=False), body, "application/json")
        assert usage.completion_tokens == 4

    def test_generate_stream_final_details(self) -> None:
        """Every token event counts; the final details give generated and input lengths."""
        out, tokens, usage = track(info("generate", "tgi"), TGI_STREAM, "text/event-stream")
        assert out == TGI_STREAM
        assert tokens == 3
        assert usage == Usage(7, 3, None, 3)

    def test_older_tgi_without_input_length(self) -> None:
        """Older TGI omits ``input_length``: prompt tokens stay unknown."""
        body = TGI_STREAM.replace(b', "input_length": 7', b"")
        _, _, usage = track(info("generate", "tgi"), body, "text/event-stream")
        assert (usage.prompt_tokens, usage.completion_tokens) == (None, 3)


class TestOllama:
    """Ollama's NDJSON streams and single-object answers."""

    def test_generate_stream(self) -> None:
        """Each ``done: false`` object is a token event; the last object has the counts."""
        out, tokens, usage = track(
            info("generate", "ollama"), OLLAMA_GENERATE_STREAM, "application/x-ndjson"
        )
        assert out == OLLAMA_GENERATE_STREAM
        assert tokens == 2
        assert usage == Usage(26, 2, "llama3.2", 2)

    def test_chat_stream(self) -> None:
        """Chat streams carry ``message`` objects and the same final counts."""
        _, tokens, usage = track(info("chat", "ollama"), OLLAMA_CHAT_STREAM, "application/x-ndjson")
        assert tokens == 3
        assert usage == Usage(9, 3, "llama3.2", 3)

    def test_non_stream(self) -> None:
        """``"stream": false`` returns one object, without a trailing newline."""
        body = json.dumps(
            {
                "model": "llama3.2",
                "response": "Hi",
                "done": True,
                "prompt_eval_count": 4,
                "eval_count": 1,
            }
        ).encode()
        out, tokens, usage = track(
            info("generate", "ollama", stream=False), body, "application/json; charset=utf-8"
        )
        assert (out, tokens) == (body, 0)
        assert usage == Usage(4, 1, "llama3.2", 0)

    def test_embed(self) -> None:
        """``/api/embed`` reports prompt tokens; embeddings generate none."""
        body = b'{"model": "all-minilm", "embeddings": [[0.1, 0.2]], "prompt_eval_count": 8}'
        _, _, usage = track(info("embedding", "ollama", stream=False), body, "application/json")
        assert usage == Usage(8, 0, "all-minilm", 0)

    def test_error_object(self) -> None:
        """An error object is passed through and teaches nothing."""
        body = b'{"error": "model \\"nope\\" not found, try pulling it first"}'
        out, _, usage = track(info("generate", "ollama"), body, "application/json")
        assert out == body
        assert usage == Usage(None, None, None, 0)


STREAMS: list[tuple[str, RequestInfo, bytes, str, tuple[int, Usage]]] = [
    (
        "openai-usage",
        info(),
        CHAT_STREAM_USAGE,
        "text/event-stream",
        (3, Usage(12, 3, "llama-3-8b", 3)),
    ),
    (
        "openai-no-usage",
        info(),
        CHAT_STREAM_NO_USAGE,
        "text/event-stream",
        (3, Usage(None, None, "llama-3-8b", 3)),
    ),
    (
        "openai-crlf",
        info(),
        CHAT_STREAM_USAGE.replace(b"\n", b"\r\n"),
        "text/event-stream",
        (3, Usage(12, 3, "llama-3-8b", 3)),
    ),
    (
        "openai-cr",
        info(),
        CHAT_STREAM_USAGE.replace(b"\n", b"\r"),
        "text/event-stream",
        (3, Usage(12, 3, "llama-3-8b", 3)),
    ),
    ("tgi", info("generate", "tgi"), TGI_STREAM, "text/event-stream", (3, Usage(7, 3, None, 3))),
    (
        "ollama",
        info("generate", "ollama"),
        OLLAMA_GENERATE_STREAM,
        "application/x-ndjson",
        (2, Usage(26, 2, "llama3.2", 2)),
    ),
]


class TestStreaming:
    """Whether a response is a token stream comes from its content type."""

    @pytest.mark.parametrize(
        ("req", "ctype", "expected"),
        [
            (info("generate", "tgi", stream=False), "text/event-stream", True),
            (info("generate", "ollama"), "application/x-ndjson", True),
            (info("generate", "ollama"), "application/json; charset=utf-8", False),
            (info(stream=True), "application/json", False),
            (info(stream=True), None, True),
            (info(stream=False), None, False),
        ],
    )
    def test_streaming(self, req: RequestInfo, ctype: str | None, expected: bool) -> None:
        """SSE and NDJSON responses are streams; without a content type the request decides."""
        assert ResponseTracker(req, ctype, None, {}).streaming is expected

    def test_gzip_stream_is_still_a_stream(self) -> None:
        """A compressed SSE response is a stream even though it is not parsed."""
        assert ResponseTracker(info(), "text/event-stream", "gzip", {}).streaming


class TestChunkBoundaries:
    """Events split anywhere across network chunks are read the same."""

    @pytest.mark.parametrize(
        ("req", "body", "ctype", "expected"), [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS]
    )
    def test_every_split_point(
        self, req: RequestInfo, body: bytes, ctype: str, expected: tuple[int, Usage]
    ) -> None:
        """A split at every byte offset, and byte-at-a-time feeding, give the same result."""
        for cut in range(len(body) + 1):
            out, tokens, usage = track(req, body, ctype, chunks=[body[:cut], body[cut:]])
            assert (out, (tokens, usage)) == (body, expected), cut
        singles = [body[i : i + 1] for i in range(len(body))]
        assert track(req, body, ctype, chunks=singles) == (body, *expected)

    def test_crlf_split_between_cr_and_lf(self) -> None:
        """A chunk ending on the CR of a CRLF does not end the event early."""
        body = CHAT_STREAM_USAGE.replace(b"\n", b"\r\n")
        cuts = [i + 1 for i in range(len(body)) if body[i : i + 1] == b"\r"]
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert track(info(), body, "text/event-stream", chunks=chunks) == (
            body,
            3,
            Usage(12, 3, "llama-3-8b", 3),
        )


class TestStripUsage:
    """Strip mode removes exactly the injected usage chunk and nothing else."""

    @pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
    def test_output_is_input_minus_usage_event(self, eol: bytes) -> None:
        """Every split point gives the stream minus exactly the usage event, byte for byte."""
        body = CHAT_STREAM_USAGE.replace(b"\n", eol)
        usage_event = USAGE_EVENT.replace(b"\n", eol)
        expected = body.replace(usage_event, b"")
        assert len(expected) == len(body) - len(usage_event)
        for cut in range(len(body) + 1):
            out, tokens, usage = track(
                info(), body, "text/event-stream", chunks=[body[:cut], body[cut:]], strip=True
            )
            assert out == expected, cut
            assert (tokens, usage) == (3, Usage(12, 3, "llama-3-8b", 3))

    def test_byte_at_a_time(self) -> None:
        """Byte-at-a-time feeding strips the same event."""
        chunks = [CHAT_STREAM_USAGE[i : i + 1] for i in range(len(CHAT_STREAM_USAGE))]
        out, _, usage = track(
            info(), CHAT_STREAM_USAGE, "text/event-stream", chunks=chunks, strip=True
        )
        assert out == CHAT_STREAM_USAGE.replace(USAGE_EVENT, b"")
        assert usage.completion_tokens == 3

    def test_complete_events_are_released_at_once(self) -> None:
        """Whole events go out in the chunk that completes them; only a partial one waits."""
        tracker = ResponseTracker(info(), "text/event-stream", None, {}, strip_usage_chunk=True)
        first = sse(chat_chunk("Hel"), done=False)
        assert tracker.feed(first + b"data: {").out == first
        assert tracker.feed(b'"choices": []}\n\n').out == b'data: {"choices": []}\n\n'

    def test_usage_in_content_chunk_is_kept(self) -> None:
        """Chunks that carry choices are never stripped, even with a usage object."""
        body = sse(chat_chunk("a", usage={"prompt_tokens": 1, "completion_tokens": 1}))
        out, _, _ = track(info(), body, "text/event-stream", strip=True)
        assert out == body

    def test_unterminated_usage_event_is_flushed_not_stripped(self) -> None:
        """A usage event cut off by the end of the stream is sent on flush, unchanged."""
        body = sse(chat_chunk("a"), done=False) + USAGE_EVENT[:-1]
        out, _, usage = track(info(), body, "text/event-stream", strip=True)
        assert out == body
        assert usage.completion_tokens == 3

    @pytest.mark.parametrize("compact", [False, True])
    def test_null_usage_members_are_removed(self, compact: bool) -> None:
        """The ``"usage": null`` that include_usage adds to every other chunk is removed too."""
        seps = (",", ":") if compact else (", ", ": ")
        chunks = [chat_chunk("Hel"), chat_chunk("lo"), chat_chunk(None)]

        def stream(objs: list[dict[str, Any]]) -> bytes:
            return b"".join(
                b"data: " + json.dumps(o, separators=seps).encode() + b"\n\n" for o in objs
            )

        first = {"usage": None, **chat_chunk("x")}  # the member may come first, too
        served = stream([{**c, "usage": None} for c in chunks] + [first, USAGE_CHUNK])
        served += b"data: [DONE]\n\n"
        expected = stream([*chunks, chat_chunk("x")]) + b"data: [DONE]\n\n"
        for cut in range(0, len(served) + 1, 7):
            out, tokens, usage = track(
                info(), served, "text/event-stream", chunks=[served[:cut], served[cut:]], strip=True
            )
            assert out == expected, cut
            assert (tokens, usage.completion_tokens) == (3, 3)
        out, _, _ = track(info(), served, "text/event-stream")
        assert out == served  # without strip mode nothing changes

    def test_null_usage_inside_text_is_kept(self) -> None:
        """Text that spells a null usage member is content, not a member, and stays."""
        body = sse(chat_chunk('{"a": 1, "usage": null}'), chat_chunk("b", usage=None))
        out, _, _ = track(info(), body, "text/event-stream", strip=True)
        assert out == sse(chat_chunk('{"a": 1, "usage": null}'), chat_chunk("b"))

    def test_strip_without_sse_is_a_no_op(self) -> None:
        """A non-SSE response in strip mode passes through unchanged."""
        body = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
        out, _, usage = track(info(stream=False), body, "application/json", strip=True)
        assert out == body
        assert usage.completion_tokens == 2


class TestPassThrough:
    """Bodies the tracker cannot or should not read go through untouched."""

    def test_gzip_body_untouched_and_unparsed(self) -> None:
        """A gzip-encoded stream passes byte for byte and nothing is read from it."""
        body = gzip.compress(CHAT_STREAM_USAGE)
        chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
        out, tokens, usage = track(
            info(), body, "text/event-stream", chunks=chunks, encoding="gzip", strip=True
        )
        assert (out, tokens) == (body, 0)
        assert usage == Usage(None, None, None, 0)

    @pytest.mark.parametrize("encoding", ["br", "deflate", "gzip, identity", "zstd"])
    def test_any_encoding_is_not_parsed(self, encoding: str) -> None:
        """Any content coding but identity switches parsing off."""
        body = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
        _, _, usage = track(info(stream=False), body, "application/json", encoding=encoding)
        assert usage.completion_tokens is None

    def test_identity_encoding_is_parsed(self) -> None:
        """``Content-Encoding: identity`` is plain bytes."""
        body = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
        _, _, usage = track(info(stream=False), body, "application/json", encoding="identity")
        assert usage.completion_tokens == 2

    def test_other_content_types_pass(self) -> None:
        """An HTML error page is not parsed."""
        body = b"<html>502 Bad Gateway</html>"
        out, tokens, usage = track(info(), body, "text/html")
        assert (out, tokens, usage) == (body, 0, Usage(None, None, None, 0))

    def test_other_endpoint_is_not_parsed(self) -> None:
        """Non-inference responses are never parsed."""
        req = RequestInfo("other", "none", None, False, None, False)
        out, _, usage = track(req, CHAT_STREAM_USAGE, "text/event-stream")
        assert (out, usage.completion_tokens) == (CHAT_STREAM_USAGE, None)

    @pytest.mark.parametrize(
        "body",
        [
            b"data: {not json}\n\ndata: [DONE]\n\n",
            b'data: {"choices": [{"delta": {"content": "a"}}]\n\n',
            b"event: ping\n: comment\n\nretry: 10\n\n",
            b"\n\n\n\r\r\n",
            b'data: [1, 2]\n\ndata: "x"\n\ndata: null\n\n',
            b'data: {"choices": "nope", "usage": [1]}\n\n',
            b'data: {"choices": [1, null, {"delta": 3}], "usage": {"completion_tokens": "x"}}\n\n',
            b"data: \xff\xfe\n\n",
            b'data: {"usage": {"prompt_tokens": -1, "completion_tokens": true}}\n\n',
        ],
    )
    def test_malformed_sse_passes_untouched(self, body: bytes) -> None:
        """Malformed SSE is forwarded unchanged, in strip mode too, and never raises."""
        for strip in (False, True):
            out, _, usage = track(info(), body, "text/event-stream", strip=strip)
            assert out == body
            assert (usage.prompt_tokens, usage.completion_tokens) == (None, None)

    @pytest.mark.parametrize(
        ("ctype", "req"),
        [
            ("application/json", info(stream=False)),
            ("application/x-ndjson", info("chat", "ollama")),
        ],
    )
    def test_malformed_json_passes_untouched(self, ctype: str, req: RequestInfo) -> None:
        """Malformed JSON and NDJSON are forwarded unchanged and never raise."""
        body = b'{"usage": {"prompt_tokens": 3\n{"done": tru\n\xff\n[]\n'
        out, tokens, usage = track(req, body, ctype)
        assert (out, tokens, usage) == (body, 0, Usage(None, None, None, 0))

    def test_feed_after_finish_passes_through(self) -> None:
        """Bytes fed after ``finish`` are forwarded and ignored."""
        tracker = ResponseTracker(info(), "text/event-stream", None, {})
        usage = tracker.finish()
        fed = tracker.feed(CHAT_STREAM_USAGE)
        assert (fed.out, fed.tokens, tracker.finish()) == (CHAT_STREAM_USAGE, 0, usage)
        assert tracker.flush() == b""


class TestBufferCap:
    """The tracker never holds more than ``max_buffer`` bytes."""

    def test_large_json_gives_up_but_salvages_tail_usage(self) -> None:
        """An over-cap embeddings body is not buffered; usage and model are read from its tail."""
        body = json.dumps(
            {
                "object": "list",
                "data": [{"index": i, "embedding": [0.123456789] * 64} for i in range(200)],
                "model": "e5-large",
                "usage": {"prompt_tokens": 800, "total_tokens": 800},
            }
        ).encode()
        chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        out, _, usage = track(
            info("embedding", stream=False),
            body,
            "application/json",
            chunks=chunks,
            max_buffer=16384,
        )
        assert out == body
        assert usage == Usage(800, 0, "e5-large", 0)

    def test_usage_text_inside_a_string_is_not_salvaged(self) -> None:
        """A ``"usage"`` inside generated text (escaped quotes) is not mistaken for the field."""
        text = "x" * 5000 + '"usage": {"prompt_tokens": 99, "completion_tokens": 99}'
        body = json.dumps({"choices": [{"text": text}], "model": "m"}).encode()
        _, _, usage = track(
            info(stream=False),
            body,
            "application/json",
            chunks=[body[:100], body[100:]],
            max_buffer=1024,
        )
        assert (usage.prompt_tokens, usage.completion_tokens, usage.model) == (None, None, "m")

    @pytest.mark.parametrize("strip", [False, True])
    def test_oversized_sse_event_passes_and_parsing_resumes(self, strip: bool) -> None:
        """An event bigger than the cap is forwarded unparsed; the events after it are read."""
        big = sse(chat_chunk("x" * 5000), done=False)
        body = sse(chat_chunk("a"), done=False) + big + CHAT_STREAM_USAGE
        chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
        out, tokens, usage = track(
            info(), body, "text/event-stream", chunks=chunks, strip=strip, max_buffer=1024
        )
        assert out == (body.replace(USAGE_EVENT, b"") if strip else body)
        assert tokens == 4  # the oversized event is not counted
        assert usage.completion_tokens == 3

    def test_oversized_event_in_one_chunk_is_not_parsed(self) -> None:
        """A whole event over the cap arriving in one chunk is not parsed either."""
        body = sse(chat_chunk("x" * 5000), done=False)
        out, tokens, _ = track(info(), body, "text/event-stream", strip=True, max_buffer=1024)
        assert (out, tokens) == (body, 0)

    def test_oversized_ndjson_line_skipped(self) -> None:
        """An NDJSON line over the cap is skipped; the following lines are read."""
        big = json.dumps({"model": "x", "response": "y" * 5000, "done": False}).encode() + b"\n"
        body = big + OLLAMA_GENERATE_STREAM
        chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
        out, tokens, usage = track(
            info("generate", "ollama"), body, "application/x-ndjson", chunks=chunks, max_buffer=1024
        )
        assert out == body
        assert (tokens, usage.completion_tokens) == (2, 2)

    def test_oversized_event_split_at_cr(self) -> None:
        """Overflow with a pending CR keeps framing right for CR-only streams."""
        body = (sse(chat_chunk("x" * 3000), done=False) + CHAT_STREAM_USAGE).replace(b"\n", b"\r")
        for size in (1, 7, 100, 1023, 1024, 1025):
            chunks = [body[i : i + size] for i in range(0, len(body), size)]
            out, tokens, usage = track(
                info(), body, "text/event-stream", chunks=chunks, strip=True, max_buffer=1024
            )
            assert out == body.replace(USAGE_EVENT.replace(b"\n", b"\r"), b""), size
            assert (tokens, usage.completion_tokens) == (3, 3), size


class TestOverTheWire:
    """The tracker fed from a real HTTP stream, chunked as the network delivers it."""

    @staticmethod
    def app(body: bytes, content_type: str, encoding: str | None = None) -> web.Application:
        async def stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.content_type = content_type
            if encoding is not None:
                response.headers["Content-Encoding"] = encoding
            await response.prepare(request)
            for i in range(0, len(body), 37):  # odd sizes: events split across writes
                await response.write(body[i : i + 37])
                await asyncio.sleep(0)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/v1/chat/completions", stream)
        return app

    async def read(
        self, server: TestServer, req: RequestInfo, *, strip: bool
    ) -> tuple[bytes, int, Usage]:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.post(server.make_url("/v1/chat/completions"), data=b"{}") as resp,
        ):
            tracker = ResponseTracker(
                req,
                resp.headers.get("Content-Type"),
                resp.headers.get("Content-Encoding"),
                resp.headers,
                strip_usage_chunk=strip,
            )
            out = bytearray()
            tokens = 0
            async for chunk in resp.content.iter_any():
                fed = tracker.feed(chunk)
                out += fed.out
                tokens += fed.tokens
            out += tracker.flush()
            return bytes(out), tokens, tracker.finish()

    async def test_sse_stream_with_strip(self, aiohttp_server: AiohttpServer) -> None:
        """A streamed chat read off the wire strips exactly the usage chunk and learns the counts."""
        server = await aiohttp_server(self.app(CHAT_STREAM_USAGE, "text/event-stream"))
        out, tokens, usage = await self.read(server, info(), strip=True)
        assert out == CHAT_STREAM_USAGE.replace(USAGE_EVENT, b"")
        assert (tokens, usage) == (3, Usage(12, 3, "llama-3-8b", 3))

    async def test_gzip_stream_is_untouched(self, aiohttp_server: AiohttpServer) -> None:
        """A gzip-encoded stream arrives byte for byte and is not parsed."""
        body = gzip.compress(CHAT_STREAM_USAGE)
        server = await aiohttp_server(self.app(body, "text/event-stream", "gzip"))
        out, tokens, usage = await self.read(server, info(), strip=True)
        assert (out, tokens, usage) == (body, 0, Usage(None, None, None, 0))
