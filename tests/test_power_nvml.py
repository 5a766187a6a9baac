"""NvmlSource against the fake pynvml: units, clocks, capabilities, selection, failures."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

import pynvml
import pytest
from fake_pynvml import FakeGpu, FakeNvml

from sidecar.power.base import (
    ErrorReason,
    PowerSample,
    PowerSourceError,
    PowerSourcePending,
    ReadError,
)
from sidecar.power.nvml import NvmlSource, running_gpu_processes
from sidecar.power.visibility import gpus_used_by

UUID0 = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
UUID1 = "GPU-9f8e7d6c-0000-1111-2222-333344445555"
UUID2 = "GPU-5a5a5a5a-0000-1111-2222-333344445555"
MIG0 = "MIG-11112222-3333-4444-5555-666677778888"

WALL_AT_OPEN_S = 1_700_000_000.0
WALL_AT_OPEN_US = 1_700_000_000_000_000
MONO_AT_OPEN_S = 100.0


class Clocks:
    """A monotonic and a wall clock that tests move together (or apart, for a step)."""

    def __init__(self) -> None:
        self.mono_s = MONO_AT_OPEN_S
        self.wall_s = WALL_AT_OPEN_S

    def monotonic(self) -> float:
        return self.mono_s

    def wall(self) -> float:
        return self.wall_s

    def advance(self, dt_s: float) -> None:
        self.mono_s += dt_s
        self.wall_s += dt_s


def make_source(
    nvml: FakeNvml,
    clocks: Clocks,
    gpus: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    model_pids: Callable[[], Collection[int]] | None = None,
) -> NvmlSource:
    return NvmlSource(
        gpus,
        clock=clocks.monotonic,
        wall_clock=clocks.wall,
        nvml=nvml,
        env=env or {},
        model_pids=model_pids,
    )


def samples(readings: Sequence[PowerSample | ReadError]) -> list[PowerSample]:
    return [r for r in readings if isinstance(r, PowerSample)]


def errors(readings: Sequence[PowerSample | ReadError]) -> list[ReadError]:
    return [r for r in readings if isinstance(r, ReadError)]


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


class TestUnits:
    def test_power_in_watts_from_milliwatts(self, clocks: Clocks) -> None:
        """The instant field's mW become W, divided by 1000 exactly once."""
        nvml = FakeNvml([FakeGpu(UUID0, instant_mw=123_456)])
        source = make_source(nvml, clocks)
        source.open()
        (sample,) = samples(source.read())
        assert sample.power_w == 123.456

    def test_energy_in_joules_from_millijoules(self, clocks: Clocks) -> None:
        """The energy counter's mJ become J on the sample, at counter sizes seen in the field."""
        nvml = FakeNvml([FakeGpu(UUID0, energy_mj=98_765_432_101)])
        source = make_source(nvml, clocks)
        source.open()
        (sample,) = samples(source.read())
        assert sample.energy_j == 98_765_432.101

    def test_no_energy_counter_leaves_energy_unset(self, clocks: Clocks) -> None:
        """A GPU without the counter gives samples with energy_j None, not zero."""
        nvml = FakeNvml([FakeGpu(UUID0, energy_mj=None)])
        source = make_source(nvml, clocks)
        source.open()
        (sample,) = samples(source.read())
        assert sample.energy_j is None
        assert not source.capabilities["0"].energy_counter

    def test_instant_sample_time_is_the_monotonic_clock(self, clocks: Clocks) -> None:
        """An instant sample is stamped with the sidecar's monotonic clock, not the wall clock."""
        nvml = FakeNvml([FakeGpu(UUID0)])
        source = make_source(nvml, clocks)
        source.open()
        clocks.advance(1.5)
        (sample,) = samples(source.read())
        assert sample.time_s == MONO_AT_OPEN_S + 1.5


class TestPowerCapability:
    def test_instant_field_used_when_supported(self, clocks: Clocks) -> None:
        """With NVML_FI_DEV_POWER_INSTANT supported, the 1 s average is never read."""
        nvml = FakeNvml([FakeGpu(UUID0, instant_mw=250_000, average_mw=180_000)])
        source = make_source(nvml, clocks)
        source.open()
        nvml.calls.clear()
        (sample,) = samples(source.read())
        assert sample.power_w == 250.0
        assert "nvmlDeviceGetPowerUsage" not in nvml.calls
        assert source.capabilities["0"].instant_power

    def test_falls_back_to_power_usage(self, clocks: Clocks) -> None:
        """Where the instant field is unsupported, nvmlDeviceGetPowerUsage (mW) is read instead."""
        nvml = FakeNvml([FakeGpu(UUID0, instant_mw=None, average_mw=180_000)])
        source = make_source(nvml, clocks)
        source.open()
        nvml.calls.clear()
        (sample,) = samples(source.read())
        assert sample.power_w == 180.0
        assert "nvmlDeviceGetFieldValues" not in nvml.calls
        assert not source.capabilities["0"].instant_power

    def test_probed_once_at_open(self, clocks: Clocks) -> None:
        """Capabilities are probed at open only; reads call just what was chosen."""
        nvml = FakeNvml([FakeGpu(UUID0)])
        source = make_source(nvml, clocks)
        source.open()
        nvml.calls.clear()
        source.read()
        source.read()
        assert sorted(set(nvml.calls)) == [
            "nvmlDeviceGetFieldValues",
            "nvmlDeviceGetTotalEnergyConsumption",
        ]

    def test_gpu_without_any_power_reading_fails_open(self, clocks: Clocks) -> None:
        """A GPU that gives neither instant nor average power stops start-up with one line."""
        gpu = FakeGpu(UUID0, instant_mw=None)
        gpu.faults["nvmlDeviceGetPowerUsage"] = pynvml.NVMLError_NotSupported()
        nvml = FakeNvml([gpu])
        with pytest.raises(PowerSourceError, match="gives no power reading") as raised:
            make_source(nvml, clocks).open()
        assert "\n" not in str(raised.value)
        assert nvml.shutdown_count == 1


class TestSampleBuffer:
    def test_buffered_samples_mapped_onto_monotonic_clock(self, clocks: Clocks) -> None:
        """µs wall-clock buffer timestamps land on the monotonic clock at exact offsets."""
        before_open = (WALL_AT_OPEN_US - 250_000, 50_000)
        gpu = FakeGpu(UUID0, buffer=[before_open])
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        assert source.capabilities["0"].sample_buffer
        gpu.buffer = [
            before_open,
            (WALL_AT_OPEN_US + 250_000, 300_000),
            (WALL_AT_OPEN_US + 500_000, 320_500),
            (WALL_AT_OPEN_US + 1_000_000, 310_000),
        ]
        clocks.advance(1.25)
        got = samples(source.read())
        assert [(s.time_s, s.power_w) for s in got] == [
            (100.25, 300.0),
            (100.5, 320.5),
            (101.0, 310.0),
        ]

    def test_energy_attached_to_newest_buffered_sample(self, clocks: Clocks) -> None:
        """Only the newest buffered sample carries the counter, read at the same poll."""
        gpu = FakeGpu(UUID0, buffer=[], energy_mj=2_000_000_500)
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        gpu.buffer = [(WALL_AT_OPEN_US + 250_000, 1_000), (WALL_AT_OPEN_US + 500_000, 2_000)]
        clocks.advance(0.75)
        got = samples(source.read())
        assert [s.energy_j for s in got] == [None, 2_000_000.5]

    def test_only_samples_newer_than_last_seen(self, clocks: Clocks) -> None:
        """A second poll returns only samples the first did not, and asks from the last one."""
        buffer = [(WALL_AT_OPEN_US + 250_000, 1_000)]
        gpu = FakeGpu(UUID0, buffer=buffer)
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        # The probe skipped what was already buffered at open.
        buffer.append((WALL_AT_OPEN_US + 500_000, 2_000))
        clocks.advance(0.5)
        assert [s.time_s for s in samples(source.read())] == [100.5]
        buffer.append((WALL_AT_OPEN_US + 750_000, 3_000))
        clocks.advance(0.5)
        assert [s.time_s for s in samples(source.read())] == [100.75]

    def test_empty_buffer_falls_back_to_one_instant_sample(self, clocks: Clocks) -> None:
        """No new buffered sample (NVML NotFound) gives one instant sample at the monotonic now."""
        gpu = FakeGpu(UUID0, buffer=[], instant_mw=77_000)
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        clocks.advance(0.1)
        (sample,) = samples(source.read())
        assert (sample.time_s, sample.power_w) == (MONO_AT_OPEN_S + 0.1, 77.0)

    def test_samples_never_go_back_in_time(self, clocks: Clocks) -> None:
        """Buffered samples older than an instant sample already handed out are dropped."""
        gpu = FakeGpu(UUID0, buffer=[])
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        clocks.advance(0.5)
        (instant,) = samples(source.read())
        gpu.buffer = [(WALL_AT_OPEN_US + 250_000, 1_000), (WALL_AT_OPEN_US + 750_000, 2_000)]
        clocks.advance(0.5)
        later = samples(source.read())
        assert instant.time_s == 100.5
        assert [s.time_s for s in later] == [100.75]

    def test_only_stale_buffered_samples_fall_back_to_instant(self, clocks: Clocks) -> None:
        """A poll whose new buffered samples are all older than one handed out reads instant power."""
        gpu = FakeGpu(UUID0, buffer=[], instant_mw=66_000)
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        clocks.advance(0.5)
        source.read()
        gpu.buffer = [(WALL_AT_OPEN_US + 250_000, 1_000)]
        clocks.advance(0.5)
        (sample,) = samples(source.read())
        assert (sample.time_s, sample.power_w) == (101.0, 66.0)

    def test_wall_clock_step_reanchors(self, clocks: Clocks) -> None:
        """After a wall-clock step, new buffer samples still land next to the monotonic now."""
        gpu = FakeGpu(UUID0, buffer=[])
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        clocks.wall_s += 3600.0  # an NTP step; the monotonic clock does not move
        clocks.advance(1.0)
        stepped_wall_us = round(clocks.wall_s * 1_000_000)
        gpu.buffer = [(stepped_wall_us - 250_000, 1_000)]
        (sample,) = samples(source.read())
        assert sample.time_s == clocks.mono_s - 0.25

    def test_buffer_value_type_honoured(self, clocks: Clocks) -> None:
        """The sample value is read from the member that sampleValType names."""
        gpu = FakeGpu(UUID0, buffer=[], buffer_value_type=pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        gpu.buffer = [(WALL_AT_OPEN_US + 250_000, 123_000)]
        clocks.advance(0.5)
        # uiVal and ullVal share their low bytes in the union, so the value survives.
        (sample,) = samples(source.read())
        assert sample.power_w == 123.0

    def test_unsupported_buffer_not_polled(self, clocks: Clocks) -> None:
        """A driver without the power buffer is never asked for samples after open."""
        nvml = FakeNvml([FakeGpu(UUID0, buffer=None)])
        source = make_source(nvml, clocks)
        source.open()
        nvml.calls.clear()
        source.read()
        assert "nvmlDeviceGetSamples" not in nvml.calls
        assert not source.capabilities["0"].sample_buffer


class TestReadErrors:
    @pytest.mark.parametrize(
        ("error", "reason"),
        [
            (pynvml.NVMLError_NotSupported(), "not_supported"),
            (pynvml.NVMLError_GpuIsLost(), "gpu_lost"),
            (pynvml.NVMLError_Unknown(), "unknown"),
            (pynvml.NVMLError_Timeout(), "unknown"),
        ],
    )
    def test_reason_by_nvml_error(
        self, clocks: Clocks, error: Exception, reason: ErrorReason
    ) -> None:
        """Each NVML error class maps to its counted reason, and other GPUs keep sampling."""
        bad, good = FakeGpu(UUID0), FakeGpu(UUID1, instant_mw=200_000)
        nvml = FakeNvml([bad, good])
        source = make_source(nvml, clocks, gpus=["0", "1"])
        source.open()
        bad.faults["nvmlDeviceGetFieldValues"] = error
        readings = source.read()
        assert errors(readings) == [ReadError(gpu="0", reason=reason)]
        assert [(s.gpu, s.power_w) for s in samples(readings)] == [("1", 200.0)]

    def test_per_field_failure_is_translated(self, clocks: Clocks) -> None:
        """A field that fails inside a successful call counts by its own nvmlReturn."""
        gpu = FakeGpu(UUID0)
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        gpu.instant_return = pynvml.NVML_ERROR_GPU_IS_LOST
        assert source.read() == [ReadError(gpu="0", reason="gpu_lost")]

    def test_energy_failure_keeps_the_power_sample(self, clocks: Clocks) -> None:
        """A failing energy counter loses the energy, not the power sample, and is counted."""
        gpu = FakeGpu(UUID0, instant_mw=150_000)
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        gpu.faults["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVMLError_Unknown()
        readings = source.read()
        assert samples(readings) == [PowerSample(MONO_AT_OPEN_S, "0", 150.0, None)]
        assert errors(readings) == [ReadError(gpu="0", reason="unknown")]

    def test_gpu_recovers_after_failure(self, clocks: Clocks) -> None:
        """A GPU that failed one read is read again on the next."""
        gpu = FakeGpu(UUID0)
        nvml = FakeNvml([gpu])
        source = make_source(nvml, clocks)
        source.open()
        gpu.faults["nvmlDeviceGetFieldValues"] = pynvml.NVMLError_Unknown()
        assert errors(source.read())
        del gpu.faults["nvmlDeviceGetFieldValues"]
        clocks.advance(0.1)
        assert len(samples(source.read())) == 1


ALL_VISIBLE = {"NVIDIA_VISIBLE_DEVICES": "all"}
"""What a pod that asks the runtime for every GPU of the node sees."""


class TestSelection:
    def gpus(self) -> list[FakeGpu]:
        return [FakeGpu(UUID0), FakeGpu(UUID1, name="NVIDIA A100-SXM4-80GB"), FakeGpu(UUID2)]

    def test_all_visible_by_default(self, clocks: Clocks) -> None:
        """Without --gpus or visibility variables every GPU NVML sees is metered, in index order."""
        infos = make_source(FakeNvml(self.gpus()), clocks).open()
        assert [(g.gpu, g.uuid) for g in infos] == [("0", UUID0), ("1", UUID1), ("2", UUID2)]

    def test_by_index(self, clocks: Clocks) -> None:
        """An index selects that NVML device, with its UUID and name read once."""
        (info,) = make_source(FakeNvml(self.gpus()), clocks, gpus=["1"]).open()
        assert (info.gpu, info.uuid, info.name) == ("1", UUID1, "NVIDIA A100-SXM4-80GB")

    def test_by_uuid(self, clocks: Clocks) -> None:
        """A UUID selects its device through nvmlDeviceGetHandleByUUID; gpu is its index."""
        nvml = FakeNvml(self.gpus())
        infos = make_source(nvml, clocks, gpus=[UUID2, UUID0]).open()
        assert [(g.gpu, g.uuid) for g in infos] == [("2", UUID2), ("0", UUID0)]
        assert "nvmlDeviceGetHandleByUUID" in nvml.calls

    def test_by_uuid_prefix(self, clocks: Clocks) -> None:
        """A unique UUID prefix, as CUDA accepts, selects its device."""
        (info,) = make_source(FakeNvml(self.gpus()), clocks, gpus=["GPU-9f8e"]).open()
        assert info.uuid == UUID1

    def test_same_gpu_twice_metered_once(self, clocks: Clocks) -> None:
        """An index and the same GPU's UUID give one GPU, so nothing is counted twice."""
        infos = make_source(FakeNvml(self.gpus()), clocks, gpus=["0", UUID0]).open()
        assert [g.uuid for g in infos] == [UUID0]

    @pytest.mark.parametrize("selector", ["7", "GPU-ffffffff-0000-0000-0000-000000000000"])
    def test_unknown_gpu_fails_open(self, clocks: Clocks, selector: str) -> None:
        """A GPU NVML does not see stops start-up with a line naming it, and NVML is shut."""
        nvml = FakeNvml(self.gpus())
        with pytest.raises(PowerSourceError, match=selector) as raised:
            make_source(nvml, clocks, gpus=[selector]).open()
        assert "\n" not in str(raised.value)
        assert nvml.shutdown_count == nvml.init_count == 1

    def test_cuda_visible_devices_applied(self, clocks: Clocks) -> None:
        """CUDA_VISIBLE_DEVICES, which NVML ignores, narrows the GPUs when --gpus is absent."""
        env = {"CUDA_VISIBLE_DEVICES": f"{UUID2}"}
        infos = make_source(FakeNvml(self.gpus()), clocks, env=env).open()
        assert [g.uuid for g in infos] == [UUID2]

    def test_whole_node_guard(self, clocks: Clocks) -> None:
        """NVIDIA_VISIBLE_DEVICES=all with several GPUs and no --gpus refuses to start."""
        nvml = FakeNvml(self.gpus())
        env = {"NVIDIA_VISIBLE_DEVICES": "all"}
        with pytest.raises(PowerSourceError, match="--gpus"):
            make_source(nvml, clocks, env=env).open()
        assert nvml.shutdown_count == 1
        infos = make_source(FakeNvml(self.gpus()), clocks, gpus=[UUID1], env=env).open()
        assert [g.uuid for g in infos] == [UUID1]

    def test_shared_process_namespace_discovers_the_model_gpus(self, clocks: Clocks) -> None:
        """With every GPU visible, the GPUs running the model's processes are metered, no others."""
        gpus = self.gpus()
        gpus[2].pids = [4242]
        gpus[0].pids = [999]  # another tenant's process, not in our pod
        source = make_source(FakeNvml(gpus), clocks, env=ALL_VISIBLE, model_pids=lambda: {4242, 7})
        assert [g.uuid for g in source.open()] == [UUID2]

    def test_discovery_that_finds_nothing_waits(self, clocks: Clocks) -> None:
        """Pod processes seen, none on a GPU yet: pending (retried), never the whole node."""
        source = make_source(
            FakeNvml(self.gpus()), clocks, env=ALL_VISIBLE, model_pids=lambda: {4242}
        )
        with pytest.raises(PowerSourcePending, match="--gpus"):
            source.open()

    def test_discovery_without_a_shared_namespace_refuses(self, clocks: Clocks) -> None:
        """No other process of the pod visible: nothing to wait for, the whole-node guard holds."""
        source = make_source(FakeNvml(self.gpus()), clocks, env=ALL_VISIBLE, model_pids=set)
        with pytest.raises(PowerSourceError, match="--gpus") as exc:
            source.open()
        assert not isinstance(exc.value, PowerSourcePending)

    def test_discovery_retried_finds_a_model_that_started_late(self, clocks: Clocks) -> None:
        """The open that waited succeeds once the model's process runs on its GPU."""
        gpus = self.gpus()
        nvml = FakeNvml(gpus)
        source = make_source(nvml, clocks, env=ALL_VISIBLE, model_pids=lambda: {4242})
        with pytest.raises(PowerSourcePending):
            source.open()
        gpus[1].pids = [4242]
        assert [g.uuid for g in source.open()] == [UUID1]
        assert nvml.init_count - nvml.shutdown_count == 1  # the failed open shut NVML down

    def test_no_gpu_visible(self, clocks: Clocks) -> None:
        """NVML with no device fails open and says what the runtime was asked for."""
        env = {"NVIDIA_VISIBLE_DEVICES": "void"}
        with pytest.raises(PowerSourceError, match="NVIDIA_VISIBLE_DEVICES is 'void'"):
            make_source(FakeNvml([]), clocks, env=env).open()


class TestMig:
    def test_mig_mode_detected(self, clocks: Clocks) -> None:
        """A GPU in MIG mode is flagged: its energy covers the whole physical GPU."""
        nvml = FakeNvml(
            [
                FakeGpu(UUID0, mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE),
                FakeGpu(UUID1, mig_mode=pynvml.NVML_DEVICE_MIG_DISABLE),
                FakeGpu(UUID2, mig_mode=None),
            ]
        )
        source = make_source(nvml, clocks)
        source.open()
        assert [source.capabilities[g].mig for g in ("0", "1", "2")] == [True, False, False]
        assert source.mig_enabled

    def test_no_mig_on_plain_gpus(self, clocks: Clocks) -> None:
        """GPUs that do not support MIG leave mig_enabled false."""
        source = make_source(FakeNvml([FakeGpu(UUID0)]), clocks)
        source.open()
        assert not source.mig_enabled

    def test_mig_id_meters_its_physical_gpu(self, clocks: Clocks) -> None:
        """A MIG slice's UUID resolves to its physical GPU, whose power the slice shares."""
        gpu = FakeGpu(UUID1, mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE, mig_uuids=(MIG0,))
        nvml = FakeNvml([FakeGpu(UUID0), gpu])
        source = make_source(nvml, clocks, gpus=[MIG0])
        (info,) = source.open()
        assert (info.gpu, info.uuid) == ("1", UUID1)
        assert source.mig_enabled
        assert samples(source.read())[0].power_w == 100.0

    def test_legacy_mig_id_meters_its_physical_gpu(self, clocks: Clocks) -> None:
        """A pre-R470 MIG-GPU-<uuid>/gi/ci id resolves to the GPU it names."""
        gpu = FakeGpu(UUID1, mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE)
        source = make_source(FakeNvml([FakeGpu(UUID0), gpu]), clocks, gpus=[f"MIG-{UUID1}/1/0"])
        (info,) = source.open()
        assert info.uuid == UUID1
        assert source.mig_enabled


class TestLifecycle:
    @pytest.mark.parametrize(
        "error",
        [pynvml.NVMLError_LibraryNotFound(), pynvml.NVMLError_DriverNotLoaded()],
    )
    def test_init_failure_is_one_line(self, clocks: Clocks, error: Exception) -> None:
        """nvmlInit failing becomes one PowerSourceError line that names the way out."""
        nvml = FakeNvml([FakeGpu(UUID0)], init_error=error)
        with pytest.raises(PowerSourceError, match="dcgm") as raised:
            make_source(nvml, clocks).open()
        assert "\n" not in str(raised.value)
        assert isinstance(raised.value.__cause__, pynvml.NVMLError)

    def test_nvml_error_during_open_is_wrapped(self, clocks: Clocks) -> None:
        """An NVML failure while reading identity is wrapped and NVML is shut down."""
        gpu = FakeGpu(UUID0)
        gpu.faults["nvmlDeviceGetName"] = pynvml.NVMLError_GpuIsLost()
        nvml = FakeNvml([gpu])
        with pytest.raises(PowerSourceError, match="GPU is lost"):
            make_source(nvml, clocks).open()
        assert nvml.shutdown_count == 1

    def test_close_is_idempotent(self, clocks: Clocks) -> None:
        """close() shuts NVML down exactly once however often it is called."""
        nvml = FakeNvml([FakeGpu(UUID0)])
        source = make_source(nvml, clocks)
        source.close()
        source.open()
        source.close()
        source.close()
        assert (nvml.init_count, nvml.shutdown_count) == (1, 1)

    def test_read_before_open_is_a_bug(self, clocks: Clocks) -> None:
        """read() before open() is a programming error, not a sample failure."""
        with pytest.raises(RuntimeError):
            make_source(FakeNvml([FakeGpu(UUID0)]), clocks).read()

    def test_open_twice_does_not_init_twice(self, clocks: Clocks) -> None:
        """A second open() returns the same GPUs without a second nvmlInit."""
        nvml = FakeNvml([FakeGpu(UUID0)])
        source = make_source(nvml, clocks)
        assert source.open() == source.open()
        assert nvml.init_count == 1

    def test_pynvml_imported_lazily_by_open(
        self, clocks: Clocks, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without an injected module, open() imports pynvml itself (here the fake, in its place)."""
        nvml = FakeNvml([FakeGpu(UUID0)])
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        source = NvmlSource(None, clock=clocks.monotonic, wall_clock=clocks.wall, env={})
        assert [g.uuid for g in source.open()] == [UUID0]
        source.close()
        assert nvml.shutdown_count == 1

    def test_no_pynvml_import_at_module_import(self) -> None:
        """Importing the power modules loads no pynvml, so no driver work happens at import."""
        code = (
            "import sys, sidecar.power.nvml, sidecar.power.dcgm, sidecar.power.visibility; "
            "sys.exit('pynvml' in sys.modules)"
        )
        subprocess.run([sys.executable, "-c", code], check=True)


class TestDiscovery:
    def test_running_processes_feed_gpu_discovery(self) -> None:
        """NVML's per-GPU compute PIDs, matched with the model's PIDs, name the model's GPUs."""
        nvml = FakeNvml(
            [FakeGpu(UUID0, pids=[11]), FakeGpu(UUID1, pids=[42, 43]), FakeGpu(UUID2, pids=[])]
        )
        processes = running_gpu_processes(nvml)
        assert processes == [(UUID0, [11]), (UUID1, [42, 43]), (UUID2, [])]
        assert gpus_used_by(processes, {43, 99}) == [UUID1]
        assert nvml.init_count == nvml.shutdown_count == 1

    def test_running_processes_init_failure(self) -> None:
        """Discovery without a driver raises PowerSourceError, not an NVML error."""
        nvml: Any = FakeNvml([], init_error=pynvml.NVMLError_LibraryNotFound())
        with pytest.raises(PowerSourceError):
            running_gpu_processes(nvml)
