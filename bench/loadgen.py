"""The load generator, in a process of its own so its CPU is nobody's figure.

``python -m bench.loadgen`` reads one JSON command per line on stdin and
answers one JSON line on stdout, so the orchestrator can read the proxies'
CPU counters right before and right after each load:

* ``{"cmd": "load", "url", "n", "concurrency", "stream", "max_tokens", "delay"}``:
  ``n`` requests, ``concurrency`` at a time, each read to its last byte;
  answers ``{"ok", "errors", "elapsed_s"}``.
* ``{"cmd": "latency", "targets": {name: url}, "rounds", "concurrency", "stagger_s", ...}``:
  per round, ``concurrency`` workers stream to each target in turn (interleaved:
  direct, nginx, proxy, direct, ...). Burst: one stream each, all at once.
  Steady (``per_worker`` > 1): the workers start spread over ``stagger_s``
  (one stream's duration) and each runs ``per_worker`` streams back to back,
  so ``concurrency`` streams are in flight throughout; each worker's first
  stream (the ramp) is not counted. Answers each stream's total time, by target.
* ``{"cmd": "quit"}``.

One keep-alive session per target, created once, so connection set-up is
not in the figures (it is not in a deployed proxy's steady state either).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

PROMPT = "Summarise the energy cost of serving a large language model. " * 4


def body(*, stream: bool, max_tokens: int, delay: float) -> bytes:
    doc: dict[str, Any] = {
        "model": "bench-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        doc["stream_options"] = {"include_usage": True}
    if delay:
        doc["delay"] = delay
    return json.dumps(doc).encode()


class Client:
    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int], aiohttp.ClientSession] = {}

    def session(self, url: str, concurrency: int) -> aiohttp.ClientSession:
        key = (url.split("/v1/", 1)[0], concurrency)
        s = self._sessions.get(key)
        if s is None:
            connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
            s = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))
            self._sessions[key] = s
        return s

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()

    async def one(
        self, session: aiohttp.ClientSession, url: str, payload: bytes, stream: bool
    ) -> float | None:
        """Total time of one request, first byte sent to last byte read; ``None`` on error."""
        t0 = time.perf_counter()
        try:
            async with session.post(
                url, data=payload, headers={"Content-Type": "application/json"}
            ) as r:
                data = await r.read()
                if r.status != 200:
                    return None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        if stream and not data.endswith(b"data: [DONE]\n\n"):
            return None
        return time.perf_counter() - t0

    async def load(self, cmd: dict[str, Any]) -> dict[str, Any]:
        url, n, conc = str(cmd["url"]), int(cmd["n"]), int(cmd["concurrency"])
        stream = bool(cmd.get("stream", True))
        mixed = bool(cmd.get("mixed", False))  # alternate streamed and plain requests
        payloads = [
            body(
                stream=s,
                max_tokens=int(cmd.get("max_tokens", 20)),
                delay=float(cmd.get("delay", 0)),
            )
            for s in (True, False)
        ]
        session = self.session(url, conc)
        counter = iter(range(n))
        ok = errors = 0

        async def worker() -> None:
            nonlocal ok, errors
            for i in counter:
                s = (i % 2 == 0) if mixed else stream
                took = await self.one(session, url, payloads[0 if s else 1], s)
                if took is None:
                    errors += 1
                else:
                    ok += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return {"ok": ok, "errors": errors, "elapsed_s": time.perf_counter() - t0}

    async def latency(self, cmd: dict[str, Any]) -> dict[str, Any]:
        targets: dict[str, str] = dict(cmd["targets"])
        conc, rounds = int(cmd["concurrency"]), int(cmd["rounds"])
        payload = body(
            stream=True, max_tokens=int(cmd.get("max_tokens", 20)), delay=float(cmd.get("delay", 0))
        )
        stagger_s = float(cmd.get("stagger_s", 0.0))
        per_worker = int(cmd.get("per_worker", 1))
        times: dict[str, list[float]] = {name: [] for name in targets}
        errors: dict[str, int] = dict.fromkeys(targets, 0)

        async def worker(i: int, session: aiohttp.ClientSession, url: str) -> list[float | None]:
            if stagger_s:
                await asyncio.sleep(stagger_s * i / conc)
            got = [await self.one(session, url, payload, True) for _ in range(per_worker)]
            # In steady mode each worker's first stream ran while the others ramped up: drop it.
            return got[1:] if per_worker > 1 else got

        for _ in range(rounds):
            for name, url in targets.items():
                session = self.session(url, conc)
                per = await asyncio.gather(*(worker(i, session, url) for i in range(conc)))
                for t in (x for got in per for x in got):
                    if t is None:
                        errors[name] += 1
                    else:
                        times[name].append(t)
                await asyncio.sleep(float(cmd.get("pause_s", 0.2)))
        return {"times_s": times, "errors": errors}


async def serve() -> None:
    client = Client()
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                return
            handler = client.load if cmd["cmd"] == "load" else client.latency
            result = await handler(cmd)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(serve())
