"""The observer as a source: the model server's own counters, scrape by scrape.

Alone, the observer sees no request, only per-model running counts and token
totals: while a model is active it holds one activity span in the ledger
(weighted by the tokens it processed), so energy splits between models by
token throughput; its in-flight figure is the server's running count. With
traces on, spans are the requests and the observer reports only the running
count (live in-flight, and how many requests each held interval waits for),
so nothing counts twice. ``defer`` is the composition rule for a source that
sees every request itself (the proxy): while it says so, the observer only
watches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Final

from sidecar.sources.base import Accounts, SourceName
from sidecar.tracking.observer import Observation, ObservationDelta

STALE_S: Final = 30.0
"""An activity span the observer has not renewed for this long ends where it was last seen."""


class ObserverSource:
    """Activity from the server's ``/metrics``."""

    name: SourceName = "observer"

    def __init__(
        self,
        accounts: Accounts,
        *,
        counts_only: bool = False,
        defer: Callable[[], bool] | None = None,
    ) -> None:
        self._acc = accounts
        self._counts_only = counts_only
        self._defer = defer
        self._ids = itertools.count(1)
        self._spans: dict[str, tuple[str, float]] = {}  # label -> (open span id, renewed at)
        self._running: dict[str, int] = {}  # the server's running count by label
        self._last_count: tuple[float, int] | None = None  # (scrape time, running total)

    def on_observation(self, obs: Observation, delta: ObservationDelta | None) -> None:
        """One scrape and its increments since the previous one."""
        if delta is None:
            return
        if self._counts_only:
            moved = {
                m: delta.prompt_tokens.get(m, 0.0) + delta.generation_tokens.get(m, 0.0)
                for m in set(delta.prompt_tokens) | set(delta.generation_tokens)
            }
            self.counts(delta.start_s, delta.end_s, obs.running, delta.requests, moved)
            return
        models = set(obs.running) | set(delta.generation_tokens) | set(delta.prompt_tokens)
        for model in sorted(models):
            self.observed(
                model,
                since_s=delta.start_s,
                until_s=delta.end_s,
                running=obs.running.get(model, 0.0),
                prompt_tokens=delta.prompt_tokens.get(model, 0.0),
                completion_tokens=delta.generation_tokens.get(model, 0.0),
                finished=delta.requests.get(model, 0.0),
            )

    def counts(
        self,
        since_s: float,
        until_s: float,
        running: Mapping[str, float],
        finished: Mapping[str, float] | None = None,
        tokens: Mapping[str, float] | None = None,
    ) -> None:
        """Traces mode: only what the server ran over [since_s, until_s], all models
        together: those running at its end plus those that finished in it (a gauge
        read at two scrapes misses a request that began and ended between them; one
        at least where tokens moved and the server counts no finished requests)."""
        acc = self._acc
        acc.ledger.upstream_ready(since_s)
        labels: dict[str, int] = {}
        for model, n in running.items():
            label = acc.models(model)
            labels[label] = labels.get(label, 0) + max(0, round(n))
        self._running = {k: v for k, v in labels.items() if v > 0}
        now_running = sum(labels.values())
        ended = sum(max(0, round(n)) for n in (finished or {}).values())
        ran = now_running + ended
        if ran == 0 and any(n > 0 for n in (tokens or {}).values()):
            ran = 1
        # running at the window's start and not among those that ended in it: ran all of it
        last = self._last_count
        through = 0
        if last is not None and abs(last[0] - since_s) < 1e-6 and now_running > 0:
            through = max(0, last[1] - ended)
        self._last_count = (until_s, now_running)
        acc.ledger.running(since_s, until_s, ran, through)
        acc.collect()

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
        """The server's own counters for one model over [since_s, until_s].

        While the model is active (requests running, or tokens produced since the
        last scrape: short requests can start and end between two scrapes), it
        holds one activity span in the ledger, weighted by the tokens it
        processed. The ledger holds intervals back by more than a scrape interval
        in this mode, so a span can open at the previous scrape.
        """
        acc = self._acc
        ledger = acc.ledger
        ledger.upstream_ready(since_s)  # the server answers: its model is loaded
        if self._defer is not None and self._defer():
            self._end_spans(acc.clock())  # the other source sees every request itself
            return
        label = acc.models(model)
        self._running[label] = max(0, round(running))
        work = round(prompt_tokens + completion_tokens)
        active = running > 0 or work > 0
        span = self._spans.get(label)
        rid = span[0] if span is not None else None
        if active and rid is None:
            # a fresh id per span: the last one may still sit in the ledger's hold
            rid = f"activity:{label}:{next(self._ids)}"
            ledger.start(rid, since_s, model=label, endpoint="generate", activity=True)
            ledger.first_token(rid, since_s)
        if rid is not None:
            if work > 0:
                ledger.tokens(rid, until_s, work)
            if active:
                ledger.touch(rid, until_s)
                self._spans[label] = (rid, until_s)
            else:  # idle since the last scrape: the span ended there
                ledger.finish(rid, since_s, status="ok")
                del self._spans[label]
        acc.count_tokens(
            label, round(max(0.0, prompt_tokens)), round(max(0.0, completion_tokens)),
            round(max(0.0, finished)),
        )  # fmt: skip
        acc.collect()

    # ------------------------------------------------------------------ source
    def in_flight(self) -> dict[str, int]:
        """The server's running count by model (observer and traces modes alike)."""
        return {k: v for k, v in self._running.items() if v > 0}

    def tick(self, now_s: float) -> None:
        if self._spans:
            self._end_spans(now_s, stale_only=True)

    def flush(self) -> None:
        return None

    def _end_spans(self, now: float, *, stale_only: bool = False) -> None:
        """An activity span never outlives the observer's view of it: spans end where
        the observer last renewed them once another source takes over or the observer
        falls silent, and the running count they stood for goes with them."""
        for label, (rid, seen_s) in list(self._spans.items()):
            if stale_only and now - seen_s < STALE_S:
                continue
            self._acc.ledger.finish(rid, seen_s, status="ok")
            del self._spans[label]
            self._running.pop(label, None)
        if not stale_only:
            self._running.clear()
