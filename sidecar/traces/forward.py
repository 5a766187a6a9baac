"""Sends OTLP export bodies on to the user's collector, off the receiver's path.

The receiver only queues: its answer to the model server never waits on the collector.
The queue is bounded in bodies and in bytes; when it is full the body is dropped and
counted (``dropped``), never the server's export slowed or failed. Bodies go out
byte for byte, with the Content-Type and Content-Encoding they came with (aiohttp adds
no compression of its own unless asked). A failed send is counted, not retried: the
server's own exporter retries only against us, and a second copy would be worse than a
gap in a collector that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Final, Literal

import aiohttp
import structlog

log = structlog.get_logger("sidecar.traces.forward")

ForwardResult = Literal["sent", "dropped", "failed"]
FORWARD_RESULTS: Final[tuple[ForwardResult, ...]] = ("sent", "dropped", "failed")
TRACES_PATH: Final = "/v1/traces"


def traces_url(url: str) -> str:
    """The collector's URL; a bare ``http://host:4318`` gets OTLP's ``/v1/traces``."""
    scheme, sep, rest = url.partition("://")
    if sep and "/" not in rest.rstrip("/"):
        return f"{scheme}://{rest.rstrip('/')}{TRACES_PATH}"
    return url


class Forwarder:
    """A bounded queue of bodies and the workers that post them to one URL."""

    def __init__(
        self,
        url: str,
        *,
        max_queued: int = 512,
        max_queued_bytes: int = 64 * 1024 * 1024,
        workers: int = 4,
        timeout_s: float = 10.0,
        name: str = "otlp-forward",
    ) -> None:
        self.url = traces_url(url)
        self.results: Counter[ForwardResult] = Counter()
        self._queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue(max_queued)
        self._max_bytes = max_queued_bytes
        self._queued_bytes = 0
        self._workers = workers
        self._timeout_s = timeout_s
        self._name = name
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failures_logged = 0

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            auto_decompress=False,
        )
        self._tasks = [
            asyncio.create_task(self._work(), name=f"{self._name}-{i}")
            for i in range(self._workers)
        ]

    def submit(
        self, body: bytes, content_type: str | None, content_encoding: str | None = None
    ) -> bool:
        """Queue ``body`` for sending; False (and counted as dropped) when the queue is full."""
        if self._queued_bytes + len(body) > self._max_bytes or self._queue.full():
            self.results["dropped"] += 1
            return False
        headers = {"Content-Type": content_type or "application/x-protobuf"}
        if content_encoding:
            headers["Content-Encoding"] = content_encoding
        self._queue.put_nowait((body, headers))
        self._queued_bytes += len(body)
        return True

    async def drain(self) -> None:
        """Waits until every queued body has been sent or has failed (tests, shutdown)."""
        await self._queue.join()

    async def close(self, drain_s: float = 2.0) -> None:
        """Gives queued bodies ``drain_s`` to go out, then stops the workers."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), drain_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _work(self) -> None:
        while True:
            body, headers = await self._queue.get()
            try:
                await self._send(body, headers)
            finally:
                self._queued_bytes -= len(body)
                self._queue.task_done()

    async def _send(self, body: bytes, headers: dict[str, str]) -> None:
        assert self._session is not None
        try:
            async with self._session.post(self.url, data=body, headers=headers) as r:
                await r.read()
                ok = r.status < 300
                detail = str(r.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            ok, detail = False, type(e).__name__
        except Exception as e:  # anything else must not end this sender for good
            log.exception("otlp.forward_fault", url=self.url, queue=self._name)
            ok, detail = False, type(e).__name__
        self.results["sent" if ok else "failed"] += 1
        if not ok and self._failures_logged < 5:  # a collector that is down: say so, not forever
            self._failures_logged += 1
            log.warning("otlp.forward_failed", url=self.url, detail=detail, queue=self._name)
