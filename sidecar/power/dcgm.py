"""Power from a node's dcgm-exporter, for a sidecar that cannot see the GPU.

In Kubernetes a container cannot request the GPU its neighbour holds, and
hardened clusters stop ``NVIDIA_VISIBLE_DEVICES=all``. dcgm-exporter, a
DaemonSet on every GPU node, already reads every GPU and, with its Kubernetes
mapping on, labels each series with the ``pod`` and ``namespace`` that hold
the GPU. This source scrapes it (reached through the downward API's host IP)
and keeps the series of this pod's GPUs.

It is coarser than NVML: dcgm-exporter refreshes every few seconds (30 s by
default) and ``DCGM_FI_DEV_POWER_USAGE`` is a running average, so the energy
counter (``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION``, mJ) carries the totals and
power gives only the rough shape. It needs no GPU access at all.

The ``gpu`` label of the GpuInfo is dcgm-exporter's own ``gpu`` label: the
node's GPU index, not an index inside any container.
"""

from __future__ import annotations

import math
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import structlog
from prometheus_client.parser import text_string_to_metric_families

from sidecar.power.base import (
    GpuInfo,
    PowerSample,
    PowerSourceError,
    PowerSourcePending,
    ReadError,
)

__all__ = ["DcgmSource"]

_log = structlog.get_logger(__name__)

POWER_METRIC = "DCGM_FI_DEV_POWER_USAGE"  # W, running average
ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"  # mJ since boot
_MJ_PER_J = 1000.0
# dcgm-exporter's Kubernetes labels; releases before 2.0 spelt them pod_name, pod_namespace.
_POD_LABELS = ("pod", "pod_name")
_NAMESPACE_LABELS = ("namespace", "pod_namespace")

Fetch = Callable[[str], str]


@dataclass(slots=True)
class _GpuSeries:
    """Everything one scrape says about one physical GPU."""

    info: GpuInfo
    owners: set[tuple[str, str]] = field(default_factory=set)  # (namespace, pod)
    power_w: float | None = None
    energy_mj: float | None = None


class DcgmSource:
    """A :class:`~sidecar.power.base.PowerSource` over a dcgm-exporter ``/metrics`` page.

    GPUs are chosen at open, by explicit ``gpus`` (UUIDs or the exporter's
    ``gpu`` index) when given, else by this pod's ``pod`` and ``namespace``
    (the caller reads them from the downward API), else the node's only GPU.
    ``fetch`` returns the page's text for a URL and raises ``OSError`` on
    failure; the default is a blocking ``urllib`` GET with ``timeout_s``.
    """

    def __init__(
        self,
        url: str,
        *,
        pod: str | None,
        namespace: str | None,
        gpus: Sequence[str] | None,
        clock: Callable[[], float] = time.monotonic,
        fetch: Fetch | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self._url = _metrics_url(url)
        self._pod = pod or None
        self._namespace = namespace or None
        self._selectors = tuple(gpus) if gpus else None
        self._clock = clock
        self._fetch: Fetch = fetch if fetch is not None else _UrllibFetch(timeout_s)
        self._gpus: list[GpuInfo] = []  # the metered GPUs: --gpus order, else the exporter's
        self._failing = False

    @property
    def url(self) -> str:
        """The page scraped: the configured URL, with ``/metrics`` when it named no path."""
        return self._url

    def open(self) -> list[GpuInfo]:
        """Scrape once and choose this pod's GPUs; a failure is one line for the user.

        Raises :class:`PowerSourcePending` while the exporter cannot be reached,
        has no readings yet or does not yet map this pod to a GPU (the kubelet
        tells it some seconds after the pod starts): the caller retries.
        """
        try:
            text = self._fetch(self._url)
        except OSError as e:  # the node's exporter may start after us: wait for it
            raise PowerSourcePending(f"cannot scrape dcgm-exporter at {self._url}: {e}") from e
        try:
            series = _parse(text)
        except ValueError as e:
            raise PowerSourceError(f"dcgm-exporter at {self._url} sent no metrics page: {e}") from e
        if not series:
            raise PowerSourcePending(f"dcgm-exporter at {self._url} reports no {POWER_METRIC} yet")
        chosen = {s.info.uuid: s.info for s in self._choose(series)}  # "0" and its UUID: once
        # --gpus order is kept: --idle-watts may give one value per GPU in that order.
        self._gpus = (
            list(chosen.values())
            if self._selectors is not None
            else sorted(chosen.values(), key=_gpu_order)
        )
        _log.info(
            "power.dcgm.opened",
            url=self._url,
            gpus=[g.gpu for g in self._gpus],
            uuids=[g.uuid for g in self._gpus],
        )
        return list(self._gpus)

    def read(self) -> list[PowerSample | ReadError]:
        """Scrape once: one sample per metered GPU, or ``unknown`` errors if the scrape fails."""
        try:
            series = _parse(self._fetch(self._url))
        except (OSError, ValueError) as e:
            if not self._failing:
                _log.warning("power.dcgm.scrape_failed", url=self._url, error=str(e))
            self._failing = True
            return [ReadError(gpu=g.gpu, reason="unknown") for g in self._gpus]
        if self._failing:
            _log.info("power.dcgm.scrape_recovered", url=self._url)
            self._failing = False
        time_s = self._clock()
        out: list[PowerSample | ReadError] = []
        for gpu in self._gpus:
            found = series.get(gpu.uuid)
            if found is None or found.power_w is None:
                out.append(ReadError(gpu=gpu.gpu, reason="unknown"))
                continue
            energy_j = None if found.energy_mj is None else found.energy_mj / _MJ_PER_J
            out.append(PowerSample(time_s, gpu.gpu, found.power_w, energy_j))
        return out

    def close(self) -> None:
        """Nothing is held between scrapes; forget the GPUs so a stray read yields nothing."""
        self._gpus = []

    def _choose(self, series: dict[str, _GpuSeries]) -> list[_GpuSeries]:
        if self._selectors is not None:
            return [self._by_selector(series, s) for s in self._selectors]
        if self._pod is not None:
            mine = [
                s
                for s in series.values()
                if any(
                    pod == self._pod and self._namespace in (None, namespace)
                    for namespace, pod in s.owners
                )
            ]
            if not mine:
                pods = sorted({f"{ns}/{pod}" for s in series.values() for ns, pod in s.owners})
                wanted = self._pod if self._namespace is None else f"{self._namespace}/{self._pod}"
                seen = ", ".join(pods) if pods else "none (is DCGM_EXPORTER_KUBERNETES=true set?)"
                raise PowerSourcePending(
                    f"pod {wanted} holds no GPU in dcgm-exporter at {self._url} yet; pods seen: {seen}"
                )
            return mine
        if len(series) == 1:
            return list(series.values())
        raise PowerSourceError(
            f"dcgm-exporter at {self._url} reports {len(series)} GPUs: set POD_NAME and "
            "POD_NAMESPACE from the downward API, or pass --gpus with the model's GPU UUIDs"
        )

    def _by_selector(self, series: dict[str, _GpuSeries], selector: str) -> _GpuSeries:
        for s in series.values():
            if selector in (s.info.uuid, s.info.gpu):
                return s
        seen = ", ".join(f"{s.info.gpu}={s.info.uuid}" for s in series.values())
        raise PowerSourceError(
            f"GPU {selector} not found in dcgm-exporter at {self._url}; GPUs seen: {seen}"
        )


class _UrllibFetch:
    """The default fetch: a plain blocking GET, bounded by a timeout."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    def __call__(self, url: str) -> str:
        request = urllib.request.Request(url, headers={"Accept": "text/plain"})
        with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
            body: bytes = response.read()
        return body.decode("utf-8")


def _metrics_url(url: str) -> str:
    """Check the scheme once, and default an empty path to ``/metrics``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PowerSourceError(f"dcgm power source needs an http(s) URL, got {url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


def _parse(text: str) -> dict[str, _GpuSeries]:
    """The power and energy of every GPU on the page, by UUID.

    MIG and time-sliced GPUs appear once per slice or pod with the same UUID;
    their power is the physical GPU's, so they merge into one entry that
    remembers every pod holding it. A series with a ``GPU_I_ID`` (a MIG
    instance) marks its GPU as MIG.
    """
    gpus: dict[str, _GpuSeries] = {}
    for family in text_string_to_metric_families(text):
        # Match the family: the parser renames a counter's samples to <name>_total.
        if family.name not in (POWER_METRIC, ENERGY_METRIC):
            continue
        for sample in family.samples:
            labels = sample.labels
            uuid = labels.get("UUID")
            if not uuid or math.isnan(sample.value):
                continue
            entry = gpus.get(uuid)
            if entry is None:
                info = GpuInfo(
                    gpu=labels.get("gpu", uuid), uuid=uuid, name=labels.get("modelName", "")
                )
                entry = gpus[uuid] = _GpuSeries(info)
            if labels.get("GPU_I_ID") and not entry.info.mig:  # a MIG instance's series
                entry.info = replace(entry.info, mig=True)
            pod = _first(labels, _POD_LABELS)
            if pod:
                entry.owners.add((_first(labels, _NAMESPACE_LABELS), pod))
            if family.name == POWER_METRIC:
                entry.power_w = sample.value
            else:
                entry.energy_mj = sample.value
    return gpus


def _first(labels: dict[str, str], names: Sequence[str]) -> str:
    for name in names:
        if labels.get(name):
            return labels[name]
    return ""


def _gpu_order(info: GpuInfo) -> tuple[int, str]:
    return (int(info.gpu), info.uuid) if info.gpu.isdigit() else (1 << 30, info.gpu)
