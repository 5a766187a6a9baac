"""The async sampler: off-loop reads, real intervals, per-GPU errors, reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest

from sidecar.power.base import GpuInfo, PowerSample, ReadError
from sidecar.sampler import Sampler

GPUS = [GpuInfo("0", "GPU-a", "fake"), GpuInfo("1", "GPU-b", "fake")]


class ThreadRecordingSource:
    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.t = 0.0
        self.energy = 0.0

    def open(self) -> list[GpuInfo]:
        return GPUS

    def read(self) -> list[PowerSample | ReadError]:
        self.threads.add(threading.get_ident())
        self.t += 0.01  # a read per period at 100 Hz: no silence the reconciler takes for a gap
        self.energy += 2.0  # 200 W for 0.01 s on GPU 0
        return [PowerSample(self.t, "0", 100.0, self.energy), ReadError("1", "gpu_lost")]

    def close(self) -> None:
        return None


async def test_reads_run_off_the_event_loop_and_count_errors() -> None:
    """NVML-style blocking reads never run on the loop thread; a lost GPU is counted, not fatal."""
    source = ThreadRecordingSource()
    got: list[PowerSample] = []
    sampler = Sampler(source, GPUS, hz=100, sink=got.extend)
    task = asyncio.create_task(sampler.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    while sampler.stats.samples["0"] < 150:  # 1.5 s of source time: a reconciled window
        assert loop.time() < deadline, "the sampler did not read"
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert threading.get_ident() not in source.threads
    assert sampler.stats.errors[("1", "gpu_lost")] == sampler.stats.reads
    assert sampler.stats.mean_interval_s is not None
    # reconciled against the counter: 200 W, not the 100 W the readings say
    assert got
    assert max(s.power_w for s in got[5:]) == pytest.approx(200.0, rel=0.05)


def test_rate_is_bounded() -> None:
    """More than 100 Hz is refused."""
    with pytest.raises(ValueError, match="sample rate"):
        Sampler(ThreadRecordingSource(), GPUS, hz=500, sink=lambda s: None)


async def test_a_failing_source_is_counted_and_sampling_goes_on() -> None:
    """An exception out of read() is counted as `unknown` for every GPU; the loop survives."""

    class Broken(ThreadRecordingSource):
        def read(self) -> list[PowerSample | ReadError]:
            raise RuntimeError("driver exploded")

    sampler = Sampler(Broken(), GPUS, hz=50, sink=lambda s: None)
    task = asyncio.create_task(sampler.run())
    await asyncio.sleep(0.2)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sampler.stats.errors[("0", "unknown")] >= 3


@contextlib.asynccontextmanager
async def _running_gated(sampler: Sampler, gate: threading.Event) -> AsyncIterator[None]:
    """``sampler`` running as a task whose source waits on ``gate``; on the way out the gate
    opens (no reader thread stays stuck) and the task is cancelled."""
    task = asyncio.create_task(sampler.run())
    try:
        yield
    finally:
        gate.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _until(ready: Callable[[], bool], deadline: float, what: str) -> None:
    """Wait, polling, until ``ready()``; fail with ``what`` past ``deadline`` (monotonic)."""
    while not ready():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_a_hung_source_is_counted_and_not_stacked() -> None:
    """A read stuck in the source counts `timeout` per GPU per deadline; no read queues behind it."""
    gate = threading.Event()

    class Hanging(ThreadRecordingSource):
        calls = 0

        def read(self) -> list[PowerSample | ReadError]:
            Hanging.calls += 1
            gate.wait()
            return super().read()

    source = Hanging()
    got: list[PowerSample] = []
    sampler = Sampler(source, GPUS, hz=50, sink=got.extend, read_deadline_s=0.05)
    async with _running_gated(sampler, gate):
        deadline = time.monotonic() + 5.0
        await _until(
            lambda: sampler.stats.errors.get(("0", "timeout"), 0) >= 3,
            deadline,
            "no timeouts counted",
        )
        assert Hanging.calls == 1  # the stuck read, nothing stacked behind it
        assert sampler.stats.errors[("1", "timeout")] >= 3
        gate.set()  # the driver comes back: the late read is used, polling resumes
        await _until(lambda: sampler.stats.samples["0"] >= 3, deadline, "sampling did not resume")


async def test_a_reconciled_window_reaches_the_sink_a_reading_per_loop_turn() -> None:
    """The reconciler lets a second of readings go at once; on the loop they go to the sink
    a reading (as many samples as GPUs) per turn, each GPU's in order, so other callbacks (the proxy's
    chunks) run between them; a flush hands over whatever is still queued."""
    gpus = [GpuInfo("0", "GPU-a", "fake"), GpuInfo("1", "GPU-b", "fake")]
    calls: list[list[PowerSample]] = []
    turns: list[int] = []
    turn = 0

    def sink(samples: list[PowerSample]) -> None:
        calls.append(samples)
        turns.append(turn)

    sampler = Sampler(ThreadRecordingSource(), gpus, hz=100, sink=sink)
    energy = 0.0
    for k in range(1, 151):  # 1.5 s at 100 Hz, 100 W on both GPUs: the first window closes
        energy += 1.0
        batch: list[PowerSample | ReadError] = [
            PowerSample(0.01 * k + 0.001 * int(g.gpu), g.gpu, 100.0, energy) for g in gpus
        ]
        sampler.ingest(batch, sliced=True)
    assert not calls  # nothing before the loop turns
    for turn in range(1, 400):
        await asyncio.sleep(0)
        if turn == 50:
            break
    assert len(calls) >= 40
    assert all(len(c) == 2 for c in calls)  # a reading of both GPUs each time
    assert turns == sorted(set(turns))  # one hand-over per turn, never two in one
    sampler.flush()  # shutdown: the rest at once, nothing lost, nothing twice
    for g in ("0", "1"):
        times = [s.time_s for c in calls for s in c if s.gpu == g]
        assert times == sorted(times)  # each GPU's readings in time order
        assert len(times) == len(set(times)) == 150


class CountingSource(ThreadRecordingSource):
    """Counts its reads, and the thread's clock time at each (the handed-over order)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self) -> list[PowerSample | ReadError]:
        self.reads += 1
        return super().read()


@pytest.fixture
def handovers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each hand-over of reads to the loop, as the sampler makes them."""
    sizes: list[int] = []
    on_reads = Sampler._on_reads

    def counting(self: Sampler, poller: object, batch: list[object]) -> None:
        sizes.append(len(batch))
        on_reads(self, poller, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(Sampler, "_on_reads", counting)
    return sizes


async def _sample_for(sampler: Sampler, seconds: float) -> None:
    task = asyncio.create_task(sampler.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_reads_reach_the_loop_together_and_keep_their_own_times(
    handovers: list[int],
) -> None:
    """At 100 Hz the loop is woken about four times a second, not a hundred, and every read
    still counts once, with the interval between reads (not between hand-overs); the reads
    still waiting when the sampler stops are counted too."""
    source = CountingSource()
    sampler = Sampler(source, GPUS, hz=100, sink=lambda s: None)
    await _sample_for(sampler, 1.2)
    assert source.reads >= 60
    assert sampler.stats.reads == source.reads  # none lost, none twice, the last ones included
    assert len(handovers) <= source.reads / 10
    assert max(handovers) >= 15
    assert sampler.stats.mean_interval_s == pytest.approx(0.01, rel=0.5)


async def test_while_a_receipt_waits_every_read_reaches_the_loop_at_once(
    handovers: list[int],
) -> None:
    """:meth:`Sampler.cut_windows` (an energy receipt waits for samples past a time) hands
    every read over as it returns, so the receipt does not wait a hand-over out."""
    source = CountingSource()
    sampler = Sampler(source, GPUS, hz=50, sink=lambda s: None)
    sampler.cut_windows(0.0)
    await _sample_for(sampler, 0.5)
    assert source.reads >= 10
    assert handovers
    assert max(handovers) == 1


async def test_an_abandoned_read_keeps_the_reads_before_it() -> None:
    """A source whose read hangs after a few good ones is abandoned (it allows reads beside a
    stuck call); the good reads still waiting for their hand-over are counted, not dropped."""
    gate = threading.Event()

    class HangsAfterFive(CountingSource):
        read_deadline_s = 0.05

        def read(self) -> list[PowerSample | ReadError]:
            if self.reads >= 5:  # every read from the sixth on hangs, until the end
                gate.wait()
            return super().read()

    source = HangsAfterFive()
    sampler = Sampler(source, GPUS, hz=50, sink=lambda s: None, read_deadline_s=0.05)
    async with _running_gated(sampler, gate):
        await _until(
            lambda: sampler.stats.samples["0"] >= 5,
            time.monotonic() + 3.0,
            "the reads before the hang were lost",
        )
