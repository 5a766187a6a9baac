"""DcgmSource against a local server speaking dcgm-exporter's text format."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from sidecar.power.base import (
    GpuInfo,
    PowerSample,
    PowerSourceError,
    PowerSourcePending,
    ReadError,
)
from sidecar.power.dcgm import DcgmSource

H100 = "NVIDIA H100 80GB HBM3"
NODE = "gpu-node-7"
DRIVER = "550.90.07"


@dataclass
class Gpu:
    """One GPU row of the exporter's page, with the pod that holds it (if any)."""

    index: int
    uuid: str
    power_w: float
    energy_mj: int
    pod: str | None = None
    namespace: str = "llm"
    container: str = "vllm"
    mig_instance: int | None = None

    def labels(self) -> str:
        parts = [
            f'gpu="{self.index}"',
            f'UUID="{self.uuid}"',
            f'pci_bus_id="00000000:{0x18 + self.index:02X}:00.0"',
            f'device="nvidia{self.index}"',
            f'modelName="{H100}"',
        ]
        if self.mig_instance is not None:
            parts += ['GPU_I_PROFILE="3g.40gb"', f'GPU_I_ID="{self.mig_instance}"']
        parts += [f'Hostname="{NODE}"', f'DCGM_FI_DRIVER_VERSION="{DRIVER}"']
        if self.pod is not None:
            parts += [
                f'container="{self.container}"',
                f'namespace="{self.namespace}"',
                f'pod="{self.pod}"',
            ]
        return ",".join(parts)


def exposition(gpus: list[Gpu], *, energy: bool = True) -> str:
    """dcgm-exporter's page: HELP and TYPE lines, neighbouring metrics, values as it prints them."""
    lines = [
        "# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).",
        "# TYPE DCGM_FI_DEV_SM_CLOCK gauge",
        *(f"DCGM_FI_DEV_SM_CLOCK{{{g.labels()}}} 1980" for g in gpus),
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).",
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge",
        *(f"DCGM_FI_DEV_POWER_USAGE{{{g.labels()}}} {g.power_w:.6f}" for g in gpus),
    ]
    if energy:
        lines += [
            "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).",
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
            *(f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{g.labels()}}} {g.energy_mj}" for g in gpus),
        ]
    lines += [
        "# HELP DCGM_FI_DEV_PCIE_REPLAY_COUNTER Total number of PCIe retries.",
        "# TYPE DCGM_FI_DEV_PCIE_REPLAY_COUNTER counter",
        *(f"DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{g.labels()}}} 0" for g in gpus),
    ]
    return "\n".join(lines) + "\n"


def node() -> list[Gpu]:
    """Four GPUs on one node: two for our pod, one for another tenant, one free."""
    return [
        Gpu(0, "GPU-00000000-aaaa-bbbb-cccc-000000000000", 71.25, 123_456_789, pod="other-0"),
        Gpu(1, "GPU-11111111-aaaa-bbbb-cccc-111111111111", 312.5, 98_765_432_101, pod="vllm-0"),
        Gpu(2, "GPU-22222222-aaaa-bbbb-cccc-222222222222", 305.0, 45_678_901_234, pod="vllm-0"),
        Gpu(3, "GPU-33333333-aaaa-bbbb-cccc-333333333333", 60.0, 4_567_890_123),
    ]


@dataclass
class Exporter:
    """What the fake exporter serves; tests change it between scrapes."""

    gpus: list[Gpu] = field(default_factory=node)
    status: int = 200
    energy: bool = True
    url: str = ""
    server: TestServer | None = None

    def app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.StreamResponse:
            if self.status != 200:
                return web.Response(status=self.status, text="collector failed")
            body = exposition(self.gpus, energy=self.energy)
            return web.Response(text=body, content_type="text/plain", charset="utf-8")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app


@pytest.fixture
async def exporter(aiohttp_server: AiohttpServer) -> Exporter:
    state = Exporter()
    state.server = await aiohttp_server(state.app())
    state.url = str(state.server.make_url("/metrics"))
    return state


def source(
    url: str,
    *,
    pod: str | None = "vllm-0",
    namespace: str | None = "llm",
    gpus: list[str] | None = None,
    now_s: float = 42.0,
) -> DcgmSource:
    return DcgmSource(url, pod=pod, namespace=namespace, gpus=gpus, clock=lambda: now_s)


class TestOpen:
    async def test_picks_this_pods_gpus(self, exporter: Exporter) -> None:
        """Only the GPUs labelled with our pod and namespace are metered, labels read once."""
        infos = await asyncio.to_thread(source(exporter.url).open)
        assert infos == [
            GpuInfo("1", "GPU-11111111-aaaa-bbbb-cccc-111111111111", H100),
            GpuInfo("2", "GPU-22222222-aaaa-bbbb-cccc-222222222222", H100),
        ]

    async def test_namespace_disambiguates(self, exporter: Exporter) -> None:
        """A pod of the same name in another namespace is not ours."""
        exporter.gpus[0].pod, exporter.gpus[0].namespace = "vllm-0", "staging"
        infos = await asyncio.to_thread(source(exporter.url).open)
        assert [g.gpu for g in infos] == ["1", "2"]
        staging = await asyncio.to_thread(source(exporter.url, namespace="staging").open)
        assert [g.gpu for g in staging] == ["0"]

    async def test_missing_pod_names_pod_and_pods_seen(self, exporter: Exporter) -> None:
        """An unknown pod fails open with one line naming it and listing the pods seen."""
        with pytest.raises(PowerSourceError) as raised:
            await asyncio.to_thread(source(exporter.url, pod="vllm-9").open)
        message = str(raised.value)
        assert "llm/vllm-9" in message
        assert "llm/other-0" in message
        assert "llm/vllm-0" in message
        assert "\n" not in message

    async def test_explicit_gpus_by_uuid_or_index(self, exporter: Exporter) -> None:
        """Explicit GPUs (UUID or the exporter's index) override the pod match, in --gpus order."""
        uuid3 = "GPU-33333333-aaaa-bbbb-cccc-333333333333"
        infos = await asyncio.to_thread(source(exporter.url, gpus=[uuid3, "0", "3"]).open)
        assert [(g.gpu, g.uuid) for g in infos] == [
            ("3", uuid3),
            ("0", "GPU-00000000-aaaa-bbbb-cccc-000000000000"),
        ]

    async def test_unknown_explicit_gpu(self, exporter: Exporter) -> None:
        """An explicit GPU the exporter does not report fails open with the GPUs seen."""
        with pytest.raises(PowerSourceError, match=r"GPU 9 not found.*3=GPU-3333"):
            await asyncio.to_thread(source(exporter.url, gpus=["9"]).open)

    async def test_no_selection_on_a_shared_node_refuses(self, exporter: Exporter) -> None:
        """With several GPUs and neither pod nor GPUs, the source refuses to meter the node."""
        with pytest.raises(PowerSourceError, match="POD_NAME"):
            await asyncio.to_thread(source(exporter.url, pod=None, namespace=None).open)

    async def test_single_gpu_node_needs_no_selection(self, exporter: Exporter) -> None:
        """A node with one GPU is metered without a pod, as there is nothing to confuse."""
        exporter.gpus = exporter.gpus[3:]
        infos = await asyncio.to_thread(source(exporter.url, pod=None, namespace=None).open)
        assert [g.gpu for g in infos] == ["3"]

    async def test_mig_slices_merge_into_the_physical_gpu(self, exporter: Exporter) -> None:
        """MIG series share their GPU's UUID and power: the GPU is metered once."""
        uuid = "GPU-44444444-aaaa-bbbb-cccc-444444444444"
        exporter.gpus = [
            Gpu(4, uuid, 250.0, 10**10, pod="vllm-0", mig_instance=1),
            Gpu(4, uuid, 250.0, 10**10, pod="vllm-0", mig_instance=2),
        ]
        infos = await asyncio.to_thread(source(exporter.url).open)
        assert [g.uuid for g in infos] == [uuid]
        assert all(g.mig for g in infos)  # GPU_I_ID: a MIG instance, the board is shared

    async def test_pod_not_mapped_yet_is_pending(self, exporter: Exporter) -> None:
        """Before the kubelet maps the pod, open is pending (retried), and succeeds once mapped."""
        exporter.gpus = [g for g in node() if g.pod != "vllm-0"]
        dcgm = source(exporter.url)
        with pytest.raises(PowerSourcePending, match="holds no GPU"):
            await asyncio.to_thread(dcgm.open)
        exporter.gpus = node()
        assert [g.gpu for g in await asyncio.to_thread(dcgm.open)] == ["1", "2"]

    async def test_unreachable_or_empty_exporter_is_pending(self, exporter: Exporter) -> None:
        """An exporter not up yet, or with no readings yet, is waited for; a broken page is not."""
        with pytest.raises(PowerSourcePending, match="cannot scrape"):
            await asyncio.to_thread(source("http://127.0.0.1:9/metrics").open)
        exporter.gpus = []
        with pytest.raises(PowerSourcePending, match="reports no"):
            await asyncio.to_thread(source(exporter.url).open)
        garbage = DcgmSource(
            "http://x/metrics",
            pod="p",
            namespace=None,
            gpus=None,
            fetch=lambda url: "{not: metrics",
        )
        with pytest.raises(PowerSourceError) as raised:
            garbage.open()
        assert not isinstance(raised.value, PowerSourcePending)

    async def test_server_error_at_open(self, exporter: Exporter) -> None:
        """A failing exporter at start-up is one PowerSourceError line naming the URL."""
        exporter.status = 500
        with pytest.raises(PowerSourceError, match="cannot scrape dcgm-exporter at http") as raised:
            await asyncio.to_thread(source(exporter.url).open)
        assert "\n" not in str(raised.value)

    async def test_url_without_path_gets_metrics(self, exporter: Exporter) -> None:
        """A bare host:port URL scrapes /metrics, the exporter's path."""
        bare = exporter.url.removesuffix("/metrics")
        dcgm = source(bare)
        assert dcgm.url == exporter.url
        assert len(await asyncio.to_thread(dcgm.open)) == 2

    def test_bad_url_scheme(self) -> None:
        """A URL that is not http(s) is refused at construction with one line."""
        with pytest.raises(PowerSourceError, match="http"):
            source("unix:///var/run/dcgm.sock")


class TestRead:
    async def test_watts_and_joules(self, exporter: Exporter) -> None:
        """Power stays in W and the mJ energy counter becomes J, stamped with the clock."""
        dcgm = source(exporter.url, now_s=1234.5)
        await asyncio.to_thread(dcgm.open)
        readings = await asyncio.to_thread(dcgm.read)
        assert readings == [
            PowerSample(1234.5, "1", 312.5, 98_765_432.101),
            PowerSample(1234.5, "2", 305.0, 45_678_901.234),
        ]

    async def test_energy_missing_leaves_energy_unset(self, exporter: Exporter) -> None:
        """Without the energy counter on the page, samples carry power only."""
        exporter.energy = False
        dcgm = source(exporter.url)
        await asyncio.to_thread(dcgm.open)
        readings = await asyncio.to_thread(dcgm.read)
        assert all(isinstance(r, PowerSample) and r.energy_j is None for r in readings)

    async def test_later_scrape_failure_is_unknown_per_gpu(self, exporter: Exporter) -> None:
        """A scrape that fails after open gives one unknown ReadError per GPU, then recovers."""
        dcgm = source(exporter.url)
        await asyncio.to_thread(dcgm.open)
        exporter.status = 503
        assert await asyncio.to_thread(dcgm.read) == [
            ReadError("1", "unknown"),
            ReadError("2", "unknown"),
        ]
        exporter.status = 200
        readings = await asyncio.to_thread(dcgm.read)
        assert all(isinstance(r, PowerSample) for r in readings)

    async def test_gpu_gone_from_page(self, exporter: Exporter) -> None:
        """A metered GPU missing from a later page is an unknown error; the others still read."""
        dcgm = source(exporter.url)
        await asyncio.to_thread(dcgm.open)
        exporter.gpus = [g for g in exporter.gpus if g.index != 2]
        readings = await asyncio.to_thread(dcgm.read)
        assert readings[1] == ReadError("2", "unknown")
        assert isinstance(readings[0], PowerSample)
        assert readings[0].gpu == "1"

    async def test_server_down(self, exporter: Exporter) -> None:
        """A connection refused after open is counted per GPU, not raised."""
        dcgm = source(exporter.url)
        await asyncio.to_thread(dcgm.open)
        assert exporter.server is not None
        await exporter.server.close()
        assert await asyncio.to_thread(dcgm.read) == [
            ReadError("1", "unknown"),
            ReadError("2", "unknown"),
        ]

    def test_injected_fetch(self) -> None:
        """A fetch callable replaces HTTP, so the parser runs without a server."""
        pages = [exposition(node())]

        def fetch(url: str) -> str:
            assert url == "http://10.0.0.5:9400/metrics"
            return pages[-1]

        dcgm = DcgmSource(
            "http://10.0.0.5:9400", pod="other-0", namespace="llm", gpus=None, fetch=fetch
        )
        assert [g.gpu for g in dcgm.open()] == ["0"]
        pages.append("not a metrics page {{{")
        assert dcgm.read() == [ReadError("0", "unknown")]

    def test_legacy_pod_labels(self) -> None:
        """Exporters before 2.0 label pods pod_name and pod_namespace; those match too."""
        page = exposition([Gpu(0, "GPU-0", 100.0, 10**9, pod="vllm-0")])
        page = page.replace('namespace="llm"', 'pod_namespace="llm"').replace(
            'pod="vllm-0"', 'pod_name="vllm-0"'
        )
        dcgm = DcgmSource(
            "http://h:1/", pod="vllm-0", namespace="llm", gpus=None, fetch=lambda u: page
        )
        assert [g.uuid for g in dcgm.open()] == ["GPU-0"]

    def test_close_is_idempotent(self) -> None:
        """close() twice is harmless, and a read after close yields nothing."""
        page = exposition(node()[3:])
        dcgm = DcgmSource("http://h:1", pod=None, namespace=None, gpus=None, fetch=lambda u: page)
        dcgm.open()
        dcgm.close()
        dcgm.close()
        assert dcgm.read() == []
