"""NvmlSource under lasting faults: hung calls, lost GPUs, driver reloads, re-init backoff."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest
from fake_pynvml import FakeGpu, FakeNvml

from sidecar.power.backoff import Backoff
from sidecar.power.base import GpuInfo, PowerSample, ReadError
from sidecar.power.deadline import read_deadline_s
from sidecar.power.nvml import NvmlSource
from sidecar.power.share import SharedSource
from sidecar.reconcile import Reconciler
from sidecar.sampler import Sampler

UUID0 = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
UUID1 = "GPU-9f8e7d6c-0000-1111-2222-333344445555"


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def make(
    nvml: FakeNvml, clock: Clock, *, reinit_after: int = 3, timeout_s: float = 0.05
) -> NvmlSource:
    return NvmlSource(
        None,
        clock=clock,
        wall_clock=lambda: 1.7e9 + clock.now_s,
        nvml=nvml,
        env={},
        read_timeout_s=timeout_s,
        reinit_after=reinit_after,
        backoff=Backoff(base_s=1.0, cap_s=8.0, clock=clock, rand=lambda: 0.0),
    )


def by_gpu(readings: Sequence[PowerSample | ReadError]) -> dict[str, list[str]]:
    """Per GPU, what each reading was: 'sample' or the error reason."""
    out: dict[str, list[str]] = {}
    for r in readings:
        out.setdefault(r.gpu, []).append("sample" if isinstance(r, PowerSample) else r.reason)
    return out


def wait_until(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


class Stuck:
    """A read on its own thread that hangs inside the driver until the test lets it go."""

    def __init__(self, source: NvmlSource, gpu: FakeGpu) -> None:
        self.gate = threading.Event()
        self.result: list[PowerSample | ReadError] | None = None
        gpu.gate = self.gate
        before = gpu.device_calls
        self._thread = threading.Thread(target=self._read, args=(source,), daemon=True)
        self._thread.start()
        wait_until(lambda: gpu.device_calls == before + 1)  # inside the call, blocked
        self._gpu = gpu

    def _read(self, source: NvmlSource) -> None:
        self.result = source.read()

    def release(self) -> list[PowerSample | ReadError] | None:
        self._gpu.gate = None
        self.gate.set()
        self._thread.join(timeout=5.0)
        return self.result


class TestHungCalls:
    def test_a_hung_gpu_does_not_stall_the_others(self) -> None:
        """GPU 0 blocks inside NVML: a read beside it gives GPU 1's sample and GPU 0 `timeout`."""
        nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
        clock = Clock()
        source = make(nvml, clock)
        source.open()
        stuck = Stuck(source, nvml.gpus[0])
        try:
            clock.now_s += 0.1
            assert by_gpu(source.read()) == {"0": ["timeout"], "1": ["sample"]}
        finally:
            stale = stuck.release()
            source.close()
        assert stale == []  # the stuck read returned after another ran: stale, nothing given

    def test_no_call_is_queued_behind_a_hung_one(self) -> None:
        """While GPU 0's call hangs, later polls skip it; once it returns, it is read again."""
        nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
        clock = Clock()
        source = make(nvml, clock, reinit_after=1000)
        source.open()
        before = nvml.gpus[0].device_calls
        stuck = Stuck(source, nvml.gpus[0])
        for _ in range(4):
            clock.now_s += 0.1
            assert by_gpu(source.read()) == {"0": ["timeout"], "1": ["sample"]}
        assert nvml.gpus[0].device_calls == before + 1  # the one hung call, nothing behind it
        stuck.release()
        clock.now_s += 0.1
        assert by_gpu(source.read()) == {"0": ["sample"], "1": ["sample"]}
        source.close()

    def test_no_reinit_while_a_call_is_inside_the_driver(self) -> None:
        """A hung GPU counts as failing, but NVML is never shut down under a running call."""
        nvml = FakeNvml([FakeGpu(UUID0)])
        clock = Clock()
        source = make(nvml, clock, reinit_after=2)
        source.open()
        stuck = Stuck(source, nvml.gpus[0])
        try:
            for _ in range(6):
                clock.now_s += 1.0
                assert by_gpu(source.read()) == {"0": ["timeout"]}
            assert nvml.shutdown_count == 0
        finally:
            stuck.release()
            source.close()

    def test_timeouts_are_counted_by_the_sampler(self) -> None:
        """The sampler books a hung GPU's reads under sampler_errors reason `timeout`."""
        nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
        clock = Clock()
        source = make(nvml, clock, reinit_after=1000)
        gpus = source.open()
        sampler = Sampler(source, gpus, hz=10, sink=lambda s: None, clock=clock)
        stuck = Stuck(source, nvml.gpus[1])
        try:
            for _ in range(3):
                clock.now_s += 0.1
                sampler.ingest(source.read())
            assert sampler.stats.errors[("1", "timeout")] == 3
            assert sampler.stats.samples["0"] == 3
        finally:
            stuck.release()
            source.close()
            sampler.close()

    def test_the_read_deadline_reaches_the_sampler_through_a_share(self) -> None:
        """NVML's per-GPU deadline is what the sampler abandons a stuck read at, --gpu-share too."""
        source = make(FakeNvml([FakeGpu(UUID0)]), Clock(), timeout_s=0.25)
        assert read_deadline_s(source) == 0.25
        assert read_deadline_s(SharedSource(source, 0.5)) == 0.25
        assert read_deadline_s(object()) is None


async def test_the_sampler_keeps_the_other_gpus_at_rate_while_one_hangs() -> None:
    """Through the real sampler: GPU 1 hangs in NVML; its read is abandoned at the deadline,
    GPU 0 keeps coming at the sampling rate, GPU 1 counts `timeout` with one call stuck and
    none stacked, and reads again once the call returns."""
    nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
    source = NvmlSource(None, nvml=nvml, env={}, read_timeout_s=0.05, reinit_after=10_000)
    gpus = source.open()
    sampler = Sampler(source, gpus, hz=50, sink=lambda s: None)
    task = asyncio.create_task(sampler.run())
    gate = threading.Event()
    hung = nvml.gpus[1]

    async def until(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10.0
        while not predicate():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    try:
        await until(lambda: sampler.stats.samples["1"] >= 3, "no samples before the hang")
        hung.gate = gate
        before = hung.device_calls
        await until(lambda: hung.device_calls > before, "GPU 1 never called")
        samples_0 = sampler.stats.samples["0"]
        await until(lambda: sampler.stats.errors.get(("1", "timeout"), 0) >= 10, "no timeouts")
        assert sampler.stats.samples["0"] >= samples_0 + 10  # GPU 0 read all along
        assert hung.device_calls == before + 1  # one call stuck, nothing queued behind it
        assert ("0", "timeout") not in sampler.stats.errors
        threads = [t for t in threading.enumerate() if t.name == "power-source"]
        assert len(threads) == 2  # the stuck read's thread and the one that went on
        hung.gate = None
        gate.set()
        samples_1 = sampler.stats.samples["1"]
        await until(lambda: sampler.stats.samples["1"] > samples_1 + 3, "GPU 1 did not resume")
    finally:
        gate.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        source.close()


class TestReinit:
    def test_lost_gpu_is_reresolved_by_uuid_after_repeated_failures(self) -> None:
        """A GPU lost for `reinit_after` reads triggers shutdown, init and lookup by UUID."""
        nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
        clock = Clock()
        source = make(nvml, clock, reinit_after=3)
        source.open()
        nvml.gpus[1].lost = True
        for _ in range(3):
            clock.now_s += 0.1
            assert by_gpu(source.read())["1"] == ["gpu_lost"]
        assert nvml.shutdown_count == 0
        nvml.gpus[1].lost = False  # back on the bus, but the old handle is gone with the state
        nvml.generation += 1  # a recovered GPU needs fresh handles
        clock.now_s += 0.1
        readings = by_gpu(source.read())
        assert nvml.shutdown_count == 1
        assert nvml.init_count == 2
        assert readings == {"0": ["sample"], "1": ["sample"]}  # labels kept across the re-init
        assert source.reinits == 1

    def test_failed_reinit_backs_off_without_a_busy_loop(self) -> None:
        """While NVML will not start again, attempts come at 0.5, 1, 2 s... not at every read."""
        nvml = FakeNvml([FakeGpu(UUID0)])
        clock = Clock()
        source = make(nvml, clock, reinit_after=1)
        source.open()
        nvml.gpus[0].lost = True
        nvml.init_error = pynvml_error()
        clock.now_s += 0.125
        source.read()  # one failed read
        attempts: list[float] = []
        for _ in range(40):  # 5 s of polls at 8 Hz (steps exact in binary)
            before = nvml.calls.count("nvmlInit")
            clock.now_s += 0.125
            source.read()
            if nvml.calls.count("nvmlInit") > before:
                attempts.append(clock.now_s - 100.0)
        # rand() == 0: delays of half the ceiling, 0.5, 1, 2 s after each failure
        assert attempts == [0.25, 0.75, 1.75, 3.75]
        nvml.init_error = None
        nvml.gpus[0].lost = False
        clock.now_s += 8.0
        assert by_gpu(source.read()) == {"0": ["sample"]}
        assert source.reinits == 1

    @pytest.mark.parametrize(("reinit_after", "backwards"), [(2, True), (10, False)])
    def test_driver_reload_restarts_the_counter_and_the_reconciler_carries_on(
        self, monkeypatch: pytest.MonkeyPatch, reinit_after: int, backwards: bool
    ) -> None:
        """A reload makes handles stale; after the re-init the counter restarts. Within three
        periods the reconciler's backwards-counter branch takes it; after a longer silence the
        gap rule restarts the window first. Either way the reconciled power is right again."""
        seen: list[float] = []
        push = Reconciler.push

        def spy(self: Reconciler, sample: PowerSample) -> list[PowerSample]:
            before_j = None if self._anchor is None else self._anchor.energy_j
            last_in, gap_s = self._last_in_s, self._gap_after_s
            is_gap = None not in (last_in, gap_s) and sample.time_s - last_in > gap_s  # type: ignore[operator]
            now_j = sample.energy_j
            backwards = before_j is not None and now_j is not None and now_j < before_j
            if backwards and not is_gap:  # the branch for a counter that went backwards
                seen.append(sample.time_s)
            return push(self, sample)

        monkeypatch.setattr(Reconciler, "push", spy)
        gpu = FakeGpu(UUID0, instant_mw=100_000, energy_mj=50_000_000)
        nvml = FakeNvml([gpu])
        clock = Clock()
        source = make(nvml, clock, reinit_after=reinit_after)
        gpus = source.open()
        out: list[PowerSample] = []
        sampler = Sampler(source, gpus, hz=10, sink=out.extend, clock=clock)

        def poll(n: int) -> None:
            for _ in range(n):
                clock.now_s += 0.1
                if gpu.energy_mj is not None:
                    gpu.energy_mj += 20_000  # 200 W true draw; the instant field says 100 W
                sampler.ingest(source.read())

        poll(30)
        nvml.reload_driver(energy_mj=1_000)
        poll(reinit_after)  # stale handles: gpu_lost on each, then the re-init
        assert sampler.stats.errors[("0", "gpu_lost")] == reinit_after
        poll(40)
        assert source.reinits == 1
        assert bool(seen) is backwards
        after = [s for s in out if s.time_s > 104.5]
        assert after, "samples flow again after the re-init"
        assert [s.power_w for s in after[-10:]] == pytest.approx([200.0] * 10, rel=0.02)
        assert all(s.power_w >= 0 for s in out)
        sampler.close()
        source.close()


def pynvml_error() -> Exception:
    import pynvml

    error: Exception = pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    return error


def test_gpu_info_carries_mig() -> None:
    """GpuInfo from NVML says whether the GPU is in MIG mode (for llm_energy_gpu_info)."""
    import pynvml

    nvml = FakeNvml([FakeGpu(UUID0, mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE), FakeGpu(UUID1)])
    (a, b) = make(nvml, Clock()).open()
    assert (a.mig, b.mig) == (True, False)
    assert isinstance(a, GpuInfo)
