"""The meter: the accounting behind ``/metrics`` and ``/summary``.

Request events come from the activity sources (:mod:`sidecar.sources`: proxy,
observer, traces), each through the same small protocol; the meter composes
them (which runs alone, which defers to which, who reports the running count)
and keeps the methods the proxy calls as its event interface. It owns the ledger and keeps every figure the outputs need as plain numbers
(counters, bucket counts, a ring of per-second snapshots), so a Prometheus
scrape or a ``/summary`` call only reads cached state: its cost follows the
number of label values, never the requests in flight. Emissions accrue as
energy is assigned, at the intensity in force at that moment.

Per-request figures (histogram, stages, tenants) are booked once, when the
ledger hands a request out as final; a model name becomes a label only once a
request naming it did not fail, so failures cannot use up the label budget.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import structlog

from sidecar.carbon.emissions import operational_grams
from sidecar.figures import (
    Histogram,
    ModelLabels,
    Snapshot,
    window,
)
from sidecar.ledger import PHASES, FinishedRequest, Ledger, Phase, Status
from sidecar.ledger.core import ROW_S
from sidecar.power.base import GpuInfo, PowerSample
from sidecar.sources.base import ENDPOINTS, ActivitySource, Endpoint
from sidecar.sources.join import ProxySpanJoin
from sidecar.sources.observer import ObserverSource
from sidecar.sources.proxy import LoadListener, ProxySource
from sidecar.sources.traces import TraceSource
from sidecar.traces.span import RequestSpan

log = structlog.get_logger("sidecar.meter")


def _debug_enabled() -> bool:
    """Whether debug lines are written (asked of the configured logger, as configured now)."""
    try:
        return bool(log.bind().is_enabled_for(logging.DEBUG))
    except AttributeError:  # a logger without level filtering: it writes everything
        return True


__all__ = ["BOUNDARY", "ENDPOINTS", "Endpoint", "FixedIntensity", "IntensitySource", "Meter"]

NO_TENANT: Final = "none"
STAGES: Final = ("prefill", "decode")
BOUNDARY: Final = (
    "energy of the metered GPUs only; CPU, memory, network and cooling are outside "
    "(PUE scales emissions, not joules)"
)
RunningFrom = Literal["observer", "proxy"]


class IntensitySource(Protocol):
    """What the meter needs of carbon intensity: the figure in force now."""

    @property
    def g_per_kwh(self) -> float: ...
    @property
    def region(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def basis(self) -> str: ...


@dataclass(frozen=True, slots=True)
class FixedIntensity:
    """A constant intensity (``--carbon-intensity`` or the world average)."""

    g_per_kwh: float
    region: str
    source: str
    basis: str = "unknown"


class Meter:
    """Accounting state of one sidecar process."""

    def __init__(
        self,
        gpus: list[GpuInfo],
        *,
        clock: Callable[[], float],
        idle_watts: dict[str, float] | None = None,
        max_models: int = 20,
        default_model: str = "default",
        intensity: IntensitySource,
        pue: float = 1.0,
        embodied_g_per_s: float = 0.0,
        budget_g_per_day: float | None = None,
        on_finished: Callable[[FinishedRequest], None] | None = None,
        hold_s: float = 0.0,
        sample_period_s: float | None = None,
        tenants: bool = False,
        traces_hold_s: float | None = None,
        running_from: RunningFrom | None = None,
        proxy_hold_s: float = 0.0,
    ) -> None:
        """``traces_hold_s`` turns traces mode on (spans are the requests, held that
        long); ``running_from`` names the source of the server's running count there
        (the observer's scrape, else the proxy's open requests, else none).
        ``proxy_hold_s`` (``--proxy-hold``): intervals wait that long, so the usage at a
        stream's end places its prompt."""
        self.gpus = gpus
        self.ledger = Ledger(
            [g.gpu for g in gpus],
            idle_watts=idle_watts,
            hold_s=max(hold_s, proxy_hold_s),
            prompts_at_end=proxy_hold_s > 0.0,
            sample_period_s=sample_period_s,
            late_hold_s=traces_hold_s,
            counted=running_from is not None,
            live_phases=running_from == "observer",
            paced_decode=traces_hold_s is not None,  # the server's spans: continuous batching
        )
        self.clock = clock
        self.models = ModelLabels(max_models)
        self.default_model = default_model
        self.models(default_model)  # configured, so always a label
        self.tenants = tenants
        """Whether tenant showback is on (set by the first request that names a tenant)."""
        self.intensity = intensity
        self.pue = pue
        self.embodied_g_per_s = embodied_g_per_s
        self.budget_g_per_day = budget_g_per_day
        self._on_finished = on_finished
        self._loop: asyncio.AbstractEventLoop | None = None  # set by slice_work
        self._working: asyncio.Handle | None = None
        self._settling: asyncio.Handle | None = None  # a look once the hand-over pauses
        self._fed = 0  # hand-overs so far
        self.started_s = clock()
        self._last_tick_s = self.started_s
        # counters (cumulative since start)
        self.requests: dict[tuple[str, Endpoint, Status], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.request_j: dict[str, Histogram] = {}
        self.model_g: dict[str, float] = {}
        self.emissions_g: dict[str, float] = {"operational": 0.0, "embodied": 0.0}
        self.tracking_errors = 0
        self._assigned_j = 0.0
        self._model_assigned_j: dict[tuple[str, Phase], float] = {}
        self._finished_inference = 0
        self._completion_tokens = 0
        self._history: deque[Snapshot] = deque(maxlen=130)
        self.stage_j: dict[tuple[str, str], float] = {}  # (model, stage) of finished requests
        self.tenant_j: dict[str, float] = {}
        self.tenant_g: dict[str, float] = {}
        self._tenant_of: dict[str, str | None] = {}  # ended, awaiting the ledger's final figure
        self._receipts: dict[str, asyncio.Future[FinishedRequest]] = {}
        self.samples_wanted: Callable[[float], None] | None = None
        """Asks the sampler for reconciled samples past a time soon (a receipt waits)."""
        self._prompt_tokens = 0
        self._prefill_j = 0.0
        self._decode_j = 0.0
        # the sources, composed: with traces on, spans are the requests (joined with the
        # proxy's view by the server's id) and the observer reports only the running count;
        # without, the observer only watches while the proxy sees every request itself
        self.traces = traces_hold_s is not None
        self.join: ProxySpanJoin | None = None
        self.trace: TraceSource | None = None
        if traces_hold_s is not None:
            self.join = ProxySpanJoin(self, traces_hold_s)
            self.trace = TraceSource(self, self.join)
        self.proxy = ProxySource(self, join=self.join, report_counts=running_from == "proxy")
        self.observer = ObserverSource(
            self,
            counts_only=self.traces,
            defer=None if self.traces else self.proxy.saw_traffic,
        )
        self.sources: tuple[ActivitySource, ...] = tuple(
            s for s in (self.proxy, self.observer, self.trace) if s is not None
        )
        self._live_view: tuple[ActivitySource, ...] = self.sources
        """Whose in-flight figure counts: in traces mode the running count's source."""
        if self.traces:
            counts: dict[str, ActivitySource] = {"observer": self.observer, "proxy": self.proxy}
            self._live_view = () if running_from is None else (counts[running_from],)

    # ------------------------------------------- the event interface (the proxy's)
    def request_started(
        self,
        endpoint: Endpoint,
        model: str | None,
        prompt_tokens: float | None,
        time_s: float | None = None,
        *,
        tenant: str | None = None,
    ) -> str:
        """An inference request arrived through the proxy; returns its id."""
        return self.proxy.request_started(endpoint, model, prompt_tokens, time_s, tenant=tenant)

    def model_learned(self, rid: str, model: str) -> None:
        self.proxy.model_learned(rid, model)

    def first_token(
        self, rid: str, time_s: float | None = None, prompt_tokens: int | None = None
    ) -> None:
        """The first token streamed, at ``time_s`` (default now): the proxy tells it once
        the chunk is on its way to the client, with the time it arrived, and the prompt's
        exact count where the response had reported it by then."""
        self.proxy.first_token(rid, time_s, prompt_tokens)

    def tokens_streamed(self, rid: str, count: int, time_s: float | None = None) -> None:
        self.proxy.tokens_streamed(rid, count, time_s)

    def request_finished(
        self,
        rid: str,
        status: Status,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        *,
        tenant: str | None = None,
        server_id: str | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        """The proxied request ended (see :meth:`ProxySource.request_finished`)."""
        self.proxy.request_finished(
            rid, status, prompt_tokens, completion_tokens, tenant=tenant, server_id=server_id,
            cached_tokens=cached_tokens,
        )  # fmt: skip
        waiter = self._receipts.get(rid)
        if waiter is not None and not waiter.done() and self.samples_wanted is not None:
            self.samples_wanted(self.clock())  # final once samples past its end (now) are in

    def other_request(self, status: Status) -> None:
        self.proxy.other_request(status)

    def watch_receipt(self, rid: str) -> asyncio.Future[FinishedRequest]:
        """Resolved with ``rid``'s figure once final (register before its finish:
        the figure can be final at once); :meth:`drop_receipt` forgets it."""
        waiter: asyncio.Future[FinishedRequest] = asyncio.get_running_loop().create_future()
        self._receipts[rid] = waiter
        return waiter

    def drop_receipt(self, rid: str) -> None:
        self._receipts.pop(rid, None)

    def provisional_receipt(self, rid: str) -> FinishedRequest | None:
        """``rid``'s figure so far, for a receipt that could wait no longer."""
        req = self.ledger._live.get(rid)
        if req is None:
            return None
        end = req.end_s if req.end_s != float("inf") else self.clock()
        return FinishedRequest(
            req.id, req.model, req.endpoint, req.status, req.start_s, end,
            req.first_token_s, req.prompt_tokens, req.completion_tokens,
            req.dynamic_j, req.idle_j, req.prefill_j,
        )  # fmt: skip

    @property
    def listener(self) -> LoadListener | None:
        """Told of proxied request events (the simulated GPU follows proxied load)."""
        return self.proxy.listener

    @listener.setter
    def listener(self, value: LoadListener | None) -> None:
        self.proxy.listener = value

    def span_finished(self, span: RequestSpan) -> None:
        """Traces mode: the server reported a finished request (its span, seconds to
        minutes late). Its share is placed in the held intervals where it ran, from its
        scheduling to its end; its exact tokens count now; a retried export counts once.
        The request's final figure is handed out under ``span.request_id``."""
        if self.trace is None:
            raise RuntimeError("span_finished() needs a meter made with traces_hold_s")
        self.trace.span_finished(span)

    @property
    def duplicate_spans(self) -> int:
        return 0 if self.trace is None else self.trace.duplicates

    def server_running(
        self,
        since_s: float,
        until_s: float,
        running: dict[str, float],
        finished: dict[str, float] | None = None,
    ) -> None:
        """Traces mode: the server's running count by model at ``until_s``, and the
        requests it finished since ``since_s`` (:meth:`ObserverSource.counts`)."""
        self.observer.counts(since_s, until_s, running, finished)

    def observed(
        self,
        model: str,
        *,
        since_s: float,
        until_s: float,
        running: float,
        prompt_tokens: float,
        completion_tokens: float,
        finished: float,
    ) -> None:
        """Observer mode: the server's counters for one model (:class:`ObserverSource`)."""
        self.observer.observed(
            model, since_s=since_s, until_s=until_s, running=running,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, finished=finished,
        )  # fmt: skip

    def upstream_answered(self) -> None:
        """The model server answered (readiness): the start-up baseline begins now."""
        self.ledger.upstream_ready(self.clock())

    # ------------------------------------------------- what sources count (Accounts)
    def count_finished(
        self,
        model: str,
        endpoint: Endpoint,
        status: Status,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        key = (model, endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if endpoint == "other":
            return
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if n:
                tk = (model, kind)
                self.tokens[tk] = self.tokens.get(tk, 0) + n
        self._finished_inference += 1
        self._completion_tokens += completion_tokens or 0
        self._prompt_tokens += prompt_tokens or 0

    def count_tokens(self, model: str, prompt: int, completion: int, finished: int) -> None:
        for kind, n in (("prompt", prompt), ("completion", completion)):
            if n > 0:
                tk = (model, kind)
                self.tokens[tk] = self.tokens.get(tk, 0) + n
        if finished > 0:
            key: tuple[str, Endpoint, Status] = (model, "generate", "ok")
            self.requests[key] = self.requests.get(key, 0) + finished
            self._finished_inference += finished
        self._completion_tokens += completion

    def set_tenant(self, request_id: str, tenant: str | None) -> None:
        if tenant is not None:
            self.tenants = True
        self._tenant_of[request_id] = tenant

    # --------------------------------------------------------------- power, time
    def on_samples(self, samples: Iterable[PowerSample]) -> None:
        gpus = self.ledger.gpus
        self.ledger.samples(
            (s.gpu, s.time_s, s.power_w, s.energy_j) for s in samples if s.gpu in gpus
        )
        self.collect()
        self._go_on()
        self._fed += 1
        if self._loop is not None and self._settling is None:
            self._settling = self._loop.call_soon(self._settle, self._fed)

    def _settle(self, fed: int) -> None:
        """The turn after a hand-over: if no reading came since (the sampler's queue is
        empty), what is left of an unfinished row goes now, so the figures reach the
        last sample handed over, not a row (0.1 s) before it."""
        self._settling = None
        loop = self._loop
        if loop is None:
            return
        if fed != self._fed:  # the hand-over goes on: look again after the next reading
            self._settling = loop.call_soon(self._settle, self._fed)
            return
        self._run(self.ledger.look)

    def slice_work(self, row_s: float = ROW_S) -> None:
        """On the loop: the ledger assigns rows of ``row_s`` of samples, a row per GPU a loop
        turn, not a backlog at once (requests still unknown hold intervals, then free them
        together: 40-60 ms of one call with 100 streams, every chunk waiting)."""
        self.ledger.gather(row_s)
        self._loop = asyncio.get_running_loop()

    def _go_on(self) -> None:
        if self.ledger.backlog and self._loop is not None and self._working is None:
            self._working = self._loop.call_soon(self._work)

    def _work(self) -> None:
        self._working = None
        self._run(self.ledger.work)

    def _run(self, step: Callable[[], None]) -> None:
        """A slice of the ledger's work on the loop, then its figures and the next slice."""
        try:
            step()
            self.collect()
        except Exception:  # as the sampler's sink: a bug here must not stop metering
            log.exception("meter.work_failed")
            return
        self._go_on()

    def tick(self) -> None:
        """Once a second or so: let bounded waits expire, accrue embodied, snapshot."""
        now = self.clock()
        for source in self.sources:
            source.tick(now)
        self.ledger.advance(now)
        self.collect()
        dt = max(0.0, now - self._last_tick_s)
        self._last_tick_s = now
        self.emissions_g["embodied"] += self.embodied_g_per_s * dt
        self._history.append(self._current(now))
        self._go_on()

    def flush(self) -> None:
        """Shutdown: assign everything and report every request."""
        for handle in (self._working, self._settling):
            if handle is not None:
                handle.cancel()
        self._working = self._settling = None
        self._loop = None
        for source in self.sources:
            source.flush()
        self.ledger.flush()
        self.collect()

    def collect(self) -> None:
        """Fold newly assigned energy into emissions and finished requests into outputs."""
        total = self.ledger.total_j
        intensity = self.intensity.g_per_kwh
        if total > self._assigned_j:
            self.emissions_g["operational"] += operational_grams(
                total - self._assigned_j, intensity, self.pue
            )
            self._assigned_j = total
        for key, joules in self.ledger.model_j.items():
            seen = self._model_assigned_j.get(key, 0.0)
            if joules > seen:
                model = key[0]
                grams = operational_grams(joules - seen, intensity, self.pue)
                self.model_g[model] = self.model_g.get(model, 0.0) + grams
                self._model_assigned_j[key] = joules
        debug: bool | None = None  # asked once per call, only if a request finished
        for f in self.ledger.pop_finished():
            if f.activity:  # a model's stretch of activity, not a request
                continue
            self.request_j.setdefault(f.model, Histogram()).observe(f.energy_j)
            self._book_stages(f)
            self._book_tenant(f, intensity)
            waiter = self._receipts.pop(f.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(f)
            if debug is None:
                debug = _debug_enabled()
            if debug:  # at info level the line's keyword data is not even built
                log.debug(
                    "request.finished",
                    request_id=f.id,
                    model=f.model,
                    endpoint=f.endpoint,
                    status=f.status,
                    duration_s=round(f.end_s - f.start_s, 4),
                    prompt_tokens=f.prompt_tokens,
                    completion_tokens=f.completion_tokens,
                    cached_tokens=f.cached_tokens,
                    dynamic_j=round(f.dynamic_j, 4),
                    idle_j=round(f.idle_j, 4),
                    prefill_j=round(f.prefill_j, 4),
                )
            if self._on_finished is not None:
                try:
                    self._on_finished(f)
                except Exception:  # a recorder fault must not stop accounting
                    log.exception("meter.on_finished_failed")

    _collect = collect

    def _book_stages(self, f: FinishedRequest) -> None:
        for stage, joules in zip(STAGES, (f.prefill_j, f.decode_j), strict=True):
            key = (f.model, stage)
            self.stage_j[key] = self.stage_j.get(key, 0.0) + joules
        self._prefill_j += f.prefill_j
        self._decode_j += f.decode_j

    def _book_tenant(self, f: FinishedRequest, intensity: float) -> None:
        """Showback: a finished request's attributed energy, and its operational grams
        at the intensity in force when its energy became final, under its tenant."""
        tenant = self._tenant_of.pop(f.id, None)
        if not self.tenants:
            return
        label = tenant or NO_TENANT
        self.tenant_j[label] = self.tenant_j.get(label, 0.0) + f.energy_j
        grams = operational_grams(f.energy_j, intensity, self.pue)
        self.tenant_g[label] = self.tenant_g.get(label, 0.0) + grams

    # ------------------------------------------------------------------ queries
    def in_flight(self) -> dict[str, int]:
        """Requests in flight by model, as the sources see them: the proxy's open
        requests, the server's running count (observer); in traces mode only the
        source of the running count (none: 0)."""
        out: dict[str, int] = {}
        for source in self._live_view:
            for label, n in source.in_flight().items():
                out[label] = out.get(label, 0) + n
        return {k: v for k, v in out.items() if v > 0}

    def power_w(self, last_power: dict[str, float]) -> float:
        return sum(last_power.get(g.gpu, 0.0) for g in self.gpus)

    def summary(self, last_power: dict[str, float]) -> dict[str, Any]:
        """The contract's ``/summary`` document."""
        now = self._current()
        start = Snapshot(self.started_s, (0.0, 0.0, 0.0), 0, 0, 0.0, 0.0)
        minute_ago = start  # in the first minute the window reaches back to the start
        if now.time_s - self.started_s > 60.0:
            minute_ago = self._history[0] if self._history else start
            for snap in self._history:
                if now.time_s - snap.time_s <= 60.0:
                    minute_ago = snap
                    break
        ci = self.intensity
        return {
            "last_minute": window(minute_ago, now),
            "since_start": window(start, now),
            "power_watts": self.power_w(last_power),
            "idle_baseline_watts": self.ledger.idle_baseline_w(),
            "idle_baseline_basis": self.ledger.idle_basis(),
            "prefill_token_weight": self.ledger.prefill_fit.ratio,
            "carbon_intensity": {
                "grams_per_kwh": ci.g_per_kwh,
                "source": ci.source,
                "region": ci.region,
                "basis": ci.basis,
            },
            "pue": self.pue,
            "emissions_budget_grams_per_day": self.budget_g_per_day,
            "boundary": BOUNDARY,
            "gpus": [{"gpu": g.gpu, "uuid": g.uuid, "name": g.name} for g in self.gpus],
        }

    def _current(self, time_s: float | None = None) -> Snapshot:
        """The cumulative figures now: what ``/summary`` subtracts between two moments."""
        return Snapshot(
            self.clock() if time_s is None else time_s,
            tuple(self.ledger.phase_j[p] for p in PHASES),  # type: ignore[arg-type]
            self._finished_inference,
            self._completion_tokens,
            self.emissions_g["operational"],
            self.emissions_g["embodied"],
            self._prompt_tokens,
            self._prefill_j,
            self._decode_j,
        )
