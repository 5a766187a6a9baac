"""The relay data plane (``--data-plane relay``): the proxy on asyncio protocols and llhttp.

Nothing here is imported until the setting asks for it, so the aiohttp data
plane runs without :mod:`httptools` loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.config import Settings
    from sidecar.tracking.proxy import Proxy


def proxy_class(data_plane: str) -> type[Proxy]:
    """The proxy class for a ``data_plane`` setting (``aiohttp`` or ``relay``)."""
    if data_plane == "relay":
        from sidecar.relay.proxy import RelayProxy

        return RelayProxy
    from sidecar.tracking.proxy import Proxy

    return Proxy


async def listen_relay(sidecar: Any, settings: Settings) -> Any:
    """The relay listening on ``--listen`` for ``sidecar.proxy``; ``cleanup()`` drains it."""
    from sidecar.app import StartupError
    from sidecar.relay.proxy import listen

    try:
        return await listen(sidecar, settings.listen, grace_s=settings.grace_period)
    except OSError as e:  # a port in use, typically
        raise StartupError(
            f"--listen: cannot listen on {settings.listen}: {e.strerror or e}"
        ) from e
