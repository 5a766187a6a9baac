"""NvmlSource under lasting faults: hung calls, lost GPUs, driver reloads, re-init backoff."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from fake_pynvml import FakeGpu, FakeNvml

from sidecar.power.backoff import Backoff
from sidecar.power.base import GpuInfo, PowerSample, ReadError
from sidecar.power.nvml import NvmlSource
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


class TestHungCalls:
    def test_a_hung_gpu_does_not_stall_the_others(self) -> None:
        """GPU 0 blocks inside NVML: GPU 1 still gives a sample, GPU 0 a `timeout` error."""
        gate = threading.Event()
        nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
        clock = Clock()
        source = make(nvml, clock)
        source.open()
        nvml.gpus[0].gate = gate
        try:
            clock.now_s += 0.1
            assert by_gpu(source.read()) == {"0": ["timeout"], "1": ["sample"]}
        finally:
            gate.set()
            source.close()

    def test_no_call_is_queued_behind_a_hung_one(self) -> None:
        """While GPU 0's call hangs, later polls skip it; once it returns, it is read again."""
        gate = threading.Event()
        nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
        clock = Clock()
        source = make(nvml, clock, reinit_after=1000)
        source.open()
        nvml.gpus[0].gate = gate
        before = nvml.gpus[0].device_calls
        for _ in range(4):
            clock.now_s += 0.1
            assert by_gpu(source.read())["0"] == ["timeout"]
        assert nvml.gpus[0].device_calls == before + 1  # the one hung call, nothing behind it
        nvml.gpus[0].gate = None
        gate.set()
        wait_until(lambda: nvml.gpus[0].device_calls >= before + 2)  # the hung read finishes
        clock.now_s += 0.1
        wait_until(lambda: by_gpu(source.read())["0"] == ["sample"])
        source.close()

    def test_no_reinit_while_a_call_is_inside_the_driver(self) -> None:
        """A hung GPU counts as failing, but NVML is never shut down under a running call."""
        gate = threading.Event()
        nvml = FakeNvml([FakeGpu(UUID0)])
        clock = Clock()
        source = make(nvml, clock, reinit_after=2)
        source.open()
        nvml.gpus[0].gate = gate
        try:
            for _ in range(6):
                clock.now_s += 1.0
                source.read()
            assert nvml.shutdown_count == 0
        finally:
            gate.set()
            source.close()

    def test_timeouts_are_counted_by_the_sampler(self) -> None:
        """The sampler books a hung read under sampler_errors reason `timeout`."""
        gate = threading.Event()
        nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
        clock = Clock()
        source = make(nvml, clock, reinit_after=1000)
        gpus = source.open()
        nvml.gpus[1].gate = gate
        sampler = Sampler(source, gpus, hz=10, sink=lambda s: None, clock=clock)
        try:
            for _ in range(3):
                clock.now_s += 0.1
                sampler.ingest(source.read())
            assert sampler.stats.errors[("1", "timeout")] == 3
            assert sampler.stats.samples["0"] == 3
        finally:
            gate.set()
            source.close()
            sampler.close()


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
