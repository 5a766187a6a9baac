"""The ledger's answers on seeded random multi-GPU traces, against values recorded from it.

Speed work on the ledger (how often it checks whether an interval waits, how it
finds the requests of an interval) must not move a single figure: every
finished request's dynamic, idle and prefill joules, the phase totals, the
per-model totals and each GPU's energy are compared with values recorded
before that work, within 1e-9 relative. The traces stream tokens one chunk at a
time, interleaved with samples of three GPUs (one with a gap, one sampled at
other times), as the live sidecar feeds them, and in traces mode (requests
placed whole, late).

A deliberate change of the sharing rule moves these values: record them again
with ``.venv/bin/python tests/test_ledger_recorded.py --record`` and say so in
the commit.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.ledger import Ledger

RECORDED = Path(__file__).parent / "data" / "ledger_recorded.json"
GPUS = ("0", "1", "2")


def live_trace(seed: int) -> dict[str, Any]:
    """Streamed and non-streamed requests on three GPUs, fed in time order as the proxy
    and the sampler would; one GPU has a 0.5 s gap and one samples between the others."""
    rnd = random.Random(seed)
    ledger = Ledger(GPUS, sample_period_s=0.02)
    events: list[tuple[float, int, str, tuple[Any, ...]]] = []
    order = 0

    def push(t: float, kind: str, *args: Any) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (t, order, kind, args))

    for i in range(60):
        rid = f"r{i}"
        start = rnd.uniform(0.2, 7.0)
        model = rnd.choice(("llama", "qwen"))
        prompt = rnd.randint(20, 3000)
        push(start, "start", rid, model, prompt)
        if rnd.random() < 0.2:  # not streamed: the whole reply at the end
            end = start + rnd.uniform(0.1, 2.0)
            push(end, "finish", rid, "ok", prompt, rnd.randint(1, 300))
            continue
        t = start + rnd.uniform(0.02, 0.8)
        push(t, "first", rid)
        n = rnd.randint(1, 60)
        for _ in range(n):
            t += rnd.expovariate(40.0)
            push(t, "tokens", rid, rnd.choice((1, 1, 1, 2, 5)))
        status = "cancelled" if rnd.random() < 0.1 else "ok"
        push(t + rnd.uniform(0.0, 0.05), "finish", rid, status, prompt, n)
    t = 0.0
    while t < 10.0:
        power = 80.0 + 250.0 * rnd.random()
        push(t, "sample", "0", power, None)
        if not 4.0 < t < 4.5:
            push(t, "sample", "1", power * 0.8, None)
        push(t + 0.007, "sample", "2", 60.0 + 120.0 * math.sin(t) ** 2, None)
        t += 0.02
    while events:
        t, _, kind, args = heapq.heappop(events)
        if kind == "start":
            ledger.start(args[0], t, model=args[1], prompt_tokens=args[2])
        elif kind == "first":
            ledger.first_token(args[0], t)
        elif kind == "tokens":
            ledger.tokens(args[0], t, args[1])
        elif kind == "finish":
            rid, status, prompt, completion = args
            ledger.finish(rid, t, status=status, prompt_tokens=prompt, completion_tokens=completion)
        else:
            ledger.sample(args[0], t, args[1], args[2])
            if rnd.random() < 0.05:
                ledger.advance(t)
    ledger.flush()
    return figures(ledger)


def traces_trace(seed: int) -> dict[str, Any]:
    """Traces mode: requests placed whole after they ended, while samples come in."""
    rnd = random.Random(seed)
    ledger = Ledger(GPUS[:2], late_hold_s=3.0, sample_period_s=0.05)
    reqs = []
    for i in range(40):
        start = rnd.uniform(0.1, 6.0)
        first = start + rnd.uniform(0.02, 0.5)
        end = first + rnd.uniform(0.05, 2.0)
        reqs.append((end + rnd.uniform(0.0, 1.0), f"s{i}", start, first, end))
    reqs.sort()
    t = 0.0
    k = 0
    while t < 12.0:
        while k < len(reqs) and reqs[k][0] <= t:
            _, rid, start, first, end = reqs[k]
            ledger.place(
                rid, model="m", start_s=start, first_token_s=first, end_s=end,
                prompt_tokens=rnd.randint(10, 2000), completion_tokens=rnd.randint(1, 400),
            )  # fmt: skip
            k += 1
        for g in GPUS[:2]:
            ledger.sample(g, t, 90.0 + 200.0 * rnd.random())
        t += 0.05
    ledger.flush()
    return figures(ledger)


def figures(ledger: Ledger) -> dict[str, Any]:
    return {
        "requests": {
            f.id: [f.dynamic_j, f.idle_j, f.prefill_j]
            for f in sorted(ledger.pop_finished(), key=lambda f: f.id)
        },
        "phase_j": dict(ledger.phase_j),
        "model_j": {f"{m}/{p}": v for (m, p), v in sorted(ledger.model_j.items())},
        "gpu_j": {g: ledger.gpu_energy_j(g) for g in ledger.gpus},
        "unattributed_j": ledger.unattributed_j,
    }


CASES = {"live-1": lambda: live_trace(1), "live-2": lambda: live_trace(2)}
CASES["traces-3"] = lambda: traces_trace(3)


def close(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            close(g, w, f"{where}[{i}]")
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), where


@pytest.mark.parametrize("case", sorted(CASES))
def test_figures_match_the_recorded_ones(case: str) -> None:
    """Every per-request, per-phase, per-model and per-GPU figure is the recorded one."""
    recorded = json.loads(RECORDED.read_text())
    got = CASES[case]()
    assert len(got["requests"]) >= 30  # the trace exercises many requests, not a few
    close(got, recorded[case], case)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    RECORDED.write_text(json.dumps({k: CASES[k]() for k in sorted(CASES)}, indent=1) + "\n")
    print(f"recorded {RECORDED}")
