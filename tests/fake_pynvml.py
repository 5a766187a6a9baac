"""A scripted stand-in for the ``pynvml`` module, faithful where mistakes hide.

It follows the real library (nvidia-ml-py) closely enough that a unit or clock
mistake in the code under test fails a test:

* the same function names and argument order, and the real constants, read
  from the installed ``pynvml`` rather than copied;
* the real exception classes (``NVMLError(3)`` is ``NVMLError_NotSupported``);
* the real ctypes structs for field values and samples;
* the real units: power in mW, energy in mJ, buffer timestamps in µs of the
  wall clock; and the real failure modes (calls before ``nvmlInit`` raise
  ``Uninitialized``, an unsupported field fails per field inside a successful
  call, an empty sample buffer raises ``NotFound``).

Each :class:`FakeGpu` is scripted by its attributes, which tests change between
reads: the power the driver reports, its energy counter, its sample buffer, and
errors to raise from named functions. The failures that need a re-initialisation
are scripted too: a GPU that hangs inside a call (``gate``), a GPU lost from the
bus (``lost``), and a driver reload (:meth:`FakeNvml.reload_driver`), after which
handles from before fail with ``GpuIsLost`` and the energy counters restart.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml as real

H100 = "NVIDIA H100 80GB HBM3"


@dataclass
class FakeGpu:
    """One scripted GPU; ``None`` in a capability means the driver does not support it."""

    uuid: str
    name: str = H100
    instant_mw: int | None = 100_000  # NVML_FI_DEV_POWER_INSTANT; None: per-field NOT_SUPPORTED
    instant_return: int = real.NVML_SUCCESS  # per-field nvmlReturn when instant_mw is set
    average_mw: int = 90_000  # nvmlDeviceGetPowerUsage, the 1 s average on Hopper
    energy_mj: int | None = 1_234_000_000  # since driver load; None: no counter
    buffer: list[tuple[int, int]] | None = None  # (wall-clock µs, mW); None: unsupported
    buffer_value_type: int = real.NVML_VALUE_TYPE_UNSIGNED_INT
    mig_mode: int | None = None  # NVML_DEVICE_MIG_ENABLE / _DISABLE; None: NOT_SUPPORTED
    mig_uuids: tuple[str, ...] = ()
    pids: list[int] = field(default_factory=list)
    faults: dict[str, Exception] = field(default_factory=dict)  # function name -> raised
    lost: bool = False  # fell off the bus: device calls raise GpuIsLost, lookups NotFound
    gate: threading.Event | None = None  # device calls block until the event is set (a hang)
    device_calls: int = 0  # device calls made on this GPU's handles, hung ones included


@dataclass(frozen=True)
class FakeHandle:
    """An opaque device handle, like ``c_nvmlDevice_t``; ``mig`` marks a MIG slice's handle."""

    index: int
    mig: int | None = None
    generation: int = 0  # the driver load it came from; stale after a reload


class FakeNvml:
    """Module-like object: pass it as ``nvml=`` where the code would use ``pynvml``."""

    def __init__(self, gpus: Sequence[FakeGpu], *, init_error: Exception | None = None) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.init_count = 0
        self.shutdown_count = 0
        self.calls: list[str] = []
        self.generation = 0
        self._initialised = 0
        # The real constants and exception classes, so values cannot drift from the library.
        for name in dir(real):
            if name.startswith(("NVML_", "NVMLError")) or name in ("c_nvmlFieldValue_t",):
                setattr(self, name, getattr(real, name))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the fake lacks: fail loudly, like an AttributeError on the module.
        raise AttributeError(f"fake pynvml has no {name!r}")

    def reload_driver(self, energy_mj: int = 0) -> None:
        """The kernel driver was reloaded: old handles go stale, energy counters restart."""
        self.generation += 1
        for gpu in self.gpus:
            if gpu.energy_mj is not None:
                gpu.energy_mj = energy_mj

    # -- library -------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise self.init_error
        self.init_count += 1
        self._initialised += 1

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        if not self._initialised:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)
        self.shutdown_count += 1
        self._initialised -= 1

    # -- devices -------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index, generation=self.generation)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByUUID")
        for index, gpu in enumerate(self.gpus):
            if gpu.lost:
                continue
            if gpu.uuid == uuid:
                return FakeHandle(index, generation=self.generation)
            if uuid in gpu.mig_uuids:
                return FakeHandle(index, mig=gpu.mig_uuids.index(uuid), generation=self.generation)
        raise real.NVMLError(real.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        self._gpu("nvmlDeviceGetIndex", handle)
        return handle.index

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        gpu = self._gpu("nvmlDeviceGetUUID", handle)
        return gpu.uuid if handle.mig is None else gpu.mig_uuids[handle.mig]

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceIsMigDeviceHandle(self, handle: FakeHandle) -> ctypes.c_uint:
        self._gpu("nvmlDeviceIsMigDeviceHandle", handle)
        return ctypes.c_uint(handle.mig is not None)  # the real binding returns the c_uint

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: FakeHandle) -> FakeHandle:
        self._gpu("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
        if handle.mig is None:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(handle.index, generation=handle.generation)

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        gpu = self._physical("nvmlDeviceGetMigMode", handle)
        if gpu.mig_mode is None:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        return [gpu.mig_mode, gpu.mig_mode]

    # -- power and energy ----------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, fieldIds: Sequence[int]) -> Any:
        gpu = self._physical("nvmlDeviceGetFieldValues", handle)
        values = (real.c_nvmlFieldValue_t * len(fieldIds))()
        for slot, field_id in zip(values, fieldIds, strict=True):
            slot.fieldId = field_id
            if field_id != real.NVML_FI_DEV_POWER_INSTANT or gpu.instant_mw is None:
                slot.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED
            else:
                slot.nvmlReturn = gpu.instant_return
                slot.valueType = real.NVML_VALUE_TYPE_UNSIGNED_INT
                slot.value.uiVal = gpu.instant_mw
        return values

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._physical("nvmlDeviceGetPowerUsage", handle).average_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        gpu = self._physical("nvmlDeviceGetTotalEnergyConsumption", handle)
        if gpu.energy_mj is None:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.energy_mj

    def nvmlDeviceGetSamples(
        self, device: FakeHandle, sampling_type: int, timeStamp: int
    ) -> tuple[int, list[Any]]:
        gpu = self._physical("nvmlDeviceGetSamples", device)
        if gpu.buffer is None or sampling_type != real.NVML_TOTAL_POWER_SAMPLES:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        newer = [(ts, mw) for ts, mw in gpu.buffer if ts > timeStamp]
        if not newer:
            raise real.NVMLError(real.NVML_ERROR_NOT_FOUND)
        samples = []
        for ts, mw in newer:
            sample = real.c_nvmlSample_t()
            sample.timeStamp = ts
            sample.sampleValue.uiVal = mw
            samples.append(sample)
        return gpu.buffer_value_type, samples

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        gpu = self._physical("nvmlDeviceGetComputeRunningProcesses", handle)
        return [SimpleNamespace(pid=pid, usedGpuMemory=1 << 30) for pid in gpu.pids]

    # -- plumbing ------------------------------------------------------------

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if not self._initialised:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, name: str, handle: FakeHandle) -> FakeGpu:
        self._enter(name)
        gpu = self.gpus[handle.index]
        gpu.device_calls += 1
        if gpu.gate is not None:
            gpu.gate.wait()
        if gpu.lost or handle.generation != self.generation:
            raise real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.faults:
            raise gpu.faults[name]
        return gpu

    def _physical(self, name: str, handle: FakeHandle) -> FakeGpu:
        """Power and energy calls on a MIG slice's handle are not supported, as on real drivers."""
        gpu = self._gpu(name, handle)
        if handle.mig is not None:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu
