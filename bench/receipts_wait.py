"""How long a receipt holds a response's end, and how often it is final (stand-in rig).

The wait is timed from the upstream's last byte to the receipt being written; a
final receipt is compared with the request's share of the histogram, so a
receipt that is fast but wrong shows. Timings are figures, never pass/fail.

Run: ``.venv/bin/python bench/receipts_wait.py HZ N [--json] [--gap S] [--clients C] [--no-cut]``
(``--no-cut`` disables the reconciler's early window close, the code before it).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

import sidecar.reconcile as reconcile
import sidecar.tracking.receipts as receipts
from bench.common import ROOT
from sidecar.app import Sidecar
from sidecar.config import Settings

sys.path.insert(0, str(ROOT / "tests"))
from upstreams import create_upstream


async def hist_sum(s: aiohttp.ClientSession, url: str) -> float:
    text = await (await s.get(url)).text()
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "llm_energy_request_joules_sum" and smp.labels.get("model") == "m1":
                return smp.value
    return 0.0


async def main(hz: float, n: int, as_json: bool, gap: float, conc: int) -> None:
    runner = web.AppRunner(create_upstream())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = _port(site)
    sc = Sidecar(
        Settings(
            upstream=f"http://127.0.0.1:{port}/",
            power_source="simulated",
            sample_hz=hz,
            energy_receipts=True,
        ),
        env={},
    )
    await sc.start()
    apps: list[tuple[web.AppRunner, int]] = []
    for app in (sc.proxy_app(), sc.metrics_app()):
        r = web.AppRunner(app)
        await r.setup()
        st = web.TCPSite(r, "127.0.0.1", 0)
        await st.start()
        apps.append((r, _port(st)))
    pport, mport = apps[0][1], apps[1][1]
    waits: list[float] = []
    orig = receipts.settle

    async def timed(*a: Any, **k: Any) -> Any:
        t = time.monotonic()
        out = await orig(*a, **k)
        waits.append(time.monotonic() - t)
        return out

    receipts.settle = timed
    finals, worst = 0, 0.0
    body = {
        "model": "m1",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": not as_json,
        "max_tokens": 6,
    }
    async with aiohttp.ClientSession() as s:
        await asyncio.sleep(1.5)

        async def one() -> tuple[dict[str, Any], bytes]:
            async with s.post(f"http://127.0.0.1:{pport}/v1/chat/completions", json=body) as r:
                raw = await r.read()
            if as_json:
                return dict(json.loads(raw)["energy"]), raw
            line = next(e for e in raw.split(b"\n\n") if e.startswith(b": llm-energy "))
            return dict(json.loads(line[len(b": llm-energy ") :])), raw

        async def client() -> None:
            nonlocal finals, worst
            for _ in range(n):
                before = await hist_sum(s, f"http://127.0.0.1:{mport}/metrics") if conc == 1 else 0
                rec, _ = await one()
                finals += rec["final"]
                if rec["final"] and conc == 1:
                    after = await hist_sum(s, f"http://127.0.0.1:{mport}/metrics")
                    share = after - before
                    worst = max(worst, abs(rec["energy_joules"] - share) / rec["energy_joules"])
                await asyncio.sleep(gap)

        await asyncio.gather(*(client() for _ in range(conc)))
    receipts.settle = orig
    for r, _ in apps:
        await r.cleanup()
    await sc.stop()
    await runner.cleanup()
    ms = sorted(w * 1000 for w in waits)
    print(
        json.dumps(
            {
                "hz": hz,
                "json": as_json,
                "gap_s": gap,
                "clients": conc,
                "requests": len(ms),
                "final": finals,
                "wait_ms_median": round(statistics.median(ms), 1),
                "wait_ms_p95": round(ms[int(0.95 * (len(ms) - 1))], 1),
                "wait_ms_max": round(ms[-1], 1),
                "max_rel_diff_final_vs_histogram": worst if conc == 1 else None,
            }
        )
    )


def _port(site: web.TCPSite) -> int:
    server: Any = site._server
    return int(server.sockets[0].getsockname()[1])


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hz", type=float, help="sampler rate (--sample-hz)")
    parser.add_argument("n", type=int, help="requests per client")
    parser.add_argument("--json", action="store_true", help="non-streamed chat (energy member)")
    parser.add_argument(
        "--gap", type=float, default=0.3, help="seconds between a client's requests"
    )
    parser.add_argument("--clients", type=int, default=1, help="clients at once")
    parser.add_argument("--no-cut", action="store_true", help="no early window close")
    args = parser.parse_args()
    if args.no_cut:
        reconcile.Reconciler.cut = lambda self, after_s: None  # type: ignore[method-assign]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(args.hz, args.n, args.json, args.gap, args.clients))


if __name__ == "__main__":
    cli()
