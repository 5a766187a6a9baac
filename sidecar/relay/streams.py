"""A body in flight: bytes one connection's parser fed, read by one task.

The relay's counterpart of aiohttp's ``StreamReader``, with only what the
proxy uses (``readany``, ``read(n)``, ``iter_any``, ``at_eof``). Its one job
besides handing bytes over is flow control: the connection is paused while
more than :data:`HIGH_BYTES` wait unread, and resumed once they are read, so a
fast sender costs a bounded buffer, never its whole body. A read that waits
longer than the stream's timeout raises :class:`TimeoutError` (the upstream's
read timeout; a client's body has none). One timer serves the whole stream (it
checks, when it fires, whether bytes came since), not one per read: a stream of
hundreds of chunks costs the event loop's timer heap one entry at a time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Final

HIGH_BYTES: Final = 128 << 10
"""Unread bytes above which the connection stops reading (aiohttp's reader: 128 KiB too)."""
LOW_BYTES: Final = 64 << 10
"""Unread bytes at or below which a paused connection reads again."""


class BodyStream:
    """Bytes in arrival order with an end, an error, or more to come."""

    __slots__ = (
        "_chunks",
        "_eof",
        "_exc",
        "_fed_at",
        "_loop",
        "_pause",
        "_paused",
        "_resume",
        "_size",
        "_timeout_s",
        "_timer",
        "_waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pause: Callable[[], None],
        resume: Callable[[], None],
        *,
        timeout_s: float | None = None,
    ) -> None:
        self._loop = loop
        self._pause, self._resume = pause, resume
        self._timeout_s = timeout_s
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._fed_at = 0.0  # loop time of the last bytes (or of the wait's start)
        self._timer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------- the writer
    def feed(self, data: bytes) -> None:
        if self._timer is not None:
            self._fed_at = self._loop.time()
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_BYTES and not self._paused:
            self._paused = True
            self._pause()
        waiter = self._waiter  # _wake, inline: this runs for every chunk
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def feed_eof(self) -> None:
        self._eof = True
        self._stop_timer()
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        """The connection failed before the end: the reader gets ``exc`` once the bytes run out."""
        if not self._eof:
            self._exc = exc
            self._stop_timer()
            self._wake()

    @property
    def finished(self) -> bool:
        """Whether the writer is done (end or error), read or not."""
        return self._eof or self._exc is not None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ----------------------------------------------------------- the reader
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def readany(self) -> bytes:
        """Everything buffered (at least one byte), or ``b""`` at the end.

        The wait and the flow control are written out here, not called: this
        runs for every chunk, and every call level costs on each one.
        """
        chunks = self._chunks
        while not chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            waiter = self._loop.create_future()
            self._waiter = waiter
            if self._timeout_s is not None and self._timer is None:
                self._fed_at = self._loop.time()
                self._timer = self._loop.call_at(self._fed_at + self._timeout_s, self._check)
            try:
                await waiter
            finally:
                self._waiter = None
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        if chunks:
            chunks.clear()
        self._size -= len(data)
        if self._paused and self._size <= LOW_BYTES:
            self._paused = False
            self._resume()
        return data

    async def read(self, n: int) -> bytes:
        """At most ``n`` bytes (fewer if that is what is buffered), ``b""`` at the end."""
        data = await self.readany()
        if len(data) > n:
            self._chunks.appendleft(data[n:])
            self._size += len(data) - n
            data = data[:n]
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        while True:
            data = await self.readany()
            if not data:
                return
            yield data

    def _check(self) -> None:
        """The timer fired: expire a wait that saw no bytes for the timeout, else look again later."""
        self._timer = None
        assert self._timeout_s is not None
        due = self._fed_at + self._timeout_s
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait starts its own timer
        if self._loop.time() >= due:
            waiter.set_exception(TimeoutError("upstream read timed out"))
        else:
            self._timer = self._loop.call_at(due, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
