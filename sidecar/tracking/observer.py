"""Observer mode: what a model server's own ``/metrics`` says, scrape by scrape.

When the sidecar cannot sit in the request path (``--observe URL``), the
server's Prometheus counters are the only view of its work: how many requests
are running (the in-flight count of CONTRACT.md) and how many prompt and
generated tokens it has processed. Differences between two scrapes attribute
dynamic energy to models by token throughput. This yields energy per token
and per model over an interval, never per request: servers expose no request
ids, and some counters only move when a request finishes (SGLang) or its
prefill completes (vLLM prompt tokens).

Servers are recognised by metric names (REFERENCE.md section 2). Counters are
read as the server exposes them, cumulative; :func:`compute_delta` turns two
observations into increments, treating a counter that went down as a server
restart.

``prometheus_client``'s text parser names a counter family without its
``_total`` suffix and, for a counter typed without that suffix (TGI's
``tgi_request_success``), appends ``_total`` to its samples. Samples are
therefore matched by name with any ``_total`` suffix removed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import aiohttp
import structlog
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "Observation",
    "ObservationDelta",
    "Observer",
    "ServerKind",
    "compute_delta",
    "detect_server",
    "observation_from_families",
    "parse_exposition",
]

_log = structlog.get_logger(__name__)

ServerKind = Literal["vllm", "sglang", "tgi", "llamacpp", "unknown"]

MODEL_LABEL: Final = "model_name"
MAX_BODY_BYTES: Final = 32 << 20  # a /metrics page larger than this is not a model server's
_ACCEPT: Final = "text/plain;version=0.0.4;q=1.0, application/openmetrics-text;q=0.5, */*;q=0.1"
_TOTAL: Final = "_total"


@dataclass(frozen=True, slots=True)
class _Series:
    """The sample names (``_total`` removed) that carry each figure for one server."""

    running: str
    prompt_tokens: str
    generation_tokens: str
    requests: str | None


_SERVERS: Final[Mapping[ServerKind, _Series]] = {
    "vllm": _Series(
        "vllm:num_requests_running",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
    ),
    "sglang": _Series(
        "sglang:num_running_reqs",
        "sglang:prompt_tokens",
        "sglang:generation_tokens",
        "sglang:num_requests",
    ),
    # TGI has no token counters: its histograms' sums are running token totals.
    "tgi": _Series(
        "tgi_batch_current_size",
        "tgi_request_input_length_sum",
        "tgi_request_generated_tokens_sum",
        "tgi_request_success",
    ),
    # llama.cpp exposes no request counter.
    "llamacpp": _Series(
        "llamacpp:requests_processing",
        "llamacpp:prompt_tokens",
        "llamacpp:tokens_predicted",
        None,
    ),
}
_WANTED: Final = frozenset(
    name
    for series in _SERVERS.values()
    for name in (series.running, series.prompt_tokens, series.generation_tokens, series.requests)
    if name is not None
)
_PREFIXES: Final = tuple(sorted(_WANTED))


@dataclass(frozen=True, slots=True)
class Observation:
    """One scrape: gauges and cumulative counters per model, as the server reported them.

    ``time_s`` is on the observer's clock (monotonic by default), midway
    between sending the scrape and reading its end. Models come from the
    ``model_name`` label, or the default model where the server has no labels
    (TGI, llama.cpp). ``requests`` is empty for llama.cpp, which counts none.
    """

    time_s: float
    kind: ServerKind
    running: Mapping[str, float] = field(default_factory=dict)
    prompt_tokens: Mapping[str, float] = field(default_factory=dict)
    generation_tokens: Mapping[str, float] = field(default_factory=dict)
    requests: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ObservationDelta:
    """Counter increments per model between two observations of the same server.

    ``reset`` is true when any counter went down (the server restarted); the
    increment for such a counter is its new value, what it counted since the
    restart.
    """

    start_s: float
    end_s: float
    prompt_tokens: Mapping[str, float]
    generation_tokens: Mapping[str, float]
    requests: Mapping[str, float]
    reset: bool

    @property
    def duration_s(self) -> float:
        """Seconds between the two scrapes."""
        return self.end_s - self.start_s


def detect_server(families: Iterable[Metric]) -> ServerKind:
    """Which model server exposed these families, by the names of its key series."""
    names = {_base(sample.name) for family in families for sample in family.samples}
    for kind, series in _SERVERS.items():
        if names & {series.running, series.prompt_tokens, series.generation_tokens}:
            return kind
    return "unknown"


def observation_from_families(
    families: Sequence[Metric],
    *,
    time_s: float,
    default_model: str,
    kind: ServerKind | None = None,
) -> Observation:
    """Read one observation from parsed families (``kind`` detected when not given).

    Series of one model are summed over their other labels (vLLM's
    ``engine``, ``finished_reason``; SGLang's ranks), since each counts a
    distinct share of that model's work. Non-finite values are skipped.
    """
    if kind is None:
        kind = detect_server(families)
    series = _SERVERS.get(kind)
    if series is None:
        return Observation(time_s, "unknown")
    sums: dict[str, dict[str, float]] = {}
    for family in families:
        for sample in family.samples:
            name = _base(sample.name)
            if name not in _WANTED or not math.isfinite(sample.value):
                continue
            model = sample.labels.get(MODEL_LABEL) or default_model
            per_model = sums.setdefault(name, {})
            per_model[model] = per_model.get(model, 0.0) + float(sample.value)
    return Observation(
        time_s,
        kind,
        running=sums.get(series.running, {}),
        prompt_tokens=sums.get(series.prompt_tokens, {}),
        generation_tokens=sums.get(series.generation_tokens, {}),
        requests=sums.get(series.requests, {}) if series.requests else {},
    )


def parse_exposition(
    text: str, *, time_s: float, default_model: str, openmetrics: bool = False
) -> Observation:
    """Parse a ``/metrics`` page into an observation; raises ``ValueError`` if malformed.

    A text-format page is first cut down to the sample lines of the series
    read here: a vLLM page with its histograms is tens of kilobytes, parsing
    all of it each second would cost the event loop milliseconds, and a
    malformed line in some unrelated series should not lose the scrape.
    Dropping the ``# TYPE`` lines is harmless: names are matched without
    ``_total`` either way. OpenMetrics pages (rare: the observer asks for the
    text format) are parsed whole, since their parser needs every line.
    """
    parser: Callable[[str], Iterable[Metric]]
    if openmetrics:
        parser = openmetrics_families  # untyped upstream
    else:
        parser = text_string_to_metric_families
        text = "\n".join(line for line in text.splitlines() if line.startswith(_PREFIXES))
    try:
        families = list(parser(text))
    except ValueError:
        raise
    except Exception as e:  # the parsers raise assorted errors on odd input
        raise ValueError(f"unparseable exposition: {type(e).__name__}") from e
    return observation_from_families(families, time_s=time_s, default_model=default_model)


def compute_delta(previous: Observation, current: Observation) -> ObservationDelta:
    """Counter increments from ``previous`` to ``current``.

    A model absent before counts from zero (servers create labelled series
    lazily, TGI's histograms on the first request). A counter that went down
    means a restart: its increment is its new value.
    """
    prompt, reset_p = _increments(previous.prompt_tokens, current.prompt_tokens)
    generation, reset_g = _increments(previous.generation_tokens, current.generation_tokens)
    requests, reset_r = _increments(previous.requests, current.requests)
    return ObservationDelta(
        start_s=previous.time_s,
        end_s=current.time_s,
        prompt_tokens=prompt,
        generation_tokens=generation,
        requests=requests,
        reset=reset_p or reset_g or reset_r,
    )


OnObservation = Callable[[Observation, ObservationDelta | None], None]


class Observer:
    """Scrapes a model server's ``/metrics`` at a fixed interval and reports each scrape.

    Failures (unreachable, timeout, bad status, unparseable page) are counted
    in :attr:`errors` and logged as ``observer.scrape_failed`` (a warning when
    scraping starts failing, debug while it keeps failing), and never stop the
    loop: the server restarting must not take the sidecar down. The scrape
    timeout stays below the interval so scrapes never pile up.

    ``on_observation`` gets every successful scrape with the delta from the
    previous one of the same server kind (``None`` for the first). Pass a
    ``session`` to share a connection pool; otherwise the observer opens its
    own and closes it when :meth:`run` ends or on :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        *,
        default_model: str,
        session: aiohttp.ClientSession | None = None,
        interval_s: float = 1.0,
        timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_observation: OnObservation | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self.url = url
        self.default_model = default_model
        self.interval_s = interval_s
        self.timeout_s = min(timeout_s, interval_s) if timeout_s else 0.8 * interval_s
        self.errors = 0
        self.errors_by_reason: dict[ScrapeErrorReason, int] = {}
        """Failed scrapes by reason (``llm_energy_observer_scrape_errors_total``)."""
        self.callback_errors = 0
        self.scrapes = 0
        self.last: Observation | None = None
        self.kind: ServerKind = "unknown"
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._on_observation = on_observation
        self._failing = False
        self._warned_unknown = False

    async def run(self) -> None:
        """Scrape forever at ``interval_s`` (skipping ticks a slow scrape overran)."""
        loop = asyncio.get_running_loop()
        next_s = loop.time()
        try:
            while True:
                await self.scrape_once()
                next_s += self.interval_s
                now = loop.time()
                if next_s < now:
                    next_s += math.ceil((now - next_s) / self.interval_s) * self.interval_s
                await asyncio.sleep(next_s - now)
        finally:
            await self.close()

    async def scrape_once(self) -> Observation | None:
        """One scrape, reported and remembered; ``None`` when it failed (and was counted)."""
        started_s = self._clock()
        try:
            text, openmetrics = await self._fetch()
            ended_s = self._clock()
            observation = parse_exposition(
                text,
                time_s=(started_s + ended_s) / 2,
                default_model=self.default_model,
                openmetrics=openmetrics,
            )
        except Exception as e:  # anything a scrape can raise is a failed scrape, never fatal
            self._failed(e)
            return None
        if self._failing:
            self._failing = False
            _log.info("observer.scrape_recovered", url=self.url, errors=self.errors)
        self.scrapes += 1
        self._note_kind(observation.kind)
        previous = self.last
        delta = None
        if previous is not None and previous.kind == observation.kind != "unknown":
            delta = compute_delta(previous, observation)
        self.last = observation
        if self._on_observation is not None:
            try:
                self._on_observation(observation, delta)
            except Exception:
                self.callback_errors += 1
                _log.exception("observer.callback_failed", url=self.url)
        return observation

    async def close(self) -> None:
        """Close the session the observer opened itself (a given one is the caller's)."""
        session, self._own_session = self._own_session, None
        if session is not None:
            await session.close()

    async def _fetch(self) -> tuple[str, bool]:
        session = self._session or self._own_session
        if session is None:
            session = self._own_session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with session.get(self.url, timeout=timeout, headers={"Accept": _ACCEPT}) as resp:
            if resp.status != 200:
                raise _ScrapeError(f"HTTP status {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _ScrapeError("metrics page too large", "too_large")
            text = body.decode(resp.charset or "utf-8", errors="replace")
            return text, resp.content_type == "application/openmetrics-text"

    def _failed(self, error: Exception) -> None:
        self.errors += 1
        reason = scrape_error_reason(error)
        self.errors_by_reason[reason] = self.errors_by_reason.get(reason, 0) + 1
        log = _log.debug if self._failing else _log.warning
        self._failing = True
        log(
            "observer.scrape_failed",
            url=self.url,
            error=type(error).__name__,
            detail=str(error)[:200],
            errors=self.errors,
        )

    def _note_kind(self, kind: ServerKind) -> None:
        if kind == "unknown":
            if not self._warned_unknown:
                self._warned_unknown = True
                _log.warning("observer.server_unrecognised", url=self.url)
            return
        if kind != self.kind:
            _log.info("observer.server_detected", url=self.url, kind=kind)
            self.kind = kind


class _ScrapeError(Exception):
    """A scrape answered, but not with a usable metrics page."""

    def __init__(self, message: str, reason: ScrapeErrorReason = "http_status") -> None:
        super().__init__(message)
        self.reason: ScrapeErrorReason = reason


ScrapeErrorReason = Literal["timeout", "connect", "http_status", "too_large", "parse", "unknown"]
SCRAPE_ERROR_REASONS: Final[tuple[ScrapeErrorReason, ...]] = (
    "timeout", "connect", "http_status", "too_large", "parse", "unknown",
)  # fmt: skip


def scrape_error_reason(error: BaseException) -> ScrapeErrorReason:
    """A failed scrape's reason, from a bounded set (a metric label)."""
    if isinstance(error, _ScrapeError):
        return error.reason
    if isinstance(error, TimeoutError):  # aiohttp's timeouts are TimeoutError too
        return "timeout"
    if isinstance(error, aiohttp.ClientError | OSError):
        return "connect"
    if isinstance(error, ValueError | UnicodeError):
        return "parse"
    return "unknown"


def _base(name: str) -> str:
    return name[: -len(_TOTAL)] if name.endswith(_TOTAL) else name


def _increments(
    before: Mapping[str, float], after: Mapping[str, float]
) -> tuple[dict[str, float], bool]:
    out: dict[str, float] = {}
    reset = False
    for model, value in after.items():
        previous = before.get(model, 0.0)
        if value < previous:
            reset = True
            out[model] = value
        else:
            out[model] = value - previous
    return out, reset
