"""Which API a request speaks, from its method and path alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from sidecar.tracking.wire import Api, Endpoint

__all__ = ["classify"]

_OTHER: Final[tuple[Endpoint, Api]] = ("other", "none")
_ROUTES: Final[Mapping[str, tuple[Endpoint, Api]]] = {
    "/v1/chat/completions": ("chat", "openai"),
    "/v1/completions": ("completion", "openai"),
    "/v1/embeddings": ("embedding", "openai"),
    "/generate": ("generate", "tgi"),
    "/generate_stream": ("generate", "tgi"),
    "/api/generate": ("generate", "ollama"),
    "/api/chat": ("chat", "ollama"),
    "/api/embed": ("embedding", "ollama"),
    "/api/embeddings": ("embedding", "ollama"),
}


def classify(method: str, path: str) -> tuple[Endpoint, Api]:
    """Which inference endpoint and API a request is, by exact path.

    Only ``POST`` is inference: a ``GET`` on the same path (a health probe, a
    misdirected browser) holds no energy. Paths are exact, query string
    aside, so a server's ``/metrics`` or ``/v1/models`` is never mistaken for
    work.
    """
    if method.upper() != "POST":
        return _OTHER
    return _ROUTES.get(path.split("?", 1)[0], _OTHER)
