"""``DIR/run.json``: what a recording's report needs to know that the CSVs do not say.

The power and requests files carry joules and tokens; the boundary (which GPUs)
and the carbon inputs (intensity with its source at every refresh, PUE, embodied
assumptions) live here, so a report of a recording states them instead of
guessing. One entry per start of ``run --record DIR``, appended; the file is
rewritten whole (to a temporary file, then renamed) so a crash never leaves half
a document. It stays small: one line per intensity change, a few per start.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from sidecar import __version__
from sidecar.carbon import CarbonIntensityTracker, EmbodiedModel
from sidecar.carbon.emissions import gpu_embodied_default
from sidecar.carbon.intensity import Intensity
from sidecar.config import Settings
from sidecar.power.base import GpuInfo

log = structlog.get_logger("sidecar.report.runinfo")

RUN_FILE: Final = "run.json"
FORMAT: Final = "llm-energy-sidecar/run/v1"
MAX_INTENSITY_ENTRIES: Final = 10_000
"""Per start: at the default 5-minute refresh, a month of changes."""


class RunInfoError(ValueError):
    """``run.json`` cannot be read; the message names the file and what is wrong."""


def rfc3339(time_s: float) -> str:
    """Unix seconds as an RFC 3339 UTC time with millisecond precision."""
    return (
        datetime.fromtimestamp(time_s, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class RunInfoRecorder:
    """Appends this start to ``DIR/run.json`` and records every intensity change.

    ``clock`` is wall-clock Unix seconds (the recording's time base), injected so
    tests can pin it.
    """

    def __init__(
        self,
        directory: Path,
        start: dict[str, Any],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = directory / RUN_FILE
        self._clock = clock
        now = clock()
        self._start: dict[str, Any] = {
            "started_s": now,
            "started_at": rfc3339(now),
            "version": __version__,
        }
        self._start.update(start)
        self._start.setdefault("intensity", [])
        self._earlier = self._read_existing()
        self._write()

    @property
    def path(self) -> Path:
        return self._path

    def intensity(self, grams_per_kwh: float, source: str, region: str, basis: str) -> None:
        """The intensity now in force (at start and at each refresh that changed it)."""
        entries: list[dict[str, Any]] = self._start["intensity"]
        now = self._clock()
        entry = {
            "time_s": now,
            "at": rfc3339(now),
            "grams_per_kwh": grams_per_kwh,
            "source": source,
            "region": region,
            "basis": basis,
        }
        if entries and all(entries[-1][k] == entry[k] for k in ("grams_per_kwh", "source")):
            return  # an unchanged refresh adds nothing a report could use
        if len(entries) >= MAX_INTENSITY_ENTRIES:
            return
        entries.append(entry)
        self._write()

    def _read_existing(self) -> list[dict[str, Any]]:
        if not self._path.exists():
            return []
        try:
            return read_run_info(self._path)
        except RunInfoError as e:
            # Keep the unreadable file for a person to look at; never lose a recording's context.
            aside = self._path.with_name(f"{RUN_FILE}.unreadable-{int(self._clock())}")
            os.replace(self._path, aside)
            log.warning(
                "runinfo.unreadable", path=str(self._path), moved_to=str(aside), error=str(e)
            )
            return []

    def _write(self) -> None:
        doc = {"format": FORMAT, "runs": [*self._earlier, self._start]}
        tmp = self._path.with_name(f".{RUN_FILE}.tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, self._path)
        except OSError as e:  # a full disk must not stop metering; the CSVs carry the joules
            log.warning("runinfo.write_failed", path=str(self._path), error=str(e))


def read_run_info(path: Path) -> list[dict[str, Any]]:
    """The starts recorded in ``path``, oldest first, validated enough to rely on."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunInfoError(f"{path}: cannot open: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise RunInfoError(f"{path}: not JSON: {e.msg} at line {e.lineno}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise RunInfoError(f'{path}: expected an object with a "runs" list')
    runs: list[dict[str, Any]] = []
    for i, run in enumerate(doc["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("started_s"), int | float):
            raise RunInfoError(f"{path}: runs[{i}]: expected an object with started_s")
        intensity = run.get("intensity", [])
        if not isinstance(intensity, list) or not all(
            isinstance(e, dict)
            and isinstance(e.get("time_s"), int | float)
            and isinstance(e.get("grams_per_kwh"), int | float)
            for e in intensity
        ):
            raise RunInfoError(f"{path}: runs[{i}].intensity: expected time_s and grams_per_kwh")
        runs.append(run)
    return runs


def start_entry(
    *,
    gpus: Sequence[tuple[str, str, str]],
    region: str | None,
    carbon_provider: str,
    pue: float,
    embodied: dict[str, Any],
    power_source: str,
    mode: str,
    boundary: str,
) -> dict[str, Any]:
    """The fixed part of one start: GPUs as (index, UUID, name), region, PUE, embodied."""
    return {
        "gpus": [{"index": g, "uuid": u, "name": n} for g, u, n in gpus],
        "region": region,
        "carbon_provider": carbon_provider,
        "pue": pue,
        "embodied": embodied,
        "power_source": power_source,
        "mode": mode,
        "boundary": boundary,
    }


def record_start(
    directory: Path,
    *,
    settings: Settings,
    gpus: Sequence[GpuInfo],
    embodied: EmbodiedModel,
    carbon: CarbonIntensityTracker,
    boundary: str,
) -> RunInfoRecorder:
    """``run --record DIR``: append this start and follow the intensity from now on."""
    gpu_source = (
        "--gpu-embodied-kg"
        if settings.gpu_embodied_kg is not None
        else gpu_embodied_default(gpus[0].name).source
    )
    entry = start_entry(
        gpus=[(g.gpu, g.uuid, g.name) for g in gpus],
        region=settings.region,
        carbon_provider=settings.carbon_provider,
        pue=settings.pue,
        embodied={
            "gpus": embodied.gpus,
            "gpu_embodied_kg": embodied.gpu_embodied_kg,
            "gpu_embodied_source": gpu_source,
            "host_embodied_kg": embodied.host_embodied_kg,
            "host_share": embodied.host_share,
            "lifetime_years": embodied.lifetime_years,
            "utilisation": embodied.utilisation,
            "grams_per_second": embodied.grams_per_second,
        },
        power_source=settings.power_source.split(":", 1)[0],
        mode=settings.mode,
        boundary=boundary,
    )
    recorder = RunInfoRecorder(directory, entry)

    def follow(i: Intensity) -> None:
        recorder.intensity(i.g_per_kwh, i.source, i.region, i.basis)

    follow(carbon.current)
    carbon.subscribe(follow)
    return recorder
