"""Assembles one sidecar from its settings and runs it until SIGTERM.

Everything with a lifetime (the power source and its worker thread, the
sampler and ticker tasks, the upstream session, the recorder) is started in
:meth:`Sidecar.start` and released in :meth:`Sidecar.stop`, in reverse
order. The aiohttp applications come from factories that tests also use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from pydantic import SecretStr

from sidecar.carbon import CarbonIntensityTracker, EmbodiedModel, build_tracker
from sidecar.config import Credentials, Settings, split_host_port
from sidecar.ledger import FinishedRequest
from sidecar.meter import Meter, RunningFrom
from sidecar.metrics import BuildInfo, HealthCollector, SidecarCollector, make_registry
from sidecar.pending import WAITING_GPU, StartupCollector, UnmeteredMeter
from sidecar.power.backoff import Backoff
from sidecar.power.base import (
    ErrorReason,
    GpuInfo,
    PowerSample,
    PowerSource,
    PowerSourceError,
    PowerSourcePending,
)
from sidecar.power.factory import build_source
from sidecar.power.share import GpuShareRequired, require_share
from sidecar.power.simulated import SimulatedGpus
from sidecar.relay import listen_relay, proxy_class
from sidecar.sampler import Sampler, SamplerStats
from sidecar.server import create_metrics_app
from sidecar.trace import TraceRecorder
from sidecar.traces.metrics import TracesCollector
from sidecar.traces.service import ListenError, TracesService
from sidecar.tracking.observer import Observer
from sidecar.tracking.proxy import Proxy
from sidecar.tracking.tenant import build_tenants

log = structlog.get_logger("sidecar.app")

TICK_S = 0.5
OBSERVE_INTERVAL_S = 1.0
TRACES_HOLD_S = 900.0
"""How long a late span can still be placed in the intervals it ran in (CONTRACT.md)."""
WAIT_BACKOFF_CAP_S = 30.0
"""Longest pause between tries while the power source cannot name this pod's GPUs."""


class StartupError(Exception):
    """A start-up failure: one line naming the flag, exit status 2 (never a later crash)."""


def build_intensity(settings: Settings, env: Mapping[str, str]) -> CarbonIntensityTracker:
    """The carbon tracker the settings name; raises a one-line ValueError naming the flag."""
    creds = Credentials.from_env(env)
    return build_tracker(
        region=settings.region,
        provider=settings.carbon_provider,
        fixed_g_per_kwh=settings.carbon_intensity,
        zone=settings.carbon_zone,
        api_url=str(settings.carbon_api_url) if settings.carbon_api_url else None,
        refresh_s=settings.carbon_refresh,
        electricitymaps_token=_secret(creds.carbon_api_token),
        watttime_user=creds.watttime_user,
        watttime_password=_secret(creds.watttime_password),
    )


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


class RequestDrivenLoad:
    """In ``run --power-source simulated``, proxied requests drive the simulated GPU.

    A stand-in for what a real model server does to a real GPU: prefill work
    until the first token, then decode work per token, nothing after the end.
    """

    def __init__(self, model: SimulatedGpus, clock: Callable[[], float]) -> None:
        self._model = model
        self._clock = clock

    def started(self, rid: str) -> None:
        self._model.set_load(rid, self._clock(), 150.0)

    def streaming(self, rid: str) -> None:
        self._model.set_load(rid, self._clock(), 60.0)

    def finished(self, rid: str) -> None:
        self._model.set_load(rid, self._clock(), 0.0)
        self._model.forget(rid)


class Sidecar:
    """One running sidecar: source, sampler, meter, proxy, outputs."""

    def __init__(
        self,
        settings: Settings,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        simulated: SimulatedGpus | None = None,
        drive_simulated: bool | None = None,
    ) -> None:
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        self.clock = clock
        self.simulated = simulated
        if simulated is None and settings.power_source == "simulated":
            self.simulated = SimulatedGpus(gpus=len(settings.gpus) or 1)
        self._drive = (
            drive_simulated if drive_simulated is not None else simulated is None
        ) and self.simulated is not None
        self.carbon = build_intensity(settings, self.env)
        self.tenants = build_tenants(  # raises a one-line ValueError without the salt
            header=settings.tenant_header,
            from_api_key=settings.tenant_from_api_key,
            salt=_secret(Credentials.from_env(self.env).tenant_salt),
            max_tenants=settings.max_tenants,
        )
        self._carbon_session: aiohttp.ClientSession | None = None
        self.source: PowerSource | None = None
        self.gpus: list[GpuInfo] = []
        self.meter: Meter | None = None
        self.sampler: Sampler | None = None
        self.proxy: Proxy | None = None
        self.recorder: TraceRecorder | None = None
        self.observer: Observer | None = None
        self.traces: TracesService | None = None
        self._stack = contextlib.AsyncExitStack()
        """Start-up registers each step's undo here as it succeeds; :meth:`stop` unwinds it,
        so a failure at any step releases exactly what the steps before it took."""
        self._ready_session: aiohttp.ClientSession | None = None
        self._ready_cache: tuple[float, bool, str] = (-1e9, False, "not checked")
        self._unmetered: UnmeteredMeter | None = None  # the proxy's meter while no GPU is known
        self._startup_stats = SamplerStats()  # the wait's retries, before a sampler exists
        self._collector: tuple[Meter, SidecarCollector] | None = None

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open the power source and start metering; or, while it cannot name this pod's
        GPUs yet (:class:`PowerSourcePending`), serve un-metered and keep trying."""
        s = self.settings
        self.source = build_source(s, env=self.env, clock=self.clock, simulated=self.simulated)
        self._stack.push_async_callback(asyncio.to_thread, self.source.close)
        try:
            self.gpus = await asyncio.to_thread(self.source.open)
        except PowerSourcePending as e:
            await self._start_waiting(str(e))
            return
        require_share(self.gpus, s.gpu_share)
        await self._start_metered()

    async def _start_metered(self) -> None:
        """Everything built from the GPU list: meter, sampler, proxy, observer, carbon."""
        s = self.settings
        assert self.source is not None
        if not self.gpus:
            raise PowerSourceError(f"power source {s.power_source!r} reports no GPU")
        if s.record is not None:
            self.recorder = TraceRecorder(s.record, wall_offset_s=time.time() - self.clock())
            self._stack.callback(self.recorder.close)
        idle = _idle_map(s.idle_watts, self.gpus)
        embodied = EmbodiedModel.for_gpus(
            self.gpus[0].name,
            len(self.gpus),
            gpu_embodied_kg=s.gpu_embodied_kg,
            host_embodied_kg=s.host_embodied_kg,
            lifetime_years=s.lifetime_years,
        )
        if s.record is not None:  # run.json: the boundary and carbon inputs a report states
            from sidecar.meter import BOUNDARY
            from sidecar.report.runinfo import record_start

            record_start(
                s.record,
                settings=s,
                gpus=self.gpus,
                embodied=embodied,
                carbon=self.carbon,
                boundary=BOUNDARY,
            )
        self.meter = Meter(
            self.gpus,
            clock=self.clock,
            idle_watts=idle,
            max_models=s.max_models,
            default_model=s.model,
            intensity=self.carbon,
            pue=s.pue,
            embodied_g_per_s=embodied.grams_per_second,
            budget_g_per_day=s.emissions_budget,
            on_finished=self._record_request,
            hold_s=2.5 * OBSERVE_INTERVAL_S if s.mode == "observer" else 0.0,
            proxy_hold_s=s.proxy_hold,
            sample_period_s=1.0 / s.sample_hz,
            traces_hold_s=TRACES_HOLD_S if s.otlp_listen is not None else None,
            running_from=_running_from(s),
        )
        self.meter.slice_work()
        if s.otlp_listen is not None:  # stops (last energy spans out) after the final flush
            self._stack.push_async_callback(self._traces_service(self.meter).stop)
        self._stack.callback(self._final_flush)
        self.sampler = Sampler(
            self.source,
            self.gpus,
            hz=s.sample_hz,
            sink=self.meter.on_samples,
            raw_sink=self._record_power if self.recorder else None,
            clock=self.clock,
        )
        self.meter.samples_wanted = self.sampler.cut_windows  # receipts: final sooner
        self._spawn(self.sampler.run(), "sampler")
        self._spawn(self._ticker(), "ticker")
        if s.upstream is not None:
            self.proxy = proxy_class(s.data_plane)(
                self.meter,
                str(s.upstream),
                connect_timeout_s=s.upstream_connect_timeout,
                read_timeout_s=s.upstream_read_timeout,
                inject_usage=s.inject_usage,
                receipts=s.energy_receipts,
                tenants=self.tenants,
                clock=self.clock,
                token_period_s=1.0 / s.sample_hz,  # streamed tokens reach the meter once a sample
            )
            await self.proxy.start()
            self._stack.push_async_callback(self.proxy.close)
            if self._drive and self.simulated is not None:
                self.meter.listener = RequestDrivenLoad(self.simulated, self.clock)
        if s.observe is not None:
            self.observer = Observer(
                str(s.observe),
                default_model=s.model,
                interval_s=OBSERVE_INTERVAL_S,
                clock=self.clock,
                on_observation=self.meter.observer.on_observation,
            )
            self._stack.push_async_callback(self.observer.close)
            self._spawn(self.observer.run(), "observer")
        if self.traces is not None:
            await self._start_traces()
        if self._ready_session is None:  # the wait for the GPUs may have opened it
            self._ready_session = self._session(aiohttp.ClientTimeout(total=2.0))
        self._carbon_session = self._session(None)
        await self.carbon.start(self._carbon_session)
        self._stack.push_async_callback(self.carbon.stop)
        log.info(
            "sidecar.started",
            mode=s.mode,
            power_source=s.power_source.split(":", 1)[0],
            gpus=[g.uuid for g in self.gpus],
            sample_hz=s.sample_hz,
        )

    def _traces_service(self, meter: Meter) -> TracesService:
        """Traces mode: the OTLP receiver on --otlp-listen feeds the meter request spans."""
        self.traces = TracesService(
            self.settings,
            on_span=meter.span_finished,
            clock=self.clock,
            wall_offset_s=time.time() - self.clock(),
            grams_per_joule=lambda: meter.intensity.g_per_kwh * meter.pue / 3.6e6,
        )
        return self.traces

    async def _start_traces(self) -> None:
        assert self.traces is not None
        # receiver off before the final flush, so every span received is accounted
        self._stack.push_async_callback(self.traces.stop_listening)
        try:
            await self.traces.start()
        except ListenError as e:
            raise StartupError(f"--otlp-listen: {e}") from e

    async def _start_waiting(self, detail: str) -> None:
        """No GPU known yet: the proxy passes traffic un-metered while a task keeps trying."""
        s = self.settings
        log.warning(
            "sidecar.power_source_waiting",
            power_source=s.power_source.split(":", 1)[0],
            detail=detail,
        )
        self._unmetered = UnmeteredMeter(
            clock=self.clock, intensity=self.carbon, max_models=s.max_models, default_model=s.model
        )
        self._note_waiting("not_mapped", detail)
        if s.upstream is not None:
            self.proxy = proxy_class(s.data_plane)(
                self._unmetered,
                str(s.upstream),
                connect_timeout_s=s.upstream_connect_timeout,
                read_timeout_s=s.upstream_read_timeout,
                inject_usage=False,  # nothing is metered: the client gets the upstream untouched
                clock=self.clock,
            )
            await self.proxy.start()
            self._stack.push_async_callback(self.proxy.close)
        self._ready_session = self._session(aiohttp.ClientTimeout(total=2.0))
        self._spawn(self._attach_when_ready(), "power-source-wait")

    def _note_waiting(self, reason: ErrorReason, detail: str) -> None:
        key = (WAITING_GPU, reason)
        errors = self._startup_stats.errors
        errors[key] = errors.get(key, 0) + 1
        if self._unmetered is not None:
            self._unmetered.detail = detail

    async def _attach_when_ready(self) -> None:
        """Retry the source with capped, jittered backoff; attach the GPUs once it names them."""
        source = self.source
        assert source is not None
        backoff = Backoff(base_s=1.0, cap_s=WAIT_BACKOFF_CAP_S, clock=self.clock)
        waited_from_s = self.clock()
        while True:
            await asyncio.sleep(backoff.failed())
            try:
                gpus = await asyncio.to_thread(source.open)
                require_share(gpus, self.settings.gpu_share)
            except PowerSourcePending as e:
                self._note_waiting("not_mapped", str(e))
                log.info("sidecar.power_source_waiting", detail=str(e), attempts=backoff.failures)
                continue
            except PowerSourceError as e:  # a setting that cannot work: say so, keep serving
                self._note_waiting("unknown", str(e))
                log.error("sidecar.power_source_failed", detail=str(e), attempts=backoff.failures)
                continue
            break
        previous = self.proxy
        self.gpus = gpus
        try:
            await self._start_metered()
        except Exception:  # the proxy keeps serving un-metered; the log says why
            log.exception("sidecar.attach_failed")
            return
        if self.sampler is not None:
            for key, n in self._startup_stats.errors.items():
                self.sampler.stats.errors[key] = self.sampler.stats.errors.get(key, 0) + n
        if self._unmetered is not None:
            self._unmetered.attached = self.meter
        if previous is not None and previous is not self.proxy:
            self._spawn(self._retire(previous), "proxy-retire")
        log.info(
            "sidecar.power_source_attached",
            gpus=[g.uuid for g in self.gpus],
            waited_s=round(self.clock() - waited_from_s, 1),
            unmetered_requests=0 if self._unmetered is None else self._unmetered.unmetered,
        )

    @staticmethod
    async def _retire(proxy: Proxy) -> None:
        """Let the un-metered proxy's streams finish, then close its upstream session."""
        try:
            # The proxy exposes a count, not an event: poll it, for one drain at most.
            while proxy.inflight > 0:  # noqa: ASYNC110
                await asyncio.sleep(0.5)
        finally:
            await proxy.close()

    async def stop(self) -> None:
        """Unwind start-up in reverse: tasks cancelled, receiver off, last flush, energy
        spans out, sessions and the power source closed. Safe to call twice."""
        await self._stack.aclose()
        log.info("sidecar.stopped")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A task that the exit stack cancels (and awaits) in its turn."""
        task = asyncio.create_task(coro, name=name)
        self._stack.push_async_callback(_cancel, task)

    def _session(self, timeout: aiohttp.ClientTimeout | None) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(timeout=timeout) if timeout else aiohttp.ClientSession()
        self._stack.push_async_callback(session.close)
        return session

    def _final_flush(self) -> None:
        """Every reading and every request still held becomes a figure (after the
        sources stopped, before the energy spans go out)."""
        if self.sampler is not None:
            self.sampler.flush()
        if self.meter is not None:
            self.meter.flush()

    async def _ticker(self) -> None:
        assert self.meter is not None
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.meter.tick()
                if self.recorder is not None:
                    self.recorder.flush()
            except Exception:
                log.exception("sidecar.tick_failed")

    # ------------------------------------------------------------------- outputs
    def _record_power(self, sample: PowerSample) -> None:
        if self.recorder is not None:
            self.recorder.power(sample.time_s, sample.gpu, sample.power_w, sample.energy_j)

    def _record_request(self, finished: FinishedRequest) -> None:
        if self.recorder is not None:
            self.recorder.request(finished)
        if self.traces is not None:
            self.traces.finished(finished)

    def stats(self) -> SamplerStats:
        return self.sampler.stats if self.sampler is not None else self._startup_stats

    async def ready(self) -> tuple[bool, str]:
        """Proxy mode: the upstream answers (any HTTP status). Cached for a second."""
        upstream = self.settings.upstream
        if upstream is None:
            return True, f"{self.settings.mode} mode: no upstream in the path"
        at, ok, detail = self._ready_cache
        now = self.clock()
        if now - at < 1.0:
            return ok, detail
        try:
            assert self._ready_session is not None
            async with self._ready_session.get(str(upstream)) as r:
                ok, detail = True, f"upstream answered {r.status}"
            if self.meter is not None and r.status < 500:  # loaded: start-up baseline begins
                self.meter.upstream_answered()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            ok, detail = False, f"upstream unreachable ({type(e).__name__})"
        self._ready_cache = (now, ok, detail)
        return ok, detail

    def _current_collector(self) -> SidecarCollector | None:
        """The full collector over the meter in force; ``None`` while no GPU is known."""
        meter = self.meter
        if meter is None:
            return None
        if self._collector is None or self._collector[0] is not meter:
            build = BuildInfo(self.settings.power_source.split(":", 1)[0], self.settings.mode)
            self._collector = (meter, SidecarCollector(meter, self.stats, build))
        return self._collector[1]

    def _observer_errors(self) -> dict[str, int]:
        observer = self.observer
        return {} if observer is None else {str(k): n for k, n in observer.errors_by_reason.items()}

    def metrics_app(self) -> web.Application:
        meter = self.meter if self.meter is not None else self._unmetered
        assert meter is not None
        startup = StartupCollector(
            self._current_collector,
            self._unmetered,
            self.stats,
            power_source=self.settings.power_source.split(":", 1)[0],
            mode=self.settings.mode,
        )
        health = HealthCollector(
            observer_errors=self._observer_errors,
            carbon_errors=lambda: self.carbon.refresh_errors,
        )
        traces = TracesCollector(lambda: self.traces)
        app = create_metrics_app(
            make_registry(startup, health, traces), meter, self.stats, self.ready
        )
        from sidecar.page import add_page_route

        add_page_route(app)  # `/`: the live page, fed by /summary
        return app

    def proxy_app(self) -> web.Application:
        assert self.proxy is not None
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._proxy_handle)
        return app

    async def _proxy_handle(self, request: web.Request) -> web.StreamResponse:
        """The proxy in force: the un-metered one until the GPUs are known, then the metered."""
        assert self.proxy is not None
        return await self.proxy.handle(request)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # a task that died earlier: report it, release the rest
        log.exception("sidecar.task_failed", task=task.get_name())


def _running_from(s: Settings) -> RunningFrom | None:
    """Traces mode: the server's running count comes from the observer, else the proxy."""
    if s.observe is not None:
        return "observer"
    return "proxy" if s.upstream is not None else None


def _idle_map(values: tuple[float, ...], gpus: list[GpuInfo]) -> dict[str, float] | None:
    if not values:
        return None
    if len(values) == 1:
        return {g.gpu: values[0] / len(gpus) for g in gpus}
    if len(values) != len(gpus):
        raise StartupError(
            f"--idle-watts: {len(values)} values for {len(gpus)} GPUs (give one total or one per GPU)"
        )
    return {g.gpu: v for g, v in zip(gpus, values, strict=True)}


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; drain in-flight requests within the grace period.

    Failures before serving raise :class:`StartupError` naming the flag; anything
    raised once serving propagates as the crash it is.
    """
    sidecar = await _started(settings)
    runners: list[Any] = []  # aiohttp's AppRunners, or the relay's server first
    try:
        metrics_runner = web.AppRunner(sidecar.metrics_app(), access_log=None)
        await metrics_runner.setup()
        runners.append(metrics_runner)
        await _listen(metrics_runner, settings.metrics_listen, "--metrics-listen")
        if sidecar.proxy is not None and settings.data_plane == "relay":
            runners.insert(0, await listen_relay(sidecar, settings))
        elif sidecar.proxy is not None:
            proxy_runner = web.AppRunner(
                sidecar.proxy_app(),
                access_log=None,
                handler_cancellation=True,
                # aiohttp reads 0 as "no limit": a zero grace period means a moment
                shutdown_timeout=max(settings.grace_period, 0.001),
            )
            await proxy_runner.setup()
            runners.insert(0, proxy_runner)
            await _listen(proxy_runner, settings.listen, "--listen")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        proxy = settings.listen if sidecar.proxy else None
        log.info("sidecar.listening", proxy=proxy, metrics=settings.metrics_listen)
        await stop.wait()
        log.info(
            "sidecar.draining",
            inflight=sidecar.proxy.inflight if sidecar.proxy else 0,
            grace_s=settings.grace_period,
        )
    finally:
        for runner in runners:  # the proxy first: stop accepting, let streams finish
            await runner.cleanup()
        await sidecar.stop()
    return 0


async def _started(settings: Settings) -> Sidecar:
    """A started sidecar, or a :class:`StartupError` naming the flag at fault."""
    try:
        sidecar = Sidecar(settings)
    except ValueError as e:  # carbon or tenant settings that cannot work together
        raise StartupError(str(e).splitlines()[0]) from e
    try:
        await sidecar.start()
    except BaseException as e:
        try:
            await sidecar.stop()  # release what started before the failure
        except Exception:
            log.exception("sidecar.stop_after_failed_start")
        if isinstance(e, StartupError):
            raise
        if isinstance(e, GpuShareRequired):
            raise StartupError(f"--gpu-share: {e}") from e
        if isinstance(e, PowerSourceError):
            raise StartupError(f"--power-source: {e}") from e
        if isinstance(e, ValueError):
            raise StartupError(str(e).splitlines()[0]) from e
        if isinstance(e, OSError):  # --record DIR not writable, typically
            raise StartupError(f"--record: {e.strerror or e}") from e
        raise
    return sidecar


async def _listen(runner: web.AppRunner, listen: str, flag: str) -> None:
    host, port = split_host_port(listen)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:  # a port in use, typically
        raise StartupError(f"{flag}: cannot listen on {listen}: {e.strerror or e}") from e
