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

Faults that last: a read calls every GPU in turn, inline in the caller's
thread (a hand-off per GPU and read cost more CPU than the reads). A call that
hangs holds that GPU: a read that runs beside it (the sampler abandons a read
stuck past :attr:`NvmlSource.read_deadline_s` and starts another, see
:mod:`sidecar.power.deadline`) skips that GPU with reason ``timeout`` until the
call returns, and the stuck read, once it returns, gives nothing back (it is
stale by then). So a hung call costs that GPU alone. After ``reinit_after``
reads in a row without a power sample on some GPU (lost from the bus, a driver
reload, NVML uninitialised under us), NVML is shut down, started again and
every GPU re-resolved by its UUID, on a capped exponential backoff with jitter,
never while a hung call is still inside the driver. A GPU keeps its ``gpu`` label across a re-init, so its
ledger line and reconciler carry on; a reloaded driver's energy counter
restarts, which the reconciler reads as a new window.

pynvml is imported inside :meth:`NvmlSource.open`, never at import time, so the
package imports (and the other power sources work) where no driver exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

import structlog

from sidecar.power.backoff import Backoff
from sidecar.power.base import (
    ErrorReason,
    GpuInfo,
    PowerSample,
    PowerSourceError,
    PowerSourcePending,
    ReadError,
)
from sidecar.power.nvml_lib import (
    import_pynvml,
    processes,
    running_gpu_processes,
    supported,
    text,
    value_member,
)
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
_import_pynvml = import_pynvml  # the name bench/gpu_check.py reaches for

_MW_PER_W = 1000.0
_MJ_PER_J = 1000.0
_US_PER_S = 1_000_000
# Re-anchor wall-clock timestamps when the wall clock has moved this far against
# the monotonic one since the last anchor (an NTP step, a VM resumed).
_MAX_CLOCK_SKEW_S = 0.5
READ_TIMEOUT_S = 0.5
"""Longest wait for one GPU's read before a read may run beside it; calls normally take
micro- to milliseconds."""
REINIT_AFTER_READS = 10
"""Reads in a row without a power sample on a GPU before NVML is re-initialised."""


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
    failed_reads: int = 0  # reads in a row that gave no power sample


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
        read_timeout_s: float = READ_TIMEOUT_S,
        reinit_after: int = REINIT_AFTER_READS,
        backoff: Backoff | None = None,
    ) -> None:
        if read_timeout_s <= 0:
            raise ValueError(f"read timeout must be positive, got {read_timeout_s} s")
        self._read_timeout_s = read_timeout_s
        self._in_call: dict[str, object] = {}  # GPU label -> the read now inside the driver for it
        self._current_read: object | None = None  # the newest read; an older one is stale
        self._reinit_after = max(1, reinit_after)
        self._backoff = backoff if backoff is not None else Backoff(clock=clock)
        self.reinits = 0
        """Successful re-initialisations since open (tests and logs)."""
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
        self._namespace_shared = False  # discovery saw other processes of this pod

    @property
    def read_deadline_s(self) -> float:
        """How long one GPU's call may hang before a read may run beside it (that GPU skipped)."""
        return self._read_timeout_s

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
        """Poll every GPU once; a GPU that fails yields a :class:`ReadError`, the others carry on.

        Blocks while a GPU's call hangs; a read from another thread meanwhile skips
        that GPU (``timeout``) and makes this one stale: it returns nothing.
        """
        if not self._initialised:
            raise RuntimeError("NvmlSource.read() called before open()")
        token = self._current_read = object()
        if self._reinit_due():
            self._reinit()
        self._check_clock_anchor()
        out: list[PowerSample | ReadError] = []
        in_call = self._in_call
        for gpu in self._gpus:
            label = gpu.info.gpu
            result: list[PowerSample | ReadError]
            if label in in_call:  # an older read is still inside the driver on this GPU
                result = [self._timed_out(label)]
            else:
                in_call[label] = token
                try:
                    result = self._read_gpu_safe(gpu)
                finally:
                    if in_call.get(label) is token:  # not cleared by close() meanwhile
                        del in_call[label]
                if self._current_read is not token:
                    return []  # another read ran while this call hung: what it got is stale
            if result and type(result[0]) is PowerSample:  # a read has its samples first
                gpu.failed_reads = 0
            else:
                gpu.failed_reads += 1
            out.extend(result)
        if self._backoff.failures and all(g.failed_reads == 0 for g in self._gpus):
            self._backoff.succeeded()  # every GPU reads again: the next fault starts afresh
        return out

    def close(self) -> None:
        """Shut NVML down once; later calls do nothing."""
        if not self._initialised:
            return
        self._initialised = False
        self._gpus = []
        self._in_call.clear()  # a hung call is abandoned, not waited for
        nvml = self._nvml
        assert nvml is not None  # set by open() before _initialised
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as e:
            _log.warning("power.nvml.shutdown_failed", error=str(e))

    # -- re-init ------------------------------------------------------------

    def _reinit_due(self) -> bool:
        """A GPU failed long enough, the backoff allows a try, and no call is inside NVML."""
        if all(g.failed_reads < self._reinit_after for g in self._gpus):
            return False
        return self._backoff.due() and not self._in_call

    def _reinit(self) -> None:
        """Shut NVML down, start it again and re-resolve every GPU by its UUID."""
        nvml = self._nvml
        assert nvml is not None
        failing = [g.info.gpu for g in self._gpus if g.failed_reads >= self._reinit_after]
        # Every attempt moves the backoff on, even one that works: a GPU that resolves
        # but keeps failing must not be re-initialised at every poll. Reads that work
        # on every GPU reset it (read()).
        delay_s = self._backoff.failed()
        _log.warning(
            "power.nvml.reinit", gpus=failing, attempt=self._backoff.failures, next_in_s=delay_s
        )
        with suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            _log.warning("power.nvml.reinit_failed", error=str(e), retry_in_s=round(delay_s, 2))
            return
        missing: list[str] = []
        for index, gpu in enumerate(self._gpus):
            try:
                self._gpus[index] = self._reresolve(nvml, gpu)
            except (nvml.NVMLError, PowerSourceError) as e:
                missing.append(gpu.info.gpu)
                _log.warning(
                    "power.nvml.reresolve_failed",
                    gpu=gpu.info.gpu,
                    uuid=gpu.info.uuid,
                    error=str(e),
                )
        if missing:
            _log.warning("power.nvml.reinit_partial", missing=missing, retry_in_s=round(delay_s, 2))
            return
        self.reinits += 1
        self._logged_failures.clear()  # a fault after recovery is news again
        _log.info("power.nvml.reinit_done", gpus=[g.info.gpu for g in self._gpus])

    def _reresolve(self, nvml: Any, gpu: _Gpu) -> _Gpu:
        """The same GPU by UUID after a re-init: a fresh handle, its label and clocks kept."""
        handle = nvml.nvmlDeviceGetHandleByUUID(gpu.info.uuid)
        fresh = self._probe(nvml, handle, gpu.caps.mig)
        return replace(
            fresh,
            info=gpu.info,
            last_seen_us=max(gpu.last_seen_us, fresh.last_seen_us),
            last_time_s=gpu.last_time_s,
            failed_reads=0,  # another run of failures is needed before the next re-init
        )

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
            if wanted is None and self._namespace_shared:
                # The model may simply not run yet: a native sidecar starts first.
                raise PowerSourcePending(
                    f"NVIDIA_VISIBLE_DEVICES=all shows {count} GPUs and none runs a process of "
                    "this pod yet; waiting for the model to start (if it already runs, the "
                    "driver reports host PIDs: pass --gpus with the model's GPU UUIDs)"
                )
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
        and the driver reports PIDs of this namespace. Finding nothing in a shared
        namespace is taken as a model that has not started yet (the caller waits
        and retries); without one, the caller refuses to meter the whole node.
        """
        self._namespace_shared = False
        try:
            pids = self._model_pids()
            self._namespace_shared = bool(pids)
            found = gpus_used_by(processes(nvml), pids) if pids else []
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
            seen.append((text(nvml.nvmlDeviceGetUUID(handle)), handle))
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
            uuid=text(nvml.nvmlDeviceGetUUID(handle)),
            name=text(nvml.nvmlDeviceGetName(handle)),
            mig=from_mig_id or self._mig_mode(nvml, handle),
        )
        instant = supported(nvml, lambda: self._instant_power_mw(nvml, handle))
        if not instant:
            try:
                nvml.nvmlDeviceGetPowerUsage(handle)
            except nvml.NVMLError as e:
                raise PowerSourceError(
                    f"GPU {info.gpu} ({info.uuid}) gives no power reading: {e}"
                ) from e
        energy = supported(nvml, lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        buffer, last_seen_us = self._probe_buffer(nvml, handle)
        mig = info.mig
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

    def _read_gpu_safe(self, gpu: _Gpu) -> list[PowerSample | ReadError]:
        """One GPU's read; a bug here costs that GPU's read, not the poll."""
        try:
            return self._read_gpu(gpu)
        except Exception:
            _log.exception("power.nvml.read_crashed", gpu=gpu.info.gpu)
            return [ReadError(gpu=gpu.info.gpu, reason="unknown")]

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
        last = len(readings) - 1
        for k, (time_s, power_mw) in enumerate(readings):
            if time_s <= gpu.last_time_s:
                continue  # an instant sample on a clock that did not move: keep strict order
            gpu.last_time_s = time_s
            out.append(  # the newest carries the counter (built once, not copied after)
                PowerSample(time_s, label, power_mw / _MW_PER_W, energy_j if k == last else None)
            )
        if out and energy_j is not None:
            newest = out[-1]
            assert isinstance(newest, PowerSample)
            if newest.energy_j is None:  # the driver's last two samples shared a timestamp
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
        member = value_member(nvml, value_type)
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

    def _timed_out(self, gpu: str) -> ReadError:
        """A read that outlived its deadline; logged once per GPU until a re-init."""
        if (gpu, "timeout") not in self._logged_failures:
            self._logged_failures.add((gpu, "timeout"))
            _log.warning("power.nvml.read_timed_out", gpu=gpu, timeout_s=self._read_timeout_s)
        return ReadError(gpu=gpu, reason="timeout")

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
