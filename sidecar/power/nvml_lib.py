"""Small pieces of pynvml plumbing shared by the NVML source and GPU discovery.

Kept apart from :mod:`sidecar.power.nvml` so that module holds the source's
logic only. Nothing here runs at import time: pynvml is imported on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from sidecar.power.base import PowerSourceError

__all__ = [
    "import_pynvml",
    "processes",
    "running_gpu_processes",
    "supported",
    "text",
    "value_member",
]

# ``nvmlValueType_t`` constant name -> the member of ``c_nvmlValue_t`` it selects.
_VALUE_MEMBERS = {
    "NVML_VALUE_TYPE_DOUBLE": "dVal",
    "NVML_VALUE_TYPE_UNSIGNED_INT": "uiVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG": "ulVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": "ullVal",
    "NVML_VALUE_TYPE_SIGNED_LONG_LONG": "sllVal",
    "NVML_VALUE_TYPE_SIGNED_INT": "siVal",
    "NVML_VALUE_TYPE_UNSIGNED_SHORT": "usVal",
}


def running_gpu_processes(nvml: Any | None = None) -> list[tuple[str, list[int]]]:
    """NVML's compute processes per GPU, as ``(uuid, pids)``, for GPU discovery.

    Feed it to :func:`sidecar.power.visibility.gpus_used_by`. Starts and stops
    NVML itself. Raises :class:`PowerSourceError` where NVML cannot start.
    """
    module = nvml if nvml is not None else import_pynvml()
    try:
        module.nvmlInit()
    except module.NVMLError as e:
        raise PowerSourceError(f"NVML did not start ({e})") from e
    try:
        return list(processes(module))
    except module.NVMLError as e:
        raise PowerSourceError(f"NVML could not list GPU processes: {e}") from e
    finally:
        module.nvmlShutdown()


def processes(nvml: Any) -> Iterator[tuple[str, list[int]]]:
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        pids = [int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        yield text(nvml.nvmlDeviceGetUUID(handle)), pids


def import_pynvml() -> Any:
    try:
        import pynvml  # lazy on purpose: no driver work at import time
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise PowerSourceError(f"the nvml power source needs nvidia-ml-py: {e}") from e
    return pynvml


def supported(nvml: Any, call: Callable[[], object]) -> bool:
    """Whether an optional NVML call works on this GPU; a lost GPU still fails open."""
    try:
        call()
    except nvml.NVMLError as e:
        if isinstance(e, nvml.NVMLError_GpuIsLost):
            raise
        return False
    return True


def value_member(nvml: Any, value_type: int) -> str:
    """Which ``c_nvmlValue_t`` member holds a value of ``value_type``."""
    for constant, member in _VALUE_MEMBERS.items():
        if getattr(nvml, constant) == value_type:
            return member
    return "uiVal"  # power samples are unsigned int mW on every driver seen


def text(value: str | bytes) -> str:
    """pynvml returns str on Python 3; older releases returned bytes."""
    return value.decode() if isinstance(value, bytes) else value
