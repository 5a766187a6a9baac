"""Where a burst of streams waits: first byte or last, through each path.

``python -m bench.burst_probe [--rounds 6] [--streams 100]`` sends
``--streams`` streamed requests at one instant (one connection each, kept
alive across rounds) to the stand-in upstream directly, through the sidecar on
each data plane and through the bare httptools relay, path after path, round
after round. Per stream it takes the time to the response's first body byte
and to its last; per path and round, the median of each minus the direct
path's in the same round. A burst that queues on per-request set-up (parsing,
metering calls, upstream writes) shows as added time to first byte; one that
queues on the relaying of chunks shows only at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.common import median  # noqa: E402
from bench.loadgen import body  # noqa: E402
from bench.procs import Harness, start_relay, start_sidecar, start_upstream  # noqa: E402

CHAT = "/v1/chat/completions"


async def one(session: aiohttp.ClientSession, url: str, payload: bytes) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to the last) of one stream."""
    t0 = time.perf_counter()
    async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as r:
        first = None
        async for _ in r.content.iter_any():
            if first is None:
                first = time.perf_counter() - t0
        if r.status != 200 or first is None:
            raise RuntimeError(f"{url}: status {r.status}")
    return first, time.perf_counter() - t0


async def probe(urls: dict[str, str], rounds: int, streams: int) -> dict[str, Any]:
    payload = body(stream=True, max_tokens=20, delay=0.03)
    sessions = {
        name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams)) for name in urls
    }
    added: dict[str, dict[str, list[float]]] = {"first_byte": {}, "last_byte": {}}
    try:
        for name, url in urls.items():  # warm: every connection open, every pool filled
            await asyncio.gather(*(one(sessions[name], url, payload) for _ in range(streams)))
        for _ in range(rounds):
            got: dict[str, list[tuple[float, float]]] = {}
            for name, url in urls.items():
                await asyncio.sleep(0.3)
                got[name] = await asyncio.gather(
                    *(one(sessions[name], url, payload) for _ in range(streams))
                )
            base_first = median([f for f, _ in got["direct"]])
            base_last = median([t for _, t in got["direct"]])
            for name, times in got.items():
                if name == "direct":
                    continue
                first = median([f for f, _ in times]) - base_first
                last = median([t for _, t in times]) - base_last
                added["first_byte"].setdefault(name, []).append(first * 1e3)
                added["last_byte"].setdefault(name, []).append(last * 1e3)
    finally:
        for s in sessions.values():
            await s.close()
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=100)
    args = parser.parse_args()
    with Harness("burst-probe-") as h:
        tmp, procs = h.tmp, h.procs
        up, up_port = start_upstream(tmp)
        procs.append(up)
        urls = {"direct": f"http://127.0.0.1:{up_port}{CHAT}"}
        for plane in ("aiohttp", "relay"):
            proc, port, _ = start_sidecar(tmp, up_port, name=plane, data_plane=plane)
            procs.append(proc)
            urls[plane] = f"http://127.0.0.1:{port}{CHAT}"
        bare, bare_port = start_relay(tmp, up_port)
        procs.append(bare)
        urls["bare_relay"] = f"http://127.0.0.1:{bare_port}{CHAT}"
        added = asyncio.run(probe(urls, args.rounds, args.streams))
    print(
        f"burst of {args.streams}, added over direct (ms), {args.rounds} rounds:"
        " median [lowest, highest]"
    )
    for kind, paths in added.items():
        for path, xs in paths.items():
            print(f"  {kind:10s} {path:10s} {median(xs):7.2f}  [{min(xs):7.2f}, {max(xs):7.2f}]")


if __name__ == "__main__":
    main()
