"""``python -m bench.variant_sidecar VARIANT run ...``: the sidecar with part of its work switched off.

A measurement, never a deployment: it splits the sidecar's CPU by what it
does. ``full`` is the sidecar as it is; ``nosim`` leaves the simulated GPU
undriven (``--power-source simulated`` follows proxied requests: a benchmark's
stand-in for the model server's load, absent with NVML); ``nometer`` also
tells the meter nothing of proxied requests (no ledger work for them), so
what is left is the data plane and the response tracking.
"""

from __future__ import annotations

import sys
from typing import Any

from sidecar import app
from sidecar.cli import main
from sidecar.sources.proxy import ProxySource

VARIANTS = ("full", "nosim", "nometer")


def _nothing(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def _rid(self: Any, *args: Any, **kwargs: Any) -> str:
    return f"{self._id_prefix}-r{next(self._ids)}"


def switch_off(variant: str) -> None:
    if variant not in VARIANTS:
        raise SystemExit(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    if variant in ("nosim", "nometer"):
        for name in ("started", "streaming", "finished"):
            setattr(app.RequestDrivenLoad, name, _nothing)
    if variant == "nometer":
        ProxySource.request_started = _rid  # type: ignore[method-assign]
        for name in ("first_token", "tokens_streamed", "request_finished", "model_learned"):
            setattr(ProxySource, name, _nothing)


if __name__ == "__main__":
    switch_off(sys.argv.pop(1))
    sys.exit(main())
