"""Which GPUs the sidecar meters: ``--gpus``, the visibility variables, and discovery.

The sidecar meters the GPUs it is told about and nothing else. Getting that set
wrong is the costliest mistake it can make: metering a whole node books other
workloads' energy to the model. So the rules live here as pure functions over
an environment mapping, and only :func:`gpu_env` reads ``os.environ``.

Semantics honoured:

* ``NVIDIA_VISIBLE_DEVICES`` is read by the NVIDIA container runtime *before*
  the sidecar starts: by the time NVML runs, its view already honours it. The
  sidecar therefore never filters by it; it only reads it to know what the
  runtime was asked for. ``all`` means the whole node (the guard below), while
  ``none``, ``void`` and empty mean no GPU was exposed (an error hint).
* ``CUDA_VISIBLE_DEVICES`` only hides GPUs from CUDA; NVML ignores it. When it
  is set in the sidecar's container and ``--gpus`` is not, the sidecar applies
  it itself, with CUDA's rules: a comma list of indices, ``GPU-`` UUIDs (or
  unique prefixes) and ``MIG-`` ids, read up to the first invalid entry; an
  empty value or a leading invalid entry (``-1``) hides every GPU. Indices are
  taken as NVML indices; CUDA's default order (fastest first) can differ from
  NVML's PCI order, so prefer UUIDs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sidecar.power.base import PowerSourceError

__all__ = [
    "VisibleDevices",
    "foreign_pids",
    "gpu_env",
    "gpus_used_by",
    "is_gpu_selector",
    "no_gpu_hint",
    "parse_cuda_visible_devices",
    "parse_gpu_list",
    "parse_nvidia_visible_devices",
    "select_gpus",
]

NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

# An NVML index, a GPU UUID or a prefix of one (CUDA accepts prefixes), or a MIG id in
# either the current form (MIG-<uuid>) or the pre-R470 one (MIG-GPU-<uuid>/<gi>/<ci>).
_SELECTOR = re.compile(r"\d+|GPU-[0-9A-Fa-f-]+|MIG-[0-9A-Za-z-]+(/\d+/\d+)?")

VisibleKind = Literal["unset", "all", "none", "void", "list"]


@dataclass(frozen=True, slots=True)
class VisibleDevices:
    """A visibility variable as read: what kind of value, and the devices listed.

    ``devices`` is filled only for ``kind == "list"``; it may be empty for
    ``CUDA_VISIBLE_DEVICES``, which then hides every GPU.
    """

    kind: VisibleKind
    devices: tuple[str, ...] = ()


def is_gpu_selector(value: str) -> bool:
    """Whether ``value`` names a GPU the way NVML and CUDA accept: index, UUID or MIG id."""
    return _SELECTOR.fullmatch(value) is not None


def parse_gpu_list(value: str) -> tuple[str, ...]:
    """Parse ``--gpus`` ("0,2" or "GPU-…,GPU-…") into selectors, in the order given.

    Raises ``ValueError`` naming the bad entry, so the settings layer can turn it
    into its one-line start-up error. A repeated entry is refused rather than
    dropped: ``--idle-watts`` may list one value per GPU in ``--gpus`` order, and
    a silently shortened list would pair the values with the wrong GPUs.
    """
    entries = [entry.strip() for entry in value.split(",")]
    if not any(entries):
        raise ValueError("empty GPU list: give indices or UUIDs, comma separated")
    selected: list[str] = []
    for entry in entries:
        if not entry:
            raise ValueError(f"empty entry in GPU list {value!r}")
        if not is_gpu_selector(entry):
            raise ValueError(
                f"{entry!r} is not a GPU index, GPU- UUID or MIG- id (in GPU list {value!r})"
            )
        if entry in selected:
            raise ValueError(f"GPU {entry} is listed twice (in GPU list {value!r})")
        selected.append(entry)
    return tuple(selected)


def parse_nvidia_visible_devices(value: str | None) -> VisibleDevices:
    """Read ``NVIDIA_VISIBLE_DEVICES`` with the container toolkit's meaning.

    Empty behaves like ``void`` in the toolkit (not a GPU container). List
    entries are kept as written: indices there are the *node's*, already
    applied by the runtime, so they are not NVML indices inside the container.
    """
    if value is None:
        return VisibleDevices("unset")
    text = value.strip()
    if text in ("", "void"):
        return VisibleDevices("void")
    if text == "all":
        return VisibleDevices("all")
    if text == "none":
        return VisibleDevices("none")
    return VisibleDevices("list", tuple(e.strip() for e in text.split(",") if e.strip()))


def parse_cuda_visible_devices(value: str | None) -> VisibleDevices:
    """Read ``CUDA_VISIBLE_DEVICES`` as CUDA does: entries up to the first invalid one.

    ``"0,2"`` gives two devices, ``"1,x,2"`` only ``1``; ``""`` and ``"-1"``
    give an empty list (every GPU hidden), reported as ``kind="none"``.
    """
    if value is None:
        return VisibleDevices("unset")
    devices: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not is_gpu_selector(entry):
            break
        devices.append(entry)
    if not devices:
        return VisibleDevices("none")
    return VisibleDevices("list", tuple(devices))


def select_gpus(
    gpus: Sequence[str] | None, env: Mapping[str, str], visible_count: int
) -> tuple[str, ...] | None:
    """Decide which GPUs to meter; ``None`` means every GPU NVML sees.

    ``gpus`` is ``--gpus`` (already parsed) and wins over the environment.
    ``visible_count`` is how many GPUs NVML sees in this container.

    Raises :class:`PowerSourceError` (one line, for the user) when

    * ``NVIDIA_VISIBLE_DEVICES=all`` exposes more than one GPU and ``--gpus`` is
      absent: the sidecar would meter the whole node, other tenants included;
    * ``CUDA_VISIBLE_DEVICES`` hides every GPU.
    """
    if gpus:
        return tuple(gpus)
    nvidia = parse_nvidia_visible_devices(env.get(NVIDIA_VISIBLE_DEVICES))
    if nvidia.kind == "all" and visible_count > 1:
        raise PowerSourceError(
            f"NVIDIA_VISIBLE_DEVICES=all shows all {visible_count} GPUs of this node, and "
            "metering them all would count other workloads' energy: pass --gpus with the "
            "model's GPU UUIDs (the model container's NVIDIA_VISIBLE_DEVICES)"
        )
    cuda_value = env.get(CUDA_VISIBLE_DEVICES)
    cuda = parse_cuda_visible_devices(cuda_value)
    if cuda.kind == "none":
        raise PowerSourceError(
            f"CUDA_VISIBLE_DEVICES={cuda_value!r} hides every GPU: unset it in the "
            "sidecar's container or pass --gpus"
        )
    if cuda.kind == "list":
        return cuda.devices
    return None


def no_gpu_hint(env: Mapping[str, str]) -> str:
    """Why NVML may see no GPU, from what the runtime was asked for; empty if nothing to add."""
    nvidia = parse_nvidia_visible_devices(env.get(NVIDIA_VISIBLE_DEVICES))
    if nvidia.kind in ("none", "void", "unset"):
        shown = env.get(NVIDIA_VISIBLE_DEVICES)
        setting = "unset" if shown is None else repr(shown)
        return (
            f"NVIDIA_VISIBLE_DEVICES is {setting}, so the runtime exposed no GPU; "
            "use --power-source dcgm:URL where the sidecar cannot see the GPU"
        )
    return ""


def gpu_env() -> dict[str, str]:
    """The visibility variables of this process: the one place that reads ``os.environ``."""
    return {
        name: os.environ[name]
        for name in (NVIDIA_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES)
        if name in os.environ
    }


def gpus_used_by(
    processes: Iterable[tuple[str, Iterable[int]]], pids: Collection[int]
) -> list[str]:
    """UUIDs of the GPUs on which any of ``pids`` runs, in NVML's order, without repeats.

    ``processes`` is NVML's running-process view, one ``(gpu_uuid, pids)`` per
    GPU; ``pids`` the model's processes, seen through a shared process
    namespace. Best effort: many drivers report PIDs of the host's namespace,
    which then match nothing, and the caller must ask for ``--gpus`` instead.
    """
    wanted = set(pids)
    found: list[str] = []
    for uuid, gpu_pids in processes:
        if uuid not in found and not wanted.isdisjoint(gpu_pids):
            found.append(uuid)
    return found


def foreign_pids(
    proc_root: Path = Path("/proc"), *, own_pids: Collection[int] | None = None
) -> set[int]:
    """PIDs under ``proc_root`` other than ours: the model's, in a shared process namespace.

    With ``shareProcessNamespace: true`` the pod's containers see each other's
    processes; the sidecar itself is excluded (``own_pids``, default this
    process). Processes that vanish while scanning simply do not appear.
    """
    own = {os.getpid()} if own_pids is None else set(own_pids)
    try:
        entries = list(proc_root.iterdir())
    except OSError:
        return set()
    return {int(p.name) for p in entries if p.name.isdigit() and int(p.name) not in own}
