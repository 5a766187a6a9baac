"""Traces mode's moving parts in one lifetime: receiver, forwarder, energy spans, listener.

:class:`Sidecar` builds one from the settings, starts it after the meter exists and
stops it before the meter flushes; ``on_span`` is the accounting's entry point for a
request span and ``finished`` the exit for a request's final energy.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from aiohttp import web

from sidecar.config import Settings, split_host_port
from sidecar.ledger import FinishedRequest
from sidecar.traces.energy_spans import EnergySpans
from sidecar.traces.forward import Forwarder
from sidecar.traces.receiver import RUNNER_KWARGS, Receiver
from sidecar.traces.span import RequestSpan

log = structlog.get_logger("sidecar.traces")


class ListenError(OSError):
    """The receiver's port cannot be bound (start-up names ``--otlp-listen``)."""


class TracesService:
    """The OTLP receiver on ``--otlp-listen``, with forwarding and energy spans as asked."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_span: Callable[[RequestSpan], None],
        clock: Callable[[], float],
        wall_offset_s: float,
        grams_per_joule: Callable[[], float],
    ) -> None:
        assert settings.otlp_listen is not None
        self.listen = settings.otlp_listen
        self._on_span = on_span
        forward_url = str(settings.otlp_forward) if settings.otlp_forward else None
        self.forwarder = Forwarder(forward_url) if forward_url else None
        self.energy_forwarder = (
            Forwarder(forward_url, name="otlp-energy", workers=1)
            if forward_url and settings.otlp_energy_spans
            else None
        )
        self.energy_spans = (
            EnergySpans(
                self.energy_forwarder,
                clock=clock,
                wall_offset_s=wall_offset_s,
                grams_per_joule=grams_per_joule,
            )
            if self.energy_forwarder is not None
            else None
        )
        self.receiver = Receiver(
            self._span,
            to_monotonic_s=lambda unix_s: unix_s - wall_offset_s,
            forward=self.forwarder,
        )
        self._runner: web.AppRunner | None = None

    def _span(self, span: RequestSpan) -> None:
        if self.energy_spans is not None:
            self.energy_spans.remember(span)
        self._on_span(span)

    def finished(self, f: FinishedRequest) -> None:
        """A request's energy is final: its energy span, where one is asked for."""
        if self.energy_spans is not None:
            self.energy_spans.finished(f)

    async def start(self) -> None:
        for forwarder in (self.forwarder, self.energy_forwarder):
            if forwarder is not None:
                await forwarder.start()
        if self.energy_spans is not None:
            await self.energy_spans.start()
        self._runner = web.AppRunner(self.receiver.app(), access_log=None, **RUNNER_KWARGS)
        await self._runner.setup()
        host, port = split_host_port(self.listen)
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as e:
            raise ListenError(f"cannot listen on {self.listen}: {e.strerror or e}") from e
        log.info(
            "otlp.listening",
            listen=self.listen,
            forward=self.forwarder.url if self.forwarder else None,
            energy_spans=self.energy_spans is not None,
        )

    async def stop_listening(self) -> None:
        """No more exports: called before the meter's last flush, so every span received
        is accounted and every request's energy span is built before :meth:`stop`."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def stop(self) -> None:
        """Send the last energy spans, then let the queues drain briefly."""
        await self.stop_listening()
        if self.energy_spans is not None:
            await self.energy_spans.close()
        for forwarder in (self.forwarder, self.energy_forwarder):
            if forwarder is not None:
                await forwarder.close()
