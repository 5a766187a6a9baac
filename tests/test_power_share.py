"""--gpu-share: a shared board is booked by fraction, and MIG refuses to start without one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pynvml
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fake_pynvml import FakeGpu, FakeNvml
from test_power_dcgm import Exporter, Gpu

import sidecar.app as app_module
from sidecar.app import StartupError, _started
from sidecar.config import Settings
from sidecar.power.base import GpuInfo, PowerSample, ReadError
from sidecar.power.dcgm import DcgmSource
from sidecar.power.nvml import NvmlSource
from sidecar.power.share import GpuShareRequired, SharedSource, require_share

UUID0 = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


class Fixed:
    """A source with one reading and one error per read."""

    def open(self) -> list[GpuInfo]:
        return [GpuInfo("0", "GPU-x", "fake")]

    def read(self) -> list[PowerSample | ReadError]:
        return [PowerSample(1.0, "0", 300.0, 9_000.0), ReadError("1", "gpu_lost")]

    def close(self) -> None:
        return None


def test_share_scales_power_and_energy_alike() -> None:
    """A 0.25 share books a quarter of the watts and of the counter; errors pass unchanged."""
    sample, error = SharedSource(Fixed(), 0.25).read()
    assert sample == PowerSample(1.0, "0", 75.0, 2_250.0)
    assert error == ReadError("1", "gpu_lost")


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_share_outside_zero_one_is_refused(share: float) -> None:
    """A share is a fraction of one board: (0, 1]."""
    with pytest.raises(ValueError, match="share"):
        SharedSource(Fixed(), share)


def test_mig_without_share_is_refused() -> None:
    """A MIG GPU without --gpu-share is refused: its power covers every slice on the board."""
    gpus = [GpuInfo("0", UUID0, "H100", mig=True)]
    with pytest.raises(GpuShareRequired, match="MIG"):
        require_share(gpus, None)
    require_share(gpus, 3 / 7)  # given: accepted
    require_share([GpuInfo("0", UUID0, "H100")], None)  # no MIG: nothing to say


def test_dcgm_mig_instance_marks_the_gpu() -> None:
    """dcgm-exporter series with GPU_I_ID (a MIG instance) mark their GPU as MIG."""
    from test_power_dcgm import exposition

    text = exposition([Gpu(0, UUID0, 100.0, 1000, pod="vllm-0", mig_instance=1)])
    source = DcgmSource(
        "http://x/metrics", pod="vllm-0", namespace="llm", gpus=None, fetch=lambda url: text
    )
    (info,) = source.open()
    assert info.mig


async def test_sidecar_refuses_mig_without_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up on a MIG GPU without --gpu-share is a start-up error naming --gpu-share."""
    nvml = FakeNvml([FakeGpu(UUID0, mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE)])
    monkeypatch.setattr(
        app_module, "build_source", lambda *a, **k: NvmlSource(None, nvml=nvml, env={})
    )
    with pytest.raises(StartupError, match=r"^--gpu-share: .*MIG"):
        await _started(Settings.without_env(upstream="http://127.0.0.1:9"))
    assert nvml.init_count == nvml.shutdown_count  # the failed start released NVML


async def test_sidecar_books_its_share(aiohttp_server: ServerFactory) -> None:
    """With --gpu-share 0.5 the sidecar's power and energy are half the board's."""
    exporter = Exporter(gpus=[Gpu(0, UUID0, 400.0, 1_000_000, pod="vllm-0")])
    server = await aiohttp_server(exporter.app())
    settings = Settings.without_env(
        upstream="http://127.0.0.1:9",
        power_source=f"dcgm:{server.make_url('/metrics')}",
        gpu_share=0.5,
    )
    sidecar = await _started(settings)
    try:
        assert sidecar.source is not None
        (sample,) = await asyncio.to_thread(sidecar.source.read)  # the exporter runs on this loop
        assert isinstance(sample, PowerSample)
        assert (sample.power_w, sample.energy_j) == (200.0, 500.0)
    finally:
        await sidecar.stop()
