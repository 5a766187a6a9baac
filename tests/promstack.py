"""A real monitoring stack for integration tests: sidecar, Prometheus, Alertmanager, webhook.

Everything listens on 127.0.0.1 on free ports, writes into a private directory the caller
owns, and is stopped when its ``async with`` block ends (even when the test fails), so no
process outlives a test. Prometheus and Alertmanager log to files in that directory; their
tails are attached to errors so a failure says what the outside program thought.

The pieces are async context managers, so a module-scoped fixture (``loop_scope="module"``)
can hold one stack for every test of a module. ``scraped_sidecar`` puts the usual one
together (stand-in upstream, sidecar, Prometheus scraping it every second, some load)::

    async with scraped_sidecar(tmp, "--carbon-intensity", "394") as run:
        rows = await run.prometheus.query("sum(llm_energy_joules_total)", run.last_scrape_s)
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import aiohttp
import yaml
from aiohttp import web
from procs import free_port, start_simulated, wait_http
from tools import require_tool
from upstreams import create_upstream

__all__ = [
    "JOB",
    "NAMESPACE",
    "POD",
    "LoadReport",
    "Prometheus",
    "PrometheusError",
    "ScrapeTarget",
    "ScrapedRun",
    "Sidecar",
    "WebhookReceiver",
    "drive_load",
    "format_seconds",
    "running_alertmanager",
    "running_prometheus",
    "running_sidecar",
    "running_upstream",
    "running_webhook",
    "sample_value",
    "scraped_sidecar",
]

JOB: Final = "llm-energy-sidecar"
"""The scrape job name; the rules aggregate budgets by (namespace, job)."""
NAMESPACE: Final = "llm-test"
"""Added as a target label, as a PodMonitor scrape would."""
POD: Final = "llm-test-0"

_STOP_TIMEOUT_S: Final = 10.0
_LOG_TAIL_CHARS: Final = 4000


class PrometheusError(AssertionError):
    """Prometheus' HTTP API answered with an error (bad PromQL, timeout, ...)."""

    def __init__(self, message: str, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


def format_seconds(seconds: float) -> str:
    """A Prometheus duration in whole milliseconds (``1.5`` -> ``1500ms``)."""
    return f"{round(seconds * 1000)}ms"


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-_LOG_TAIL_CHARS:]


async def _stop_popen(proc: subprocess.Popen[Any], timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait, then SIGKILL: the process is gone when this returns."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


async def _stop(proc: Process, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait, then SIGKILL: the process is gone (and reaped) when this returns."""
    if proc.returncode is None:
        with suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


async def _spawn(args: Sequence[str], log: Path, cwd: Path) -> Process:
    """Start ``args`` with stdout and stderr going to ``log``."""
    log_file = await asyncio.to_thread(_open_log, log)
    try:
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            cwd=cwd,
        )
    finally:
        log_file.close()


async def _wait_ready(url: str, proc: Process, log: Path, timeout_s: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early with the log tail if the process dies."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(
                    f"{url}: process exited with {proc.returncode}:\n{_log_tail(log)}"
                )
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    await r.read()
                    if r.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready within {timeout_s} s:\n{_log_tail(log)}")
            await asyncio.sleep(0.1)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _write_yaml(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False), encoding="utf-8")


# Stand-in model server and sidecar ----------------------------------------------------------


@asynccontextmanager
async def running_upstream() -> AsyncIterator[str]:
    """The stand-in model server (tests/upstreams.py) on 127.0.0.1; yields its base URL.

    Unlike pytest-aiohttp's function-scoped ``aiohttp_server``, this works in a module-scoped
    fixture.
    """
    runner = web.AppRunner(create_upstream(), handle_signals=False)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One Prometheus scrape job: ``job`` and extra target labels, as a PodMonitor sets them."""

    address: str
    job: str = JOB
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sidecar:
    """A running ``llm-energy-sidecar run`` process."""

    proc: subprocess.Popen[str]
    proxy_url: str
    metrics_address: str

    def target(self, *, namespace: str = NAMESPACE, pod: str = POD, job: str = JOB) -> ScrapeTarget:
        """This sidecar as a scrape target labelled like a PodMonitor would label it."""
        return ScrapeTarget(self.metrics_address, job, {"namespace": namespace, "pod": pod})


@asynccontextmanager
async def running_sidecar(
    upstream_url: str, *args: str, port: int | None = None, metrics_port: int | None = None
) -> AsyncIterator[Sidecar]:
    """A sidecar on a simulated GPU in front of ``upstream_url``; ``args`` are extra flags.

    Choose ``metrics_port`` beforehand to start Prometheus first: Prometheus 2.42 scrapes a
    new target only about 5 s after start (its discovery manager batches updates), and that
    wait can overlap the sidecar's start. Logs only warnings, so its pipes cannot fill up
    during a test; stopped with SIGTERM.
    """
    port = port or free_port()
    mport = metrics_port or free_port()
    proc = start_simulated(
        upstream_url,
        port,
        mport,
        "--log-level",
        "warning",
        "--grace-period",
        "2",
        *args,
    )
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", proc=proc)
        yield Sidecar(proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{mport}")
    finally:
        await _stop_popen(proc)
        await asyncio.to_thread(proc.communicate)  # drain and close the pipes


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What :func:`drive_load` sent and got back."""

    requests: int
    streams: int
    completion_tokens: int
    by_model: Mapping[str, int]
    started_s: float
    """Wall-clock (Unix) time of the first request, for Prometheus' ``time`` parameter."""
    finished_s: float

    def __add__(self, other: LoadReport) -> LoadReport:
        by_model = dict(self.by_model)
        for model, n in other.by_model.items():
            by_model[model] = by_model.get(model, 0) + n
        return LoadReport(
            self.requests + other.requests,
            self.streams + other.streams,
            self.completion_tokens + other.completion_tokens,
            by_model,
            min(self.started_s, other.started_s),
            max(self.finished_s, other.finished_s),
        )


async def drive_load(
    proxy_url: str,
    *,
    requests: int = 40,
    duration_s: float = 10.0,
    models: Sequence[str] = ("llama-small", "llama-large"),
) -> LoadReport:
    """Send ``requests`` chat completions spread evenly over ``duration_s``, overlapping.

    Every other request streams (with ``include_usage``, token by token with a short delay),
    the rest are plain JSON answers; models alternate. Every request must answer 200.
    """
    started = time.time()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    by_model: dict[str, int] = {}
    completion_tokens = 0
    streams = 0

    async def one(i: int, session: aiohttp.ClientSession) -> int:
        await asyncio.sleep(max(0.0, t0 + i * duration_s / requests - loop.time()))
        stream = i % 2 == 1
        max_tokens = 8 + (i % 5) * 4
        body: dict[str, Any] = {
            "model": models[(i // 2) % len(models)],
            "messages": [{"role": "user", "content": f"request {i}: count the joules"}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
            body["delay"] = 0.02
        async with session.post(f"{proxy_url}/v1/chat/completions", json=body) as r:
            payload = await r.read()
            assert r.status == 200, payload[:500]
        return max_tokens

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(i, session) for i in range(requests)))
    for i, tokens in enumerate(results):
        model = models[(i // 2) % len(models)]
        by_model[model] = by_model.get(model, 0) + 1
        completion_tokens += tokens
        streams += i % 2
    return LoadReport(requests, streams, completion_tokens, by_model, started, time.time())


# Prometheus ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Prometheus:
    """A running Prometheus and a client for its HTTP API (``/api/v1/...``)."""

    url: str
    proc: Process
    log: Path
    session: aiohttp.ClientSession

    def log_tail(self) -> str:
        return _log_tail(self.log)

    async def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a success, else :class:`PrometheusError`."""
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params or {}) as r:
            text = await r.text()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrometheusError(f"/api/v1/{path}: HTTP {r.status}, not JSON: {text[:300]}") from e
        if doc.get("status") != "success":
            raise PrometheusError(
                f"/api/v1/{path} {dict(params or {})}: {doc.get('errorType')}: {doc.get('error')}",
                str(doc.get("errorType", "")),
            )
        return doc["data"]

    async def query(self, expr: str, at_s: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the vector's samples (a scalar comes back as one sample)."""
        params = {"query": expr}
        if at_s is not None:
            params["time"] = f"{at_s:.3f}"
        data = await self.api("query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def query_range(
        self, expr: str, start_s: float, end_s: float, step_s: float
    ) -> list[dict[str, Any]]:
        """A range query; the matrix's series."""
        data = await self.api(
            "query_range",
            {
                "query": expr,
                "start": f"{start_s:.3f}",
                "end": f"{end_s:.3f}",
                "step": format_seconds(step_s),
            },
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str, at_s: float | None = None) -> float:
        """The single value of an instant query that must return exactly one sample."""
        rows = await self.query(expr, at_s)
        assert len(rows) == 1, f"{expr!r} returned {len(rows)} samples: {rows}"
        return float(rows[0]["value"][1])

    async def wait_until(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout_s: float = 30.0,
        interval_s: float = 0.25,
    ) -> list[dict[str, Any]]:
        """Re-run an instant query until ``predicate(result)`` holds; return that result."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = await self.query(expr)
            if predicate(rows):
                return rows
            if self.proc.returncode is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{expr!r} did not satisfy the condition within {timeout_s} s; "
                    f"last result {rows}\n{self.log_tail()}"
                )
            await asyncio.sleep(interval_s)

    async def wait_scraped(self, address: str, timeout_s: float = 30.0) -> None:
        """Wait until a scrape of ``address`` succeeded (``up == 1``)."""
        await self.wait_until(f'up{{instance="{address}"}} == 1', timeout_s=timeout_s)

    async def scrape_time(self, address: str) -> float:
        """Unix time of the newest stored scrape of ``address`` (the timestamp of its ``up``)."""
        rows = await self.query(f'timestamp(up{{instance="{address}"}})')
        assert rows, f"no scrape of {address} yet"
        return float(rows[0]["value"][1])

    async def wait_next_scrapes(
        self, address: str, count: int = 1, timeout_s: float = 15.0
    ) -> float:
        """Wait until ``count`` scrapes of ``address`` newer than now are stored; return the last."""
        after = time.time()
        deadline = time.monotonic() + timeout_s
        seen = 0
        last = await self.scrape_time(address)
        while True:
            t = await self.scrape_time(address)
            if t > last and t > after:
                seen += 1
                last = t
                if seen >= count:
                    return t
            if time.monotonic() > deadline:
                raise TimeoutError(f"no new scrape of {address} within {timeout_s} s")
            await asyncio.sleep(0.1)


def prometheus_config(
    targets: Sequence[ScrapeTarget],
    *,
    rule_files: Sequence[Path] = (),
    alertmanager: str | None = None,
    scrape_interval_s: float = 1.0,
    evaluation_interval_s: float = 1.0,
) -> dict[str, Any]:
    """The ``prometheus.yml`` document for these targets, rules and Alertmanager."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        static: dict[str, Any] = {"targets": [t.address]}
        if t.labels:
            static["labels"] = dict(t.labels)
        jobs.setdefault(t.job, []).append(static)
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": format_seconds(scrape_interval_s),
            "scrape_timeout": format_seconds(scrape_interval_s),
            "evaluation_interval": format_seconds(evaluation_interval_s),
        },
        "scrape_configs": [
            {"job_name": job, "static_configs": statics} for job, statics in jobs.items()
        ],
    }
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    if alertmanager is not None:
        config["alerting"] = {
            "alertmanagers": [
                {"api_version": "v2", "static_configs": [{"targets": [alertmanager]}]}
            ]
        }
    return config


@asynccontextmanager
async def running_prometheus(
    directory: Path,
    targets: Sequence[ScrapeTarget],
    *,
    rules: str | None = None,
    alertmanager: str | None = None,
    scrape_interval_s: float = 1.0,
    evaluation_interval_s: float = 1.0,
) -> AsyncIterator[Prometheus]:
    """Debian's ``prometheus`` on 127.0.0.1 with its data in ``directory``; stopped at exit.

    ``rules`` is the text of a rule file (for example ``rules_yaml(timing)``); ``alertmanager``
    the ``host:port`` it sends alerts to. Skips the test when ``prometheus`` is not installed.
    """
    binary = require_tool("prometheus")
    rule_files: list[Path] = []
    if rules is not None:
        rule_path = directory / "rules.yml"
        await asyncio.to_thread(_write_text, rule_path, rules)
        rule_files.append(rule_path)
    config_path = directory / "prometheus.yml"
    config = prometheus_config(
        targets,
        rule_files=rule_files,
        alertmanager=alertmanager,
        scrape_interval_s=scrape_interval_s,
        evaluation_interval_s=evaluation_interval_s,
    )
    await asyncio.to_thread(_write_yaml, config_path, config)
    port = free_port()
    log = directory / "prometheus.log"
    proc = await _spawn(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=info",
        ],
        log,
        directory,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(f"{url}/-/ready", proc, log)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            yield Prometheus(url, proc, log, session)
    finally:
        await _stop(proc)


# Alertmanager and the webhook receiver ---------------------------------------------------------


@dataclass(slots=True)
class WebhookReceiver:
    """An aiohttp server that stores every Alertmanager webhook payload it receives."""

    url: str
    payloads: list[dict[str, Any]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every payload, in arrival order."""
        return [alert for p in self.payloads for alert in p.get("alerts", [])]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Wait for an alert matching ``predicate``; return (payload, alert)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for payload in self.payloads:
                for alert in payload.get("alerts", []):
                    if predicate(alert):
                        return payload, alert
            self._arrived.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                names = [a.get("labels", {}).get("alertname") for a in self.alerts()]
                raise TimeoutError(f"no matching alert within {timeout_s} s; received {names}")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _handle(self, request: web.Request) -> web.Response:
        self.payloads.append(await request.json())
        self._arrived.set()
        return web.Response(text="ok")


@asynccontextmanager
async def running_webhook() -> AsyncIterator[WebhookReceiver]:
    """A webhook receiver on 127.0.0.1; its ``url`` goes into Alertmanager's config."""
    port = free_port()
    receiver = WebhookReceiver(f"http://127.0.0.1:{port}/alerts")
    app = web.Application()
    app.router.add_post("/alerts", receiver._handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield receiver
    finally:
        await runner.cleanup()


def alertmanager_config(
    webhook_url: str, *, group_wait_s: float = 1.0, group_interval_s: float = 1.0
) -> dict[str, Any]:
    """One route to one webhook receiver, grouped per alert and deployment."""
    return {
        "route": {
            "receiver": "test-webhook",
            "group_by": ["alertname", "namespace", "job"],
            "group_wait": format_seconds(group_wait_s),
            "group_interval": format_seconds(group_interval_s),
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "test-webhook",
                "webhook_configs": [{"url": webhook_url, "send_resolved": False}],
            }
        ],
    }


@asynccontextmanager
async def running_alertmanager(
    directory: Path,
    webhook_url: str,
    *,
    group_wait_s: float = 1.0,
    group_interval_s: float = 1.0,
) -> AsyncIterator[str]:
    """Debian's ``prometheus-alertmanager`` on 127.0.0.1, clustering off; yields ``host:port``.

    Skips the test when the binary is not installed.
    """
    binary = require_tool("prometheus-alertmanager")
    config_path = directory / "alertmanager.yml"
    config = alertmanager_config(
        webhook_url, group_wait_s=group_wait_s, group_interval_s=group_interval_s
    )
    await asyncio.to_thread(_write_yaml, config_path, config)
    port = free_port()
    log = directory / "alertmanager.log"
    proc = await _spawn(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # no gossip port on 0.0.0.0
            "--log.level=info",
        ],
        log,
        directory,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{port}/-/ready", proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        await _stop(proc)


# Results ----------------------------------------------------------------------------------------


def sample_value(row: Mapping[str, Any]) -> float:
    """The float value of one instant-vector sample."""
    return float(row["value"][1])


# One scraped sidecar run -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScrapedRun:
    """A sidecar under load, scraped by Prometheus, as :func:`scraped_sidecar` left it."""

    prometheus: Prometheus
    sidecar: Sidecar
    load: LoadReport
    first_scrape_s: float
    """Unix time of a scrape taken before the second half of the load started."""
    last_scrape_s: float
    """Unix time of a scrape taken after every request had finished."""


@asynccontextmanager
async def scraped_sidecar(
    directory: Path,
    *sidecar_args: str,
    rules: str | None = None,
    alertmanager: str | None = None,
    requests: int = 40,
    duration_s: float = 10.0,
    settle_scrapes: int = 2,
) -> AsyncIterator[ScrapedRun]:
    """Prometheus scraping a loaded sidecar (simulated GPU, stand-in upstream) every second.

    Prometheus starts first, so its start-up delay before the first scrape overlaps the
    sidecar's start and the first half of the load; the second half starts only after a
    scrape is stored, so counters are seen to move between scrapes. Returns after
    ``settle_scrapes`` scrapes past the end of the load. Everything stops when the block ends.
    """
    metrics_port = free_port()
    address = f"127.0.0.1:{metrics_port}"
    target = ScrapeTarget(address, JOB, {"namespace": NAMESPACE, "pod": POD})
    async with (
        running_upstream() as upstream,
        running_prometheus(directory, [target], rules=rules, alertmanager=alertmanager) as prom,
        running_sidecar(upstream, *sidecar_args, metrics_port=metrics_port) as sidecar,
    ):
        first_half = asyncio.create_task(
            drive_load(sidecar.proxy_url, requests=requests // 2, duration_s=duration_s / 2)
        )
        try:
            await prom.wait_scraped(address)
            first_scrape_s = await prom.scrape_time(address)
            load = await first_half
        finally:
            if not first_half.done():
                first_half.cancel()
                with suppress(asyncio.CancelledError):
                    await first_half
        load += await drive_load(
            sidecar.proxy_url, requests=requests - requests // 2, duration_s=duration_s / 2
        )
        last_scrape_s = await prom.wait_next_scrapes(address, settle_scrapes)
        yield ScrapedRun(prom, sidecar, load, first_scrape_s, last_scrape_s)
