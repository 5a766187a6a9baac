"""Before the power source names this pod's GPUs: traffic passes, un-metered, and is counted.

In Kubernetes the sidecar may start before dcgm-exporter maps the pod to its
GPUs (the kubelet tells it some seconds later), or before the model's process
runs on a GPU (discovery in a shared process namespace). Exiting would delay
the model, so the sidecar waits and retries with backoff instead, while the
proxy serves. The ledger is built from the GPU list, so nothing can be
attributed yet: the proxy's requests go to an :class:`UnmeteredMeter` that
only counts them (``llm_energy_unmetered_requests_total``), and once the GPUs
are known a real meter and a fresh proxy take over; requests still in flight
on the first proxy finish there, un-metered, so none is booked half-measured.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.meter import Endpoint, IntensitySource, Meter
from sidecar.power.base import GpuInfo
from sidecar.sampler import SamplerStats

__all__ = ["WAITING_GPU", "StartupCollector", "UnmeteredMeter"]

WAITING_GPU = ""
"""The ``gpu`` label of start-up retries, before any GPU is known (PromQL reads it as absent)."""


class UnmeteredMeter(Meter):
    """The proxy's meter while no GPU is known: counts requests, attributes nothing.

    A :class:`Meter` over one placeholder GPU that never samples, so calls the
    proxy makes beyond the ones overridden here still land somewhere harmless.
    ``/summary`` is delegated to the real meter once one is attached.
    """

    def __init__(self, *, clock: Callable[[], float], intensity: IntensitySource, **kw: Any):
        super().__init__(
            [GpuInfo("pending", "pending", "pending")], clock=clock, intensity=intensity, **kw
        )
        self.gpus = []
        self.unmetered = 0
        """Inference requests that finished here, before any GPU was known."""
        self.detail = ""
        """Why the power source is not ready (its last one-line error)."""
        self.attached: Meter | None = None
        self._open_labels: dict[str, tuple[str, Endpoint]] = {}
        self._ids = itertools.count(1)

    # Overrides take what the proxy passes and ignore the rest, so a new keyword
    # on Meter's methods (a tenant, a receipt) cannot break the wait.
    def request_started(self, endpoint: Endpoint, model: str | None, *_: Any, **__: Any) -> str:
        rid = f"u{next(self._ids)}"
        self._open_labels[rid] = (self.models(model or self.default_model), endpoint)
        return rid

    def model_learned(self, rid: str, *_: Any, **__: Any) -> None:
        return None

    def first_token(self, rid: str, *_: Any, **__: Any) -> None:
        return None

    def tokens_streamed(self, rid: str, *_: Any, **__: Any) -> None:
        return None

    def request_finished(self, rid: str, *_: Any, **__: Any) -> None:
        if self._open_labels.pop(rid, None) is not None:
            self.unmetered += 1

    def summary(self, last_power: dict[str, float]) -> dict[str, Any]:
        if self.attached is not None:
            return self.attached.summary(last_power)
        return {
            "status": "waiting_for_power_source",
            "detail": self.detail,
            "unmetered_requests": self.unmetered,
            "gpus": [],
        }


class StartupCollector(Collector):
    """The metrics of the start-up wait, and, once attached, the full collector's.

    ``full`` returns the sidecar's collector once a meter exists (``None``
    before); until then this yields what is known: the build, the sampler's
    stats (the ``not_mapped`` retries) and the wait itself.
    """

    def __init__(
        self,
        full: Callable[[], Collector | None],
        unmetered: UnmeteredMeter | None,
        stats: Callable[[], SamplerStats],
        *,
        power_source: str,
        mode: str,
    ) -> None:
        self._full = full
        self._unmetered = unmetered
        self._stats = stats
        self._power_source = power_source
        self._mode = mode

    def collect(self) -> Iterator[Metric]:
        full = self._full()
        if full is not None:
            yield from full.collect()
        else:
            info = GaugeMetricFamily(
                "llm_energy_build_info",
                "Build and mode of this sidecar (always 1).",
                labels=["version", "power_source", "mode"],
            )
            info.add_metric([__version__, self._power_source, self._mode], 1)
            yield info
            errors = CounterMetricFamily(
                "llm_energy_sampler_errors",
                "Failed power reads, per GPU and reason.",
                labels=["gpu", "reason"],
            )
            for (gpu, reason), n in sorted(self._stats().errors.items()):
                errors.add_metric([gpu, reason], n)
            yield errors
        yield GaugeMetricFamily(
            "llm_energy_power_source_waiting",
            "1 while the power source cannot name this pod's GPUs yet; the proxy serves un-metered.",
            value=1.0 if full is None else 0.0,
        )
        yield CounterMetricFamily(
            "llm_energy_unmetered_requests",
            "Inference requests passed through before the power source named this pod's GPUs.",
            value=0 if self._unmetered is None else self._unmetered.unmetered,
        )
