"""Incremental, bounded framing of server-sent events and newline-delimited JSON.

Framing is kept apart from meaning (:mod:`sidecar.tracking.protocols` decides
what an event says) because it is where streams go wrong: an event split
across two network chunks, ``\\r\\n`` line endings, a ``\\r`` that arrives
without knowing yet whether a ``\\n`` follows, a single event larger than any
sane buffer. Both splitters hold at most ``max_buffer`` bytes between calls
(plus one pending ``\\r``), whatever the upstream sends, and never raise on
odd input: an oversized event or line is let through unparsed and framing
resumes at the next boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["EventSplitter", "LineSplitter", "Piece", "event_data"]

# SSE accepts all three line terminators; the alternation tries CRLF first.
_EOL: Final = re.compile(rb"\r\n|\r|\n")
_CR: Final = 0x0D
_LF: Final = 0x0A


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of stream bytes, in order, with what may be done with it.

    ``intact`` means the bytes are a whole event (or, at end of stream, the
    whole unterminated remainder) and may be parsed; ``complete`` means the
    event ended with its blank line, so a caller may drop it without leaving
    half an event behind.
    """

    raw: bytes
    intact: bool
    complete: bool


class EventSplitter:
    """Cuts an SSE byte stream into events at blank lines.

    With ``hold`` the splitter keeps an event's bytes until the event is
    complete and hands every byte back exactly once, in order, so the caller
    can forward the stream minus whole events it chose to drop. Without
    ``hold`` the caller forwards its chunks itself and only intact events come
    back, for parsing.
    """

    __slots__ = ("_dirty_line", "_held", "_hold", "_intact", "_line", "_max")

    def __init__(self, max_buffer: int, *, hold: bool) -> None:
        self._max = max(max_buffer, 1)
        self._hold = hold
        self._held = b""  # bytes of the current, unfinished event
        self._line = 0  # offset in _held where the current line starts
        self._dirty_line = False  # the current line had bytes already let go
        self._intact = True  # the current event has not lost any bytes

    def feed(self, chunk: bytes) -> list[Piece]:
        """Frame ``chunk``; returns the pieces it completes (see class doc)."""
        if not chunk:
            return []
        return self._scan(self._held + chunk if self._held else chunk, eof=False)

    def close(self) -> list[Piece]:
        """End of stream: the events a final CR completes, then any unterminated remainder."""
        pieces = self._scan(self._held, eof=True) if self._held else []
        held, intact = self._held, self._intact
        self._held, self._line, self._dirty_line, self._intact = b"", 0, False, True
        if held and (intact or self._hold):
            pieces.append(Piece(held, intact=intact, complete=False))
        return pieces

    def _scan(self, buf: bytes, *, eof: bool) -> list[Piece]:
        """Frame ``buf`` (held bytes first); keeps its unfinished tail, within the cap."""
        if not self._dirty_line and b"\r" not in buf:
            return self._scan_lf(buf)
        return self._scan_any(buf, eof=eof)

    def _scan_any(self, buf: bytes, *, eof: bool) -> list[Piece]:
        """The general scan: any line terminator, a CR at the end left pending."""
        n = len(buf)
        pieces: list[Piece] = []
        start = 0  # start of the current event in buf
        i = self._line  # start of the current line in buf
        dirty = self._dirty_line
        while (m := _EOL.search(buf, i)) is not None:
            end = m.end()
            if not eof and end == n and end - m.start() == 1 and buf[m.start()] == _CR:
                break  # a lone CR at the end may be the first half of CRLF: wait
            if m.start() == i and not dirty:  # an empty line ends the event
                intact = self._intact and end - start <= self._max
                if intact or self._hold:
                    pieces.append(Piece(buf[start:end], intact=intact, complete=True))
                start = end
                self._intact = True
            dirty = False
            i = end
        return self._keep(buf, pieces, start, i, dirty)

    def _scan_lf(self, buf: bytes) -> list[Piece]:
        """:meth:`_scan` for the usual stream (``\\n`` only): events end at ``\\n\\n``.

        One ``bytes.find`` per event instead of a regular expression per line;
        the same pieces as the general scan, which a property test checks.
        """
        pieces: list[Piece] = []
        start = 0
        i = self._line  # a line starts here; every other line start follows a \n
        while True:
            if i < len(buf) and buf[i] == _LF:  # an empty line right at a line start
                end = i + 1
            else:
                j = buf.find(b"\n\n", i)
                if j < 0:
                    break
                end = j + 2
            intact = self._intact and end - start <= self._max
            if intact or self._hold:
                pieces.append(Piece(buf[start:end], intact=intact, complete=True))
            start = i = end
            self._intact = True
        last = buf.rfind(b"\n", start)
        return self._keep(buf, pieces, start, last + 1 if last >= 0 else i, False)

    def _keep(
        self, buf: bytes, pieces: list[Piece], start: int, i: int, dirty: bool
    ) -> list[Piece]:
        """Hold the unfinished event from ``start`` (its current line at ``i``), within the cap."""
        n = len(buf)
        if n - start <= self._max:
            self._held = buf[start:]
            self._line = i - start
            self._dirty_line = dirty
            return pieces
        # Overflow: let go of the event so far, keep only what framing needs.
        keep = 1 if buf[-1] == _CR and i < n else 0  # an unresolved CR ends line i
        if self._hold and n - keep > start:
            pieces.append(Piece(buf[start : n - keep], intact=False, complete=False))
        self._dirty_line = dirty or i < n - keep
        self._held = buf[n - keep :]
        self._line = 0
        self._intact = False
        return pieces

    @property
    def held_bytes(self) -> int:
        """Bytes kept between calls; at most ``max_buffer`` plus one pending CR."""
        return len(self._held)

    @property
    def idle(self) -> bool:
        """Between events with nothing held: a chunk of whole events needs no splitter."""
        return not self._held and self._intact


class LineSplitter:
    """Cuts newline-delimited JSON into lines, for parsing only.

    The caller forwards chunks itself; lines longer than ``max_buffer`` are
    dropped from parsing and framing resumes after their newline.
    """

    __slots__ = ("_held", "_max", "_skipping")

    def __init__(self, max_buffer: int) -> None:
        self._max = max(max_buffer, 1)
        self._held = b""
        self._skipping = False  # inside an oversized line

    def feed(self, chunk: bytes) -> list[bytes]:
        """Frame ``chunk``; returns the complete lines (without their ``\\n``)."""
        if not chunk:
            return []
        lines: list[bytes] = []
        pos = 0
        held = self._held
        while (nl := chunk.find(b"\n", pos)) != -1:
            if self._skipping:
                self._skipping = False
            else:
                line = held + chunk[pos:nl] if held else chunk[pos:nl]
                if len(line) <= self._max:
                    lines.append(line)
            held = b""
            pos = nl + 1
        if not self._skipping:
            rest = len(held) + len(chunk) - pos
            if rest <= self._max:
                held = held + chunk[pos:] if held else chunk[pos:]
            else:
                held, self._skipping = b"", True
        self._held = held
        return lines

    def close(self) -> list[bytes]:
        """End of stream: the last line if it had no newline."""
        held, skipping = self._held, self._skipping
        self._held, self._skipping = b"", False
        return [held] if held and not skipping else []

    @property
    def held_bytes(self) -> int:
        """Bytes kept between calls; at most ``max_buffer``."""
        return len(self._held)


def event_data(raw: bytes) -> bytes | None:
    """The joined ``data`` field of one raw SSE event, or ``None`` when it has none.

    Per the SSE spec: one space after the colon is dropped, several ``data``
    lines join with ``\\n``, comments (``:``) and other fields are ignored.
    """
    # the usual event, one `data: ` line and its blank line, without splitting lines
    one_line = raw.startswith(b"data: ") and raw.find(b"\n", 6) == len(raw) - 2
    if one_line and raw.endswith(b"\n\n") and b"\r" not in raw:
        return raw[6:-2]
    data: list[bytes] = []
    for line in _EOL.split(raw):
        if not line.startswith(b"data"):
            continue
        if len(line) == 4:
            data.append(b"")
        elif line[4] == 0x3A:  # ":"
            value = line[5:]
            data.append(value[1:] if value[:1] == b" " else value)
    return b"\n".join(data) if data else None
