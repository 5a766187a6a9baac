"""Trace files: the power and requests CSVs of CONTRACT.md, read and written.

One module serves ``attribute`` (reading), ``replay:`` (reading) and
``--record`` (appending), so a recorded run attributes offline exactly as it
did live. Reading is strict: the first bad cell stops with one line naming
the file, the line and the column, because a silently skipped row would
shift energy between requests.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from sidecar.ledger import STATUSES, FinishedRequest, Status

POWER_COLUMNS: Final = ("time_s", "gpu", "power_w", "energy_j")
REQUEST_COLUMNS: Final = (
    "id",
    "model",
    "start_s",
    "end_s",
    "first_token_s",
    "prompt_tokens",
    "completion_tokens",
    "status",
    "cached_tokens",
)
"""CONTRACT.md's columns, then ``cached_tokens`` (prompt tokens the server read from its
prefix cache): an extra column, which the contract lets readers ignore."""
_POWER_REQUIRED: Final = POWER_COLUMNS[:3]
_REQUEST_REQUIRED: Final = REQUEST_COLUMNS[:4]


class TraceError(ValueError):
    """A trace file cannot be read; the message names file, line and column."""


@dataclass(frozen=True, slots=True)
class PowerRow:
    time_s: float
    gpu: str
    power_w: float
    energy_j: float | None


@dataclass(frozen=True, slots=True)
class RequestRow:
    id: str
    model: str
    start_s: float
    end_s: float
    first_token_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    status: Status
    cached_tokens: int | None = None


class _Rows:
    """Iterates a CSV with a header, keeping the file name and line for errors."""

    def __init__(self, path: Path, required: tuple[str, ...]) -> None:
        self.path = path
        self.required = required

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        try:
            handle = self.path.open(newline="", encoding="utf-8")
        except OSError as e:
            raise TraceError(f"{self.path}: cannot open: {e.strerror or e}") from e
        with handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames
            if not header:
                raise TraceError(f"{self.path}: empty file (expected a header row)")
            names = [h.strip() for h in header]
            for col in self.required:
                if col not in names:
                    raise TraceError(f"{self.path}: line 1, column {col}: missing from the header")
            reader.fieldnames = names
            any_row = False
            for row in reader:
                any_row = True
                if None in row:
                    raise TraceError(
                        f"{self.path}: line {reader.line_num}: more cells than columns"
                    )
                yield reader.line_num, row
            if not any_row:
                raise TraceError(f"{self.path}: no data rows after the header")

    def fail(self, line: int, column: str, problem: str) -> TraceError:
        return TraceError(f"{self.path}: line {line}, column {column}: {problem}")

    def number(self, line: int, row: dict[str, str], column: str) -> float:
        raw = (row.get(column) or "").strip()
        if not raw:
            raise self.fail(line, column, "empty")
        try:
            value = float(raw)
        except ValueError:
            raise self.fail(line, column, f"{raw!r} is not a number") from None
        if not math.isfinite(value):
            raise self.fail(line, column, f"{raw!r} is not a finite number")
        return value

    def optional_number(self, line: int, row: dict[str, str], column: str) -> float | None:
        if not (row.get(column) or "").strip():
            return None
        return self.number(line, row, column)

    def optional_count(self, line: int, row: dict[str, str], column: str) -> int | None:
        value = self.optional_number(line, row, column)
        if value is None:
            return None
        if value < 0 or value != int(value):
            raise self.fail(line, column, f"{row[column].strip()!r} is not a token count")
        return int(value)

    def text(self, line: int, row: dict[str, str], column: str) -> str:
        raw = (row.get(column) or "").strip()
        if not raw:
            raise self.fail(line, column, "empty")
        return raw


def read_power(path: Path) -> list[PowerRow]:
    """All rows of a power CSV, validated."""
    rows = _Rows(path, _POWER_REQUIRED)
    out: list[PowerRow] = []
    for line, row in rows:
        power = rows.number(line, row, "power_w")
        if power < 0:
            raise rows.fail(line, "power_w", f"{power} is negative")
        energy = rows.optional_number(line, row, "energy_j")
        out.append(
            PowerRow(rows.number(line, row, "time_s"), rows.text(line, row, "gpu"), power, energy)
        )
    return out


def read_requests(path: Path) -> list[RequestRow]:
    """All rows of a requests CSV, validated (end after start, known status, unique ids)."""
    rows = _Rows(path, _REQUEST_REQUIRED)
    out: list[RequestRow] = []
    seen: set[str] = set()
    for line, row in rows:
        rid = rows.text(line, row, "id")
        if rid in seen:
            raise rows.fail(line, "id", f"{rid!r} appears twice")
        seen.add(rid)
        start = rows.number(line, row, "start_s")
        end = rows.number(line, row, "end_s")
        if end < start:
            raise rows.fail(line, "end_s", f"{end} is before start_s {start}")
        first = rows.optional_number(line, row, "first_token_s")
        if first is not None and not start <= first <= end:
            raise rows.fail(line, "first_token_s", f"{first} is outside [start_s, end_s]")
        status = (row.get("status") or "ok").strip() or "ok"
        if status not in STATUSES:
            raise rows.fail(line, "status", f"{status!r} is not one of {', '.join(STATUSES)}")
        prompt = rows.optional_count(line, row, "prompt_tokens")
        cached = rows.optional_count(line, row, "cached_tokens")
        if cached is not None and (prompt is None or cached > prompt):
            raise rows.fail(line, "cached_tokens", f"{cached} is more than prompt_tokens")
        out.append(
            RequestRow(
                id=rid,
                model=(row.get("model") or "").strip() or "default",
                start_s=start,
                end_s=end,
                first_token_s=first,
                prompt_tokens=prompt,
                completion_tokens=rows.optional_count(line, row, "completion_tokens"),
                status=status,
                cached_tokens=cached,
            )
        )
    return out


def _fmt(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return repr(round(value, 6))


class TraceRecorder:
    """Appends power samples and finished requests to ``DIR/power.csv`` and ``DIR/requests.csv``.

    Times go out on the wall clock: the monotonic clock plus one offset taken
    at start, so appended runs stay ordered and both files share one clock.
    """

    def __init__(self, directory: Path, *, wall_offset_s: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._offset_s = wall_offset_s
        self._power, _ = self._open(directory / "power.csv", POWER_COLUMNS)
        self._requests, header = self._open(directory / "requests.csv", REQUEST_COLUMNS)
        # a file begun by an earlier version keeps its columns: rows must match its header
        self._cached_column = "cached_tokens" in header
        self._power_csv = csv.writer(self._power, lineterminator="\n")
        self._requests_csv = csv.writer(self._requests, lineterminator="\n")

    @staticmethod
    def _open(path: Path, header: tuple[str, ...]) -> tuple[IO[str], list[str]]:
        """The file opened to append, and the columns its header names."""
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            with path.open(newline="", encoding="utf-8") as f:
                first = next(csv.reader(f), [])
            columns = [c.strip() for c in first]
        handle = path.open("a", newline="", encoding="utf-8")
        if fresh:
            handle.write(",".join(header) + "\n")
            columns = list(header)
        return handle, columns

    def power(self, time_s: float, gpu: str, power_w: float, energy_j: float | None) -> None:
        self._power_csv.writerow(
            (_fmt(time_s + self._offset_s), gpu, _fmt(power_w), _fmt(energy_j))
        )

    def request(self, r: FinishedRequest) -> None:
        self._requests_csv.writerow(
            (
                r.id,
                r.model,
                _fmt(r.start_s + self._offset_s),
                _fmt(r.end_s + self._offset_s),
                _fmt(None if r.first_token_s is None else r.first_token_s + self._offset_s),
                _fmt(r.prompt_tokens),
                _fmt(r.completion_tokens),
                r.status,
                *((_fmt(r.cached_tokens),) if self._cached_column else ()),
            )
        )

    def flush(self) -> None:
        self._power.flush()
        self._requests.flush()

    def close(self) -> None:
        for handle in (self._power, self._requests):
            if not handle.closed:
                handle.flush()
                handle.close()
