"""Which API a request speaks, from its method and path alone.

The route lists are read from the servers' own source (vLLM 0.32's FastAPI
routers, SGLang 0.5's ``http_server.py``, TGI's router, Ollama's API docs),
not guessed. A server behind a path prefix (``/llm/v1/chat/completions``
behind an ingress) is matched by path suffix: the longest known route that
ends the path at a ``/`` boundary wins, so ``/api/generate`` (Ollama) is
never taken for ``/generate`` (TGI, SGLang). Any other ``POST`` is
``unknown``: inference with no token information, since booking a real
request's energy as standby is the worse error (CONTRACT.md, "In flight").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from sidecar.tracking.wire import Api, Endpoint

__all__ = ["classify"]

_OTHER: Final[tuple[Endpoint, Api]] = ("other", "none")
_UNKNOWN: Final[tuple[Endpoint, Api]] = ("unknown", "none")
_OPENAI_POOLING: Final[tuple[Endpoint, Api]] = ("pooling", "openai")

_INFERENCE: Final[Mapping[str, tuple[Endpoint, Api]]] = {
    # OpenAI-compatible (vLLM, SGLang, llama.cpp, TGI's messages API, Ollama's /v1)
    "/v1/chat/completions": ("chat", "openai"),
    "/chat/completions": ("chat", "openai"),
    "/v1/chat/completions/batch": ("chat", "openai"),  # vLLM: several conversations, one body
    "/v1/completions": ("completion", "openai"),
    "/completions": ("completion", "openai"),
    "/v1/responses": ("responses", "responses"),
    "/v1/messages": ("chat", "anthropic"),
    "/v1/embeddings": ("embedding", "openai"),
    "/embeddings": ("embedding", "openai"),
    "/v2/embed": ("embedding", "openai"),  # vLLM's Cohere-shape embeddings
    "/encode": ("embedding", "openai"),  # SGLang native embeddings
    # pooling models: rerank, score, classify, raw pooling (usage like embeddings)
    "/pooling": _OPENAI_POOLING,
    "/classify": _OPENAI_POOLING,
    "/v1/classify": _OPENAI_POOLING,
    "/score": _OPENAI_POOLING,
    "/v1/score": _OPENAI_POOLING,
    "/rerank": _OPENAI_POOLING,
    "/v1/rerank": _OPENAI_POOLING,
    "/v2/rerank": _OPENAI_POOLING,
    "/generative_scoring": _OPENAI_POOLING,  # vLLM: a prefill that scores given tokens
    # native generation: TGI and SGLang share /generate; the response shape tells them apart
    "/generate": ("generate", "tgi"),
    "/generate_stream": ("generate", "tgi"),
    "/inference/v1/generate": ("generate", "tgi"),  # vLLM's token-in, token-out route
    # Ollama
    "/api/generate": ("generate", "ollama"),
    "/api/chat": ("chat", "ollama"),
    "/api/embed": ("embedding", "ollama"),
    "/api/embeddings": ("embedding", "ollama"),
}

# POST paths that do no inference: tokenizers, health, admin, model management.
_NON_INFERENCE: Final = frozenset(
    {
        # health, probes, metrics, lists (some servers accept POST on them too)
        "/ping", "/health", "/health_generate", "/ready", "/readyz", "/metrics", "/version",
        "/v1/models", "/load", "/server_info", "/get_server_info", "/model_info",
        # tokenisers, renderers, token counting: the model does not run
        "/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize",
        "/v1/messages/count_tokens", "/v1/chat/completions/render", "/v1/completions/render",
        "/v1/chat/completions/derender", "/v1/completions/derender", "/v1/messages/render",
        "/v1/responses/render", "/parse_function_call", "/separate_reasoning",
        # vLLM admin
        "/abort_requests", "/inference/v1/abort_requests", "/collective_rpc", "/pause",
        "/resume", "/sleep", "/wake_up", "/reset_prefix_cache", "/reset_mm_cache",
        "/reset_encoder_cache", "/release_kv_cache_memory", "/start_profile", "/stop_profile",
        "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/update_weights",
        "/start_weight_update", "/finish_weight_update", "/start_draft_weight_update",
        "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine",
        "/update_weight_version", "/weight_checker", "/is_scaling_elastic_ep",
        "/scale_elastic_ep", "/fault_tolerance/apply",
        # SGLang admin
        "/flush_cache", "/open_session", "/close_session", "/configure_logging", "/freeze_gc",
        "/start_expert_distribution_record", "/stop_expert_distribution_record",
        "/dump_expert_distribution_record", "/get_weights_by_name", "/load_lora_adapter",
        "/load_lora_adapter_from_tensors", "/unload_lora_adapter", "/pd_role_switch",
        "/release_memory_occupation", "/resume_memory_occupation", "/set_internal_state",
        "/set_trace_level", "/slow_down", "/weights_checker", "/abort_request",
        "/add_external_corpus", "/remove_external_corpus", "/begin_weight_update",
        "/end_weight_update", "/pause_generation", "/continue_generation",
        "/init_weights_update_group", "/destroy_weights_update_group",
        "/init_weights_send_group_for_remote_instance", "/send_weights_to_remote_instance",
        "/update_weights_from_disk", "/update_weights_from_distributed",
        "/update_weights_from_ipc", "/update_weights_from_tensor",
        "/hicache/storage-backend/clear", "/register_transfer_engine_info",
        # Ollama model management
        "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/show",
        "/api/ps", "/api/tags", "/api/version",
    }
)  # fmt: skip
# Non-inference routes with a variable part: matched by the part before it.
_NON_INFERENCE_TREES: Final = ("/v1/responses/", "/dumper/", "/api/blobs/", "/v1/models/")
_INFERENCE_METHODS: Final = frozenset({"POST", "PUT"})  # SGLang takes PUT on /generate too


def classify(method: str, path: str) -> tuple[Endpoint, Api]:
    """Which inference endpoint and API a request is.

    Only ``POST`` (and ``PUT`` on a known inference route) is inference: a
    ``GET`` on the same path (a health probe, a misdirected browser) holds no
    energy. The query string and a trailing ``/`` are ignored.
    """
    verb = method.upper()
    if verb not in _INFERENCE_METHODS:
        return _OTHER
    route = path.split("?", 1)[0].rstrip("/") or "/"
    for suffix in _suffixes(route):
        known = _INFERENCE.get(suffix)
        if known is not None:
            return known
        if suffix in _NON_INFERENCE or suffix.startswith(_NON_INFERENCE_TREES):
            return _OTHER
    return _UNKNOWN if verb == "POST" else _OTHER


def _suffixes(route: str) -> list[str]:
    """``/a/b/c``, then ``/b/c``, then ``/c``: the longest known route wins."""
    out = [route]
    i = route.find("/", 1)
    while i != -1:
        out.append(route[i:])
        i = route.find("/", i + 1)
    return out
