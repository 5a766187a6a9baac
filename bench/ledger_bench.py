"""Ledger throughput with 100 requests in flight: pure, in-process, synthetic.

A steady state the live sidecar sees under load: 8 GPUs sampled at 10 Hz,
100 streaming requests always in flight (one ends, the next starts), each
with a 1,000-token prompt and 200 completion tokens streamed one per chunk
at 20 tokens/s. Per simulated second that is 80 samples and about 2,000
token events. Every call the proxy and the sampler would make is made, in
time order, and the whole is timed: the figure is samples absorbed per
second of CPU, with the events between them included.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass

from sidecar.ledger import Ledger

GPUS = 8
HZ = 10.0
IN_FLIGHT = 100
TOKENS_PER_S = 20.0
COMPLETION = 200
PROMPT = 1000
TTFT_S = 0.15


@dataclass(frozen=True, slots=True)
class LedgerResult:
    samples: int
    events: int
    simulated_s: float
    cpu_s: float
    finished: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.cpu_s

    @property
    def events_per_s(self) -> float:
        return self.events / self.cpu_s

    @property
    def realtime_factor(self) -> float:
        """Simulated seconds absorbed per CPU second (1 = just keeps up)."""
        return self.simulated_s / self.cpu_s


def run(
    simulated_s: float,
    *,
    seed: int = 7,
    hz: float = HZ,
    in_flight: int = IN_FLIGHT,
    tokens_per_s: float = TOKENS_PER_S,
) -> LedgerResult:
    """Defaults: the 10 Hz, 100-stream load; issue 12's key runs 100 Hz, 256 at 30 tokens/s."""
    rnd = random.Random(seed)
    gpus = [str(g) for g in range(GPUS)]
    ledger = Ledger(gpus)
    # Event queue: (time, order, kind, request index, tokens)
    queue: list[tuple[float, int, str, int, int]] = []
    order = 0
    next_id = 0

    def push(t: float, kind: str, rid: int, n: int = 0) -> None:
        nonlocal order
        order += 1
        heapq.heappush(queue, (t, order, kind, rid, n))

    def schedule(start: float) -> None:
        nonlocal next_id
        rid = next_id
        next_id += 1
        push(start, "start", rid)
        ft = start + TTFT_S
        push(ft, "first", rid)
        step = 1.0 / tokens_per_s
        for k in range(COMPLETION):
            push(ft + k * step, "token", rid, 1)
        push(ft + COMPLETION * step, "end", rid)

    duration = TTFT_S + COMPLETION / tokens_per_s
    for _ in range(in_flight):  # staggered so ends and starts spread evenly
        schedule(rnd.uniform(0.0, duration))
    t_sample = 0.0
    samples = events = finished = 0
    warm_s = duration  # one full request lifetime untimed: the steady state is timed
    cpu0 = 0.0
    timing = False
    while t_sample < warm_s + simulated_s:
        if not timing and t_sample >= warm_s:
            timing = True
            samples = events = finished = 0
            cpu0 = time.process_time()
        while queue and queue[0][0] <= t_sample:
            t, _, kind, rid, n = heapq.heappop(queue)
            name = f"r{rid}"
            events += 1
            if kind == "start":
                ledger.start(name, t, model="m", prompt_tokens=PROMPT)
            elif kind == "first":
                ledger.first_token(name, t)
            elif kind == "token":
                ledger.tokens(name, t, n)
            else:
                ledger.finish(name, t, prompt_tokens=PROMPT, completion_tokens=COMPLETION)
                schedule(t)
        power = 70.0 + 180.0 * (0.5 + 0.5 * rnd.random())
        for g in gpus:
            ledger.sample(g, t_sample, power)
            samples += 1
        if samples % int(GPUS * hz / 2.0) == 0:
            ledger.advance(t_sample)  # the sidecar's ticker, every 0.5 s
        finished += len(ledger.pop_finished())
        t_sample += 1.0 / hz
    cpu = time.process_time() - cpu0
    return LedgerResult(samples, events, simulated_s, cpu, finished)
