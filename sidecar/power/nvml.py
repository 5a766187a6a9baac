"""Power from NVML, for a sidecar that can see the model's GPUs.

What it reads, per GPU, chosen once at :meth:`NvmlSource.open`:

* power: the instantaneous field ``NVML_FI_DEV_POWER_INSTANT`` (mW), because
  ``nvmlDeviceGetPowerUsage`` is a 1-second average on Ampere and newer (the
  A100 aside), too slow for sub-second attribution; that average is only the
  fallback where the field is unsupported;
* the driver's own power-sample buffer (``nvmlDeviceGetSamples``, mW with
  µs wall-clock timestamps) where supported: more samples for fewer calls;
* the total-energy counter (mJ since the driver loaded), the ground truth the
  ledger reconciles integrated power against.

Everything leaves in SI units on the monotonic clock: mW and mJ are divided by
1000 here, and buffer timestamps are moved onto the monotonic clock with one
offset taken at open. NVML exceptions stop at this boundary: start-up failures
become :class:`PowerSourceError`, per-read failures a :class:`ReadError` for
that GPU alone.

pynvml is imported inside :meth:`NvmlSource.open`, never at import time, so the
package imports (and the other power sources work) where no driver exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from sidecar.power.base import ErrorReason, GpuInfo, PowerSample, PowerSourceError, ReadError
from sidecar.power.visibility import (
    NVIDIA_VISIBLE_DEVICES,
    foreign_pids,
    gpu_env,
    gpus_used_by,
    no_gpu_hint,
    parse_nvidia_visible_devices,
    select_gpus,
)

__all__ = ["NvmlCapabilities", "NvmlSource", "running_gpu_processes"]

_log = structlog.get_logger(__name__)

_MW_PER_W = 1000.0
_MJ_PER_J = 1000.0
_US_PER_S = 1_000_000
# Re-anchor wall-clock timestamps when the wall clock has moved this far against
# the monotonic one since the last anchor (an NTP step, a VM resumed).
_MAX_CLOCK_SKEW_S = 0.5

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


@dataclass(frozen=True, slots=True)
class NvmlCapabilities:
    """What one GPU's driver offers, probed once at open.

    ``mig`` means the GPU is in MIG mode: NVML's power and energy then cover
    the whole physical GPU, every MIG slice on it, not the model's slice alone.
    """

    instant_power: bool
    energy_counter: bool
    sample_buffer: bool
    mig: bool


@dataclass(slots=True)
class _Gpu:
    """One opened GPU: its handle, what it offers and where its buffer was last read."""

    info: GpuInfo
    handle: Any
    caps: NvmlCapabilities
    last_seen_us: int  # newest buffer timestamp handed out (µs, wall clock)
    last_time_s: float  # newest sample time handed out (s, monotonic clock)


class NvmlSource:
    """A :class:`~sidecar.power.base.PowerSource` over NVML in this container.

    ``gpus`` are indices or UUIDs (``--gpus``); ``None`` applies the
    visibility rules of :func:`sidecar.power.visibility.select_gpus` to ``env``
    (default: this process's visibility variables). ``clock`` is the
    sidecar's monotonic clock in seconds and ``wall_clock`` the Unix time in
    seconds, used only to place the driver's buffer timestamps. ``nvml`` is the
    pynvml module (tests inject a fake).
    """

    def __init__(
        self,
        gpus: Sequence[str] | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        nvml: Any | None = None,
        env: Mapping[str, str] | None = None,
        model_pids: Callable[[], Collection[int]] | None = None,
    ) -> None:
        self._selectors = tuple(gpus) if gpus else None
        self._model_pids = model_pids if model_pids is not None else foreign_pids
        self._clock = clock
        self._wall_clock = wall_clock
        self._nvml: Any | None = nvml
        self._env = env
        self._initialised = False
        self._gpus: list[_Gpu] = []
        self._anchor_mono_s = 0.0
        self._anchor_wall_us = 0
        self._logged_failures: set[tuple[str, str]] = set()

    @property
    def capabilities(self) -> Mapping[str, NvmlCapabilities]:
        """What each opened GPU offers, by its ``gpu`` label."""
        return {g.info.gpu: g.caps for g in self._gpus}

    @property
    def mig_enabled(self) -> bool:
        """Whether any metered GPU is in MIG mode: energy is then per physical GPU, all slices."""
        return any(g.caps.mig for g in self._gpus)

    def open(self) -> list[GpuInfo]:
        """Start NVML, select the GPUs, read their identity and probe what they offer."""
        if self._initialised:
            return [g.info for g in self._gpus]
        nvml = self._nvml = self._nvml if self._nvml is not None else _import_pynvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            raise PowerSourceError(
                f"NVML did not start ({e}): is the NVIDIA driver mounted in this container? "
                "Use --power-source dcgm:URL where the sidecar cannot see the GPU"
            ) from e
        self._initialised = True
        try:
            self._gpus = self._open_gpus(nvml)
        except nvml.NVMLError as e:
            self.close()
            raise PowerSourceError(f"NVML failed while opening the GPUs: {e}") from e
        except PowerSourceError:
            self.close()
            raise
        return [g.info for g in self._gpus]

    def read(self) -> list[PowerSample | ReadError]:
        """Poll every GPU once; a GPU that fails yields a :class:`ReadError`, the others carry on."""
        if not self._initialised:
            raise RuntimeError("NvmlSource.read() called before open()")
        self._check_clock_anchor()
        out: list[PowerSample | ReadError] = []
        for gpu in self._gpus:
            out.extend(self._read_gpu(gpu))
        return out

    def close(self) -> None:
        """Shut NVML down once; later calls do nothing."""
        if not self._initialised:
            return
        self._initialised = False
        self._gpus = []
        nvml = self._nvml
        assert nvml is not None  # set by open() before _initialised
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as e:
            _log.warning("power.nvml.shutdown_failed", error=str(e))

    # -- open ---------------------------------------------------------------

    def _open_gpus(self, nvml: Any) -> list[_Gpu]:
        env = gpu_env() if self._env is None else self._env
        count = int(nvml.nvmlDeviceGetCount())
        wanted = self._selectors
        if (
            wanted is None
            and count > 1
            and parse_nvidia_visible_devices(env.get(NVIDIA_VISIBLE_DEVICES)).kind == "all"
        ):
            wanted = self._discover(nvml) or None
        selectors = select_gpus(wanted, env, count)
        if selectors is None:
            if count == 0:
                hint = no_gpu_hint(env)
                raise PowerSourceError(
                    "NVML sees no GPU in this container" + (f": {hint}" if hint else "")
                )
            handles = [(nvml.nvmlDeviceGetHandleByIndex(i), False) for i in range(count)]
        else:
            handles = [self._resolve(nvml, s, count) for s in selectors]
        # Anchor before probing: the probe reads the sample buffer's timestamps.
        self._anchor_clocks()
        gpus: list[_Gpu] = []
        for handle, from_mig_id in handles:
            gpu = self._probe(nvml, handle, from_mig_id)
            if all(g.info.uuid != gpu.info.uuid for g in gpus):  # "0" and its UUID, two slices
                gpus.append(gpu)
        return gpus

    def _discover(self, nvml: Any) -> tuple[str, ...]:
        """Best effort, with every GPU of the node visible: the GPUs the model's processes use.

        Works when the pod shares its process namespace (``shareProcessNamespace``)
        and the driver reports PIDs of this namespace; otherwise finds nothing,
        and the caller refuses to meter the whole node.
        """
        try:
            pids = self._model_pids()
            found = gpus_used_by(_processes(nvml), pids) if pids else []
        except (OSError, nvml.NVMLError) as e:
            _log.info("power.nvml.discovery_failed", error=str(e))
            return ()
        if found:
            _log.info("power.nvml.discovered", gpus=found, processes=len(pids))
        return tuple(found)

    def _resolve(self, nvml: Any, selector: str, count: int) -> tuple[Any, bool]:
        """A physical GPU's handle for one selector, and whether it came from a MIG id."""
        if selector.isdigit():
            index = int(selector)
            if index >= count:
                raise PowerSourceError(
                    f"GPU {selector} not found: NVML sees {count} GPU(s) in this container"
                )
            return nvml.nvmlDeviceGetHandleByIndex(index), False
        uuid = selector
        if uuid.startswith("MIG-GPU-"):  # pre-R470 MIG id: MIG-GPU-<parent uuid>/<gi>/<ci>
            uuid = uuid.removeprefix("MIG-").split("/", 1)[0]
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        except (nvml.NVMLError_NotFound, nvml.NVMLError_InvalidArgument):
            handle = self._by_uuid_prefix(nvml, uuid, count)
        if uuid.startswith("MIG-"):
            # A MIG slice has no power reading of its own: meter its physical GPU.
            return nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle), True
        return handle, False

    def _by_uuid_prefix(self, nvml: Any, prefix: str, count: int) -> Any:
        """CUDA accepts a unique UUID prefix; NVML wants the whole UUID, so match by hand."""
        seen: list[tuple[str, Any]] = []
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            seen.append((_text(nvml.nvmlDeviceGetUUID(handle)), handle))
        matches = [handle for uuid, handle in seen if uuid.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        listed = ", ".join(uuid for uuid, _ in seen) or "none"
        problem = "matches several GPUs" if matches else "not found"
        raise PowerSourceError(f"GPU {prefix} {problem}: NVML sees {listed}")

    def _anchor_clocks(self) -> None:
        """Tie the wall clock to the monotonic one; the monotonic reading brackets the wall one."""
        before_s = self._clock()
        wall_s = self._wall_clock()
        after_s = self._clock()
        self._anchor_mono_s = (before_s + after_s) / 2
        self._anchor_wall_us = round(wall_s * _US_PER_S)

    def _check_clock_anchor(self) -> None:
        """Re-anchor if the wall clock stepped, so buffer samples never land far off in time."""
        if not any(g.caps.sample_buffer for g in self._gpus):
            return
        expected_s = self._to_monotonic(round(self._wall_clock() * _US_PER_S))
        skew_s = expected_s - self._clock()
        if abs(skew_s) > _MAX_CLOCK_SKEW_S:
            _log.warning("power.nvml.clock_reanchored", skew_s=skew_s)
            self._anchor_clocks()

    def _probe(self, nvml: Any, handle: Any, from_mig_id: bool) -> _Gpu:
        """Identity and capabilities of one GPU, read once so no read has to guess."""
        info = GpuInfo(
            gpu=str(nvml.nvmlDeviceGetIndex(handle)),
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
        )
        instant = _supported(nvml, lambda: self._instant_power_mw(nvml, handle))
        if not instant:
            try:
                nvml.nvmlDeviceGetPowerUsage(handle)
            except nvml.NVMLError as e:
                raise PowerSourceError(
                    f"GPU {info.gpu} ({info.uuid}) gives no power reading: {e}"
                ) from e
        energy = _supported(nvml, lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        buffer, last_seen_us = self._probe_buffer(nvml, handle)
        mig = from_mig_id or self._mig_mode(nvml, handle)
        caps = NvmlCapabilities(
            instant_power=instant, energy_counter=energy, sample_buffer=buffer, mig=mig
        )
        _log.info(
            "power.nvml.gpu_opened",
            gpu=info.gpu,
            uuid=info.uuid,
            name=info.name,
            instant_power=instant,
            energy_counter=energy,
            sample_buffer=buffer,
            mig=mig,
        )
        if mig:
            _log.warning(
                "power.nvml.mig_energy_is_per_physical_gpu",
                gpu=info.gpu,
                uuid=info.uuid,
                detail="power and energy cover every MIG slice of this GPU",
            )
        return _Gpu(info, handle, caps, last_seen_us=last_seen_us, last_time_s=float("-inf"))

    def _probe_buffer(self, nvml: Any, handle: Any) -> tuple[bool, int]:
        """Whether the power-sample buffer works, and the newest timestamp already in it.

        Samples older than open are skipped: the first read starts after them.
        An empty buffer (``NotFound``) is supported, just not filled yet.
        """
        try:
            _, raw = nvml.nvmlDeviceGetSamples(handle, nvml.NVML_TOTAL_POWER_SAMPLES, 0)
        except nvml.NVMLError_NotFound:
            return True, self._anchor_wall_us
        except nvml.NVMLError as e:
            if isinstance(e, nvml.NVMLError_GpuIsLost):
                raise
            return False, self._anchor_wall_us
        newest_us = max((int(s.timeStamp) for s in raw), default=self._anchor_wall_us)
        return True, max(newest_us, self._anchor_wall_us)

    @staticmethod
    def _mig_mode(nvml: Any, handle: Any) -> bool:
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError as e:
            if isinstance(e, nvml.NVMLError_GpuIsLost):
                raise
            return False  # NotSupported: a GPU without MIG
        return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)

    # -- read ---------------------------------------------------------------

    def _read_gpu(self, gpu: _Gpu) -> list[PowerSample | ReadError]:
        nvml = self._nvml
        assert nvml is not None
        label = gpu.info.gpu
        try:
            readings = self._buffered(nvml, gpu) if gpu.caps.sample_buffer else []
            if not readings:
                power_mw = (
                    self._instant_power_mw(nvml, gpu.handle)
                    if gpu.caps.instant_power
                    else int(nvml.nvmlDeviceGetPowerUsage(gpu.handle))
                )
                readings = [(self._clock(), power_mw)]
        except nvml.NVMLError as e:
            return [self._failed(nvml, label, e)]
        energy_j: float | None = None
        failure: ReadError | None = None
        if gpu.caps.energy_counter:
            try:
                energy_j = int(nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)) / _MJ_PER_J
            except nvml.NVMLError as e:
                failure = self._failed(nvml, label, e)
        out: list[PowerSample | ReadError] = []
        for time_s, power_mw in readings:
            if time_s <= gpu.last_time_s:
                continue  # an instant sample on a clock that did not move: keep strict order
            gpu.last_time_s = time_s
            out.append(PowerSample(time_s=time_s, gpu=label, power_w=power_mw / _MW_PER_W))
        if out and energy_j is not None:
            newest = out[-1]
            assert isinstance(newest, PowerSample)
            out[-1] = PowerSample(newest.time_s, newest.gpu, newest.power_w, energy_j)
        if failure is not None:
            out.append(failure)
        return out

    def _buffered(self, nvml: Any, gpu: _Gpu) -> list[tuple[float, int]]:
        """The driver's samples newer than the last one handed out, as (monotonic s, mW)."""
        try:
            value_type, raw = nvml.nvmlDeviceGetSamples(
                gpu.handle, nvml.NVML_TOTAL_POWER_SAMPLES, gpu.last_seen_us
            )
        except nvml.NVMLError_NotFound:
            return []  # nothing new in the buffer: the caller reads one instant sample
        member = _value_member(nvml, value_type)
        fresh = sorted(
            ((int(s.timeStamp), getattr(s.sampleValue, member)) for s in raw),
            key=lambda pair: pair[0],
        )
        fresh = [(ts_us, mw) for ts_us, mw in fresh if ts_us > gpu.last_seen_us]
        if fresh:
            gpu.last_seen_us = fresh[-1][0]
        # Samples at or before one already handed out (an instant sample taken while the
        # driver had not yet published these) would break time order: drop them here, so
        # a poll left with nothing falls back to an instant sample.
        timed = ((self._to_monotonic(ts_us), mw) for ts_us, mw in fresh)
        return [(time_s, mw) for time_s, mw in timed if time_s > gpu.last_time_s]

    def _to_monotonic(self, wall_us: int) -> float:
        """A wall-clock µs timestamp on the monotonic clock, in seconds."""
        return self._anchor_mono_s + (wall_us - self._anchor_wall_us) / _US_PER_S

    @staticmethod
    def _instant_power_mw(nvml: Any, handle: Any) -> int:
        """Instantaneous power in mW from the field API; per-field failures raise as NVMLError."""
        (field,) = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])
        if field.nvmlReturn != nvml.NVML_SUCCESS:
            raise nvml.NVMLError(field.nvmlReturn)
        return int(field.value.uiVal)

    def _failed(self, nvml: Any, gpu: str, error: Exception) -> ReadError:
        """Translate an NVML error into a counted reason; log each (GPU, reason) once."""
        reason: ErrorReason
        if isinstance(error, nvml.NVMLError_NotSupported):
            reason = "not_supported"
        elif isinstance(error, nvml.NVMLError_GpuIsLost):
            reason = "gpu_lost"
        else:
            reason = "unknown"
        if (gpu, reason) not in self._logged_failures:
            self._logged_failures.add((gpu, reason))
            _log.warning("power.nvml.read_failed", gpu=gpu, reason=reason, error=str(error))
        return ReadError(gpu=gpu, reason=reason)


def running_gpu_processes(nvml: Any | None = None) -> list[tuple[str, list[int]]]:
    """NVML's compute processes per GPU, as ``(uuid, pids)``, for GPU discovery.

    Feed it to :func:`sidecar.power.visibility.gpus_used_by`. Starts and stops
    NVML itself. Raises :class:`PowerSourceError` where NVML cannot start.
    """
    module = nvml if nvml is not None else _import_pynvml()
    try:
        module.nvmlInit()
    except module.NVMLError as e:
        raise PowerSourceError(f"NVML did not start ({e})") from e
    try:
        return list(_processes(module))
    except module.NVMLError as e:
        raise PowerSourceError(f"NVML could not list GPU processes: {e}") from e
    finally:
        module.nvmlShutdown()


def _processes(nvml: Any) -> Iterator[tuple[str, list[int]]]:
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        pids = [int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        yield _text(nvml.nvmlDeviceGetUUID(handle)), pids


def _import_pynvml() -> Any:
    try:
        import pynvml  # lazy on purpose: no driver work at import time
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise PowerSourceError(f"the nvml power source needs nvidia-ml-py: {e}") from e
    return pynvml


def _supported(nvml: Any, call: Callable[[], object]) -> bool:
    """Whether an optional NVML call works on this GPU; a lost GPU still fails open."""
    try:
        call()
    except nvml.NVMLError as e:
        if isinstance(e, nvml.NVMLError_GpuIsLost):
            raise
        return False
    return True


def _value_member(nvml: Any, value_type: int) -> str:
    """Which ``c_nvmlValue_t`` member holds a value of ``value_type``."""
    for constant, member in _VALUE_MEMBERS.items():
        if getattr(nvml, constant) == value_type:
            return member
    return "uiVal"  # power samples are unsigned int mW on every driver seen


def _text(value: str | bytes) -> str:
    """pynvml returns str on Python 3; older releases returned bytes."""
    return value.decode() if isinstance(value, bytes) else value
