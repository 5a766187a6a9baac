"""A server that is never idle, on the live path with a simulated clock.

The simulated GPU, the sampler (with its reconciler), the meter and a load
listener run exactly as in ``run --power-source simulated``, but on an
injected clock stepped sample by sample, so hours of traffic take seconds
and nothing sleeps. Used by tests/test_busy_baseline.py, and runnable on its
own to print the figures the issue asks for (baseline and idle share):

    .venv/bin/python tests/busy_server.py --standby 60 --light 0 --busy 7200
    .venv/bin/python tests/busy_server.py --standby 0 --light 40 --busy 660
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from typing import Any

from sidecar.app import RequestDrivenLoad
from sidecar.ledger import Phase
from sidecar.meter import FixedIntensity, Meter
from sidecar.power.simulated import SimulatedGpus, SimulatedSource
from sidecar.sampler import Sampler

HZ = 10


@dataclass(slots=True)
class _Stream:
    """One client that sends its next request as soon as the last one ended."""

    rid: str | None = None
    first_at: float = 0.0
    next_token_at: float = 0.0
    left: int = 0
    produced: int = 0
    idle_until: float = 0.0


@dataclass(slots=True)
class BusyRun:
    """Figures of one run; ``truth_idle_share`` is the simulator's exact one."""

    seconds: float
    baseline_w: float
    basis: str
    idle_share: float
    truth_idle_share: float
    last_window_idle_share: float
    last_window_truth_idle_share: float
    requests: int
    phases: dict[Phase, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "baseline_w": round(self.baseline_w, 2),
            "basis": self.basis,
            "idle_share": round(self.idle_share, 4),
            "truth_idle_share": round(self.truth_idle_share, 4),
            "last_window_idle_share": round(self.last_window_idle_share, 4),
            "last_window_truth_idle_share": round(self.last_window_truth_idle_share, 4),
            "requests": self.requests,
        }


def run_busy(
    *,
    standby_s: float,
    light_s: float,
    busy_s: float,
    streams: int = 4,
    idle_w: float = 70.0,
    seed: int = 3,
    last_window_s: float = 120.0,
    counter: bool = True,
) -> BusyRun:
    """Standby, then light traffic (one short request every few seconds), then
    ``streams`` streams always in flight; returns the meter's figures and the truth."""
    clock = [0.0]
    now = lambda: clock[0]  # noqa: E731
    gpu = SimulatedGpus(gpus=1, idle_w=idle_w, noise_w=1.5, seed=seed)
    source = SimulatedSource(gpu, clock=now, with_counter=counter)
    gpus = source.open()
    meter = Meter(
        gpus,
        clock=now,
        intensity=FixedIntensity(400.0, "xx", "fixed"),
        **_period_kwargs(Meter),
    )
    meter.listener = RequestDrivenLoad(gpu, now)
    sampler = Sampler(source, gpus, hz=HZ, sink=meter.on_samples, clock=now)
    rng = random.Random(seed)
    pool = [_Stream() for _ in range(streams)]
    total_s = standby_s + light_s + busy_s
    window_start = max(0.0, total_s - last_window_s)
    window_mark: tuple[float, float, float] | None = None  # (measured idle, total, truth total)
    light_next = standby_s
    light_rid: str | None = None
    light_end = 0.0
    step = 0
    requests = 0
    try:
        while clock[0] < total_s:
            step += 1
            clock[0] = step / HZ
            t = clock[0]
            if standby_s <= t < standby_s + light_s:  # light: a short request every ~4 s
                if light_rid is None and t >= light_next:
                    light_rid = meter.request_started("chat", "m", 50.0)
                    meter.first_token(light_rid)
                    light_end = t + 0.5
                elif light_rid is not None and t >= light_end:
                    meter.tokens_streamed(light_rid, 5)
                    meter.request_finished(light_rid, "ok", 50, 5)
                    requests += 1
                    light_rid = None
                    light_next = t + rng.uniform(2.5, 5.5)
            if t >= standby_s + light_s:
                for s in pool:
                    requests += _step_stream(meter, s, t, rng)
            sampler.ingest(source.read())
            if step % HZ == 0:
                meter.tick()
            if window_mark is None and t >= window_start:
                window_mark = (*_idle_and_total(meter), gpu.energy_j(t))
        for s in pool:  # let the last requests end, then account everything
            if s.rid is not None:
                meter.request_finished(s.rid, "ok", 200, s.produced)
        sampler.flush()
        meter.flush()
    finally:
        sampler.close()
    idle, total = _idle_and_total(meter)
    truth_total = gpu.energy_j(clock[0])
    assert window_mark is not None
    w_idle, w_total, w_truth = window_mark
    return BusyRun(
        seconds=clock[0],
        baseline_w=meter.ledger.idle_baseline_w(),
        basis=getattr(meter.ledger, "idle_basis", lambda: "n/a")(),
        idle_share=idle / total,
        truth_idle_share=idle_w * clock[0] / truth_total,
        last_window_idle_share=(idle - w_idle) / (total - w_total),
        last_window_truth_idle_share=idle_w * (clock[0] - window_start) / (truth_total - w_truth),
        requests=requests,
        phases=dict(meter.ledger.phase_j),
    )


def _period_kwargs(meter_cls: type) -> dict[str, Any]:
    """The sample period, where this version of the meter takes it (the script also
    runs against older trees, to measure the figures before a fix)."""
    import inspect

    params = inspect.signature(meter_cls).parameters
    return {"sample_period_s": 1.0 / HZ} if "sample_period_s" in params else {}


def _step_stream(meter: Meter, s: _Stream, t: float, rng: random.Random) -> int:
    """Advance one always-busy client by one sample period; returns requests finished."""
    if s.rid is None:
        if t < s.idle_until:
            return 0
        s.rid = meter.request_started("chat", "m", float(rng.randint(100, 800)))
        s.first_at = t + rng.uniform(0.1, 0.4)
        s.next_token_at = s.first_at
        s.left = rng.randint(40, 400)
        s.produced = 0
        return 0
    if t < s.first_at:
        return 0
    if s.produced == 0:
        meter.first_token(s.rid)
    if t >= s.next_token_at and s.left > 0:
        n = min(s.left, 2)
        meter.tokens_streamed(s.rid, n)
        s.left -= n
        s.produced += n
        s.next_token_at = t + 0.1
    if s.left == 0:
        meter.request_finished(s.rid, "ok", 200, s.produced)
        s.rid = None
        s.idle_until = t  # the next request follows at once: never idle
        return 1
    return 0


def _idle_and_total(meter: Meter) -> tuple[float, float]:
    p = meter.ledger.phase_j
    return p["idle_serving"] + p["idle_standby"], sum(p.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--standby", type=float, default=60.0)
    ap.add_argument("--light", type=float, default=0.0)
    ap.add_argument("--busy", type=float, default=7200.0)
    ap.add_argument("--streams", type=int, default=4)
    args = ap.parse_args()
    run = run_busy(
        standby_s=args.standby, light_s=args.light, busy_s=args.busy, streams=args.streams
    )
    print(json.dumps(run.as_dict()))


if __name__ == "__main__":
    main()
