"""The meter: where request events, power samples and carbon meet the outputs.

It owns the ledger and keeps every figure the outputs need as plain numbers
(counters, bucket counts, a ring of per-second snapshots), so a Prometheus
scrape or a ``/summary`` call only reads cached state: its cost follows the
number of label values, never the requests in flight. Emissions accrue as
energy is assigned, at the intensity in force at that moment.

Per-request figures (histogram, stages, tenants) are booked once, when the
ledger hands a request out as final; a model name becomes a label only once a
request naming it did not fail, so failures cannot use up the label budget.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import structlog

from sidecar.carbon.emissions import operational_grams
from sidecar.figures import (
    OTHER_MODEL,
    Histogram,
    ModelLabels,
    Snapshot,
    window,
)
from sidecar.ledger import PHASES, FinishedRequest, Ledger, Phase, Status
from sidecar.power.base import GpuInfo, PowerSample
from sidecar.traces.span import RequestSpan

log = structlog.get_logger("sidecar.meter")

Endpoint = Literal[
    "chat", "completion", "responses", "embedding", "pooling", "generate", "unknown", "other"
]
ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    "chat", "completion", "responses", "embedding", "pooling", "generate", "unknown", "other",
)  # fmt: skip
OBSERVED: Final = "observed"
"""Ledger endpoint of observer mode's per-model activity spans."""
OBSERVED_STALE_S: Final = 30.0
"""An activity span the observer has not renewed for this long ends where it was last seen."""
PROXY_WINS_S: Final = 60.0
"""With the proxy in the path, its per-request view wins for this long after a request."""
NO_TENANT: Final = "none"
STAGES: Final = ("prefill", "decode")
BOUNDARY: Final = (
    "energy of the metered GPUs only; CPU, memory, network and cooling are outside "
    "(PUE scales emissions, not joules)"
)


class LoadListener(Protocol):
    """Told of request lifecycle events (the simulated GPU follows proxied load with it)."""

    def started(self, rid: str) -> None: ...
    def streaming(self, rid: str) -> None: ...
    def finished(self, rid: str) -> None: ...


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


@dataclass(slots=True)
class _Open:
    """A request the proxy is tracking; counters are bumped when it ends."""

    model: str
    """The ledger's label for it now: provisional until a response confirms it."""
    endpoint: Endpoint
    tenant: str | None = None
    response_model: str | None = None


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
        counted: bool = False,
    ) -> None:
        self.gpus = gpus
        self.ledger = Ledger(
            [g.gpu for g in gpus],
            idle_watts=idle_watts,
            hold_s=hold_s,
            sample_period_s=sample_period_s,
            late_hold_s=traces_hold_s,
            counted=counted,
        )
        self.traces = traces_hold_s is not None
        """Traces mode: requests come whole from spans; live sources report only counts."""
        self.duplicate_spans = 0
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
        self.listener: LoadListener | None = None
        self._ids = itertools.count(1)
        # request ids are unique across restarts, so appended --record files attribute cleanly
        self._id_prefix = secrets.token_hex(4)
        self._open: dict[str, _Open] = {}
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
        self._observed: dict[str, tuple[str, float]] = {}  # label -> (open span, renewed at)
        self._running: dict[str, int] = {}  # observer mode: the server's running count
        self.last_proxied_s: float | None = None
        self.stage_j: dict[tuple[str, str], float] = {}  # (model, stage) of finished requests
        self.tenant_j: dict[str, float] = {}
        self.tenant_g: dict[str, float] = {}
        self._tenant_of: dict[str, str | None] = {}  # ended, awaiting the ledger's final figure
        self._prompt_tokens = 0
        self._prefill_j = 0.0
        self._decode_j = 0.0

    # ------------------------------------------------------------ request events
    def request_started(
        self,
        endpoint: Endpoint,
        model: str | None,
        prompt_tokens: float | None,
        time_s: float | None = None,
        *,
        tenant: str | None = None,
    ) -> str:
        """An inference request arrived (at ``time_s``, default now); returns its id.

        ``tenant`` is the request's showback label, already bounded by the caller.
        The model label is provisional until the response: a name becomes a label
        only once a successful response confirms it (the response's name preferred).
        """
        rid = f"{self._id_prefix}-r{next(self._ids)}"
        name = model or self.default_model
        now = self.clock()
        self.last_proxied_s = now
        self._end_observed_spans(now)  # the proxy's per-request view wins from here
        if tenant is not None:
            self.tenants = True
        self._open[rid] = _Open(name, endpoint, tenant)
        t = now if time_s is None else time_s
        provisional = model is None or not self.models.known(name)
        self.ledger.start(
            rid, t, model=name, endpoint=endpoint, prompt_tokens=prompt_tokens,
            provisional=provisional,
        )  # fmt: skip
        if self.listener is not None:
            self.listener.started(rid)
        return rid

    def model_learned(self, rid: str, model: str) -> None:
        """The response named the model: it becomes the label if the request succeeds."""
        req = self._open.get(rid)
        if req is not None:
            req.response_model = model

    def _final_label(self, req: _Open, status: Status) -> str:
        """A request that did not fail registers its model's name (the response's name
        first; a client that left did not make the server fail); a failed one (a
        404 for a mistyped name, an upstream down) uses a name only if it is a label
        already, else ``other``, so failures cannot use up the label budget."""
        name = req.response_model or req.model
        if status != "error":
            return self.models(name)
        for candidate in (req.response_model, req.model):
            if candidate is not None and self.models.known(candidate):
                return candidate
        return OTHER_MODEL

    def first_token(self, rid: str) -> None:
        self.ledger.first_token(rid, self.clock())
        if self.listener is not None:
            self.listener.streaming(rid)

    def tokens_streamed(self, rid: str, count: int) -> None:
        if count > 0:
            self.ledger.tokens(rid, self.clock(), count)

    def request_finished(
        self,
        rid: str,
        status: Status,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        *,
        tenant: str | None = None,
    ) -> None:
        """The request ended. ``tenant``, when given, replaces the label given at the
        start (the caller may downgrade it once it knows whether the response succeeded)."""
        req = self._open.pop(rid, None)
        if req is None:
            return
        if tenant is not None:
            req.tenant = tenant
            self.tenants = True
        label = self._final_label(req, status)
        self.ledger.relabel(rid, label, final=True)
        req.model = label
        self._tenant_of[rid] = req.tenant
        self.ledger.finish(
            rid,
            self.clock(),
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        if self.listener is not None:
            self.listener.finished(rid)
        self._count_finished(req.model, req.endpoint, status, prompt_tokens, completion_tokens)
        self._collect()

    def span_finished(self, span: RequestSpan) -> None:
        """Traces mode: the server reported a finished request (its span, seconds to
        minutes late). Its share is placed in the held intervals where it ran, from its
        scheduling to its end; its exact tokens count now; a retried export counts once.
        The request's final figure is handed out under ``span.request_id``."""
        if not self.traces:
            raise RuntimeError("span_finished() needs a meter made with traces_hold_s")
        label = self.models(span.model or self.default_model)  # the server served it
        placed = self.ledger.place(
            span.request_id,
            model=label,
            start_s=span.scheduled_s,
            first_token_s=span.first_token_s,
            end_s=span.end_s,
            prompt_tokens=span.prompt_tokens,
            completion_tokens=span.completion_tokens,
            cached_tokens=span.cached_tokens,
            endpoint="unknown",
        )
        if not placed:
            self.duplicate_spans += 1
            log.debug("meter.span_duplicate", request_id=span.request_id)
            return
        self._count_finished(label, "unknown", "ok", span.prompt_tokens, span.completion_tokens)
        self._collect()

    def server_running(self, since_s: float, until_s: float, running: dict[str, float]) -> None:
        """Traces mode: the server's running count by model over [since_s, until_s]
        (the observer's scrape): the live in-flight gauge, and how many requests each
        held interval waits to hear from."""
        labels: dict[str, int] = {}
        for model, n in running.items():
            label = self.models(model)
            labels[label] = labels.get(label, 0) + max(0, round(n))
        self._running = {k: v for k, v in labels.items() if v > 0}
        self.ledger.running(since_s, until_s, sum(labels.values()))
        self._collect()

    def _count_finished(
        self,
        model: str,
        endpoint: Endpoint,
        status: Status,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        key = (model, endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if n:
                tk = (model, kind)
                self.tokens[tk] = self.tokens.get(tk, 0) + n
        self._finished_inference += 1
        self._completion_tokens += completion_tokens or 0
        self._prompt_tokens += prompt_tokens or 0

    def other_request(self, status: Status) -> None:
        """A non-inference request (health, model list, metrics): counted, holds no energy."""
        key: tuple[str, Endpoint, Status] = (self.models(self.default_model), "other", status)
        self.requests[key] = self.requests.get(key, 0) + 1

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
        """Observer mode: the server's own counters for one model over [since_s, until_s].

        While the model is active (requests running, or tokens produced since the
        last scrape: short requests can start and end between two scrapes), it
        holds one activity span in the ledger, weighted by the tokens it
        processed, so dynamic energy splits between models by token throughput.
        The ledger holds intervals back by more than a scrape interval in this
        mode, so a span can open at the previous scrape. Gives energy per model
        and per token, not per request: no request is visible here.
        """
        self.ledger.upstream_ready(since_s)  # the server answers: its model is loaded
        if self._proxy_active():
            return  # the proxy sees every request itself; counting these too would double
        label = self.models(model)
        self._running[label] = max(0, round(running))
        work = round(prompt_tokens + completion_tokens)
        active = running > 0 or work > 0
        span = self._observed.get(label)
        rid = span[0] if span is not None else None
        if active and rid is None:
            # a fresh id per span: the last one may still sit in the ledger's hold
            rid = f"{OBSERVED}:{label}:{next(self._ids)}"
            self.ledger.start(rid, since_s, model=label, endpoint=OBSERVED)
            self.ledger.first_token(rid, since_s)
        if rid is not None:
            if work > 0:
                self.ledger.tokens(rid, until_s, work)
            if active:
                self.ledger.touch(rid, until_s)
                self._observed[label] = (rid, until_s)
            else:  # idle since the last scrape: the span ended there
                self.ledger.finish(rid, since_s, status="ok")
                del self._observed[label]
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if n > 0:
                tk = (label, kind)
                self.tokens[tk] = self.tokens.get(tk, 0) + round(n)
        if finished > 0:
            key: tuple[str, Endpoint, Status] = (label, "generate", "ok")
            self.requests[key] = self.requests.get(key, 0) + round(finished)
            self._finished_inference += round(finished)
        self._completion_tokens += round(max(0.0, completion_tokens))
        self._collect()

    def _proxy_active(self) -> bool:
        last = self.last_proxied_s
        return last is not None and self.clock() - last < PROXY_WINS_S

    def _end_observed_spans(self, now: float, *, stale_only: bool = False) -> None:
        """An activity span never outlives the observer's view of it: spans end where
        the observer last renewed them once the proxy takes over or the observer
        falls silent, and the server's running count they stood for goes with them."""
        for label, (rid, seen_s) in list(self._observed.items()):
            if stale_only and now - seen_s < OBSERVED_STALE_S:
                continue
            self.ledger.finish(rid, seen_s, status="ok")
            del self._observed[label]
            self._running.pop(label, None)
        if not stale_only:
            self._running.clear()

    def upstream_answered(self) -> None:
        """The model server answered (readiness): the start-up baseline begins now."""
        self.ledger.upstream_ready(self.clock())

    # --------------------------------------------------------------- power, time
    def on_samples(self, samples: Iterable[PowerSample]) -> None:
        gpus = self.ledger.gpus
        for s in samples:
            if s.gpu in gpus:
                self.ledger.sample(s.gpu, s.time_s, s.power_w, s.energy_j)
        self._collect()

    def tick(self) -> None:
        """Once a second or so: let bounded waits expire, accrue embodied, snapshot."""
        now = self.clock()
        if self._observed:
            self._end_observed_spans(now, stale_only=True)
        self.ledger.advance(now)
        self._collect()
        dt = max(0.0, now - self._last_tick_s)
        self._last_tick_s = now
        self.emissions_g["embodied"] += self.embodied_g_per_s * dt
        self._history.append(self._current(now))

    def flush(self) -> None:
        """Shutdown: assign everything and report every request."""
        self.ledger.flush()
        self._collect()

    def _collect(self) -> None:
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
        for f in self.ledger.pop_finished():
            if f.endpoint == OBSERVED:  # a model's stretch of activity, not a request
                continue
            self.request_j.setdefault(f.model, Histogram()).observe(f.energy_j)
            self._book_stages(f)
            self._book_tenant(f, intensity)
            log.debug(
                "request.finished",
                request_id=f.id,
                model=f.model,
                endpoint=f.endpoint,
                status=f.status,
                duration_s=round(f.end_s - f.start_s, 4),
                prompt_tokens=f.prompt_tokens,
                completion_tokens=f.completion_tokens,
                dynamic_j=round(f.dynamic_j, 4),
                idle_j=round(f.idle_j, 4),
                prefill_j=round(f.prefill_j, 4),
            )
            if self._on_finished is not None:
                try:
                    self._on_finished(f)
                except Exception:  # a recorder fault must not stop accounting
                    log.exception("meter.on_finished_failed")

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
        """Requests in flight by model: the proxy's, or in observer mode the server's count.

        Requests whose model is not a label yet (no successful response confirmed
        it) count under ``other``, so the gauge's label values stay bounded.
        """
        out: dict[str, int] = {}
        for model, n in self.ledger.in_flight().items():
            label = model if self.models.known(model) else OTHER_MODEL
            out[label] = out.get(label, 0) + n
        for label in self._observed:  # an activity span stands in for the running count
            out[label] = out.get(label, 0) - 1
        for label, n in self._running.items():
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
