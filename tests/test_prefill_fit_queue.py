"""The prefill queue: where a span's prompt ran inside its window (first come, first served)."""

from __future__ import annotations

import pytest

from sidecar.ledger import Ledger
from sidecar.ledger.pieces import Books
from sidecar.ledger.prefill_queue import PrefillQueue
from sidecar.ledger.requests import Request


def span(rid: str, start: float, first: float, prompt: float, end: float = 10.0) -> Request:
    """A request as a span gives it: window, prompt as a total, output as a total."""
    r = Request(rid, "m", "unknown", start, prompt, end_s=end)
    r.first_token_s = first
    r.segments.append((start, first, prompt, 0.0))
    r.segments.append((first, end, 0.0, 10.0))
    return r


def test_a_prompt_alone_runs_from_its_scheduling_at_the_servers_capacity() -> None:
    """Alone, its tokens are worked from its scheduling at the capacity, not spread to the end."""
    q = PrefillQueue()
    q.capacity_tps = 1000.0
    r = span("a", 0.0, 2.0, 1000.0)
    q.note([r])
    assert q.share(r, 0.0, 1.0, 1000.0) == pytest.approx(1.0, rel=0.02)
    assert q.share(r, 1.0, 2.0, 1000.0) == pytest.approx(0.0, abs=0.02)


def test_a_prompt_behind_another_gets_what_that_one_leaves() -> None:
    """Scheduled while an earlier prompt still runs, it takes the leftover, then all of it."""
    q = PrefillQueue()
    q.capacity_tps = 1000.0
    ahead = span("a", 0.0, 1.0, 900.0)
    behind = span("b", 0.5, 2.0, 1000.0)
    q.note([ahead, behind])
    early = q.share(behind, 0.5, 1.0, 1000.0)
    late = q.share(behind, 1.0, 2.0, 1000.0)
    assert early is not None
    assert late is not None
    assert early + late == pytest.approx(1.0)
    assert early < 0.25  # evenly spread it would have had a third of its tokens here
    ahead_early = q.share(ahead, 0.0, 0.5, 1000.0)
    assert ahead_early == pytest.approx(0.5 / 0.9, rel=0.05)


def test_identical_windows_share_equally() -> None:
    """Prompts with the same window are served as one group and split by their tokens."""
    q = PrefillQueue()
    q.capacity_tps = 500.0
    a, b = span("a", 0.0, 1.0, 400.0), span("b", 0.0, 1.0, 400.0)
    q.note([a, b])
    assert q.share(a, 0.0, 0.5, 500.0) == pytest.approx(q.share(b, 0.0, 0.5, 500.0))


def test_registration_order_changes_nothing() -> None:
    """The same prompts registered in another order are placed the same way."""
    reqs = [span(f"r{i}", 0.1 * i, 0.1 * i + 0.35, 300.0 + 50 * i) for i in range(6)]
    got = []
    for order in (reqs, list(reversed(reqs))):
        q = PrefillQueue()
        fresh = [span(r.id, r.start_s, r.first_token_s or 0.0, r.prompt_work or 0.0) for r in order]
        q.note(fresh)
        by_id = {r.id: r for r in fresh}
        got.append(
            [
                q.share(by_id[f"r{i}"], 0.1 * k, 0.1 * k + 0.1, 2000.0)
                for i in range(6)
                for k in range(9)
            ]
        )
    assert got[0] == pytest.approx(got[1])


def test_the_capacity_follows_prompts_that_do_not_fit() -> None:
    """Prompts that cannot be done in their window at the capacity raise it."""
    q = PrefillQueue()
    reqs = [span(f"r{i}", float(i), i + 0.5, 1000.0) for i in range(20)]
    q.note(reqs)
    for r in reqs:
        q.share(r, r.start_s, r.start_s + 0.1, 1000.0)  # 1000 tokens in 0.5 s: 2000/s needed
    assert q.capacity_tps is not None
    assert q.capacity_tps > 1000.0


def test_books_place_a_queued_prompt_by_the_queue_in_traces_mode() -> None:
    """With the server known to batch (spans), a queued prompt's work follows the queue."""
    books = Books()
    books.paced = True
    books.prefill_rate.tokens_per_s = 1000.0
    ahead = span("a", 0.0, 1.0, 900.0)
    behind = span("b", 0.5, 2.0, 1000.0)
    books._weights_many([ahead, behind], 0.5, 1.0, [1.0], 3.0)
    p, _, _ = books._work(behind, 0.5, 1.0, 3.0)
    assert p < 250.0
    books.paced = False
    p_even, _, _ = books._work(span("c", 0.5, 2.0, 1000.0), 0.5, 1.0, 3.0)
    assert p_even == pytest.approx(1000.0 / 3.0)


def streamed(rid: str, start: float, first: float, prompt: float, *, counted: bool) -> Request:
    """A proxied streamed request: prompt up to the first token, then one streamed token."""
    r = Request(rid, "m", "chat", start, prompt)
    r.first_token_s = first
    r.counted = counted
    r.prompt_tokens = round(prompt) if counted else None
    r.segments.append((start, first, prompt, 0.0))
    r.segments.append((first, first + 0.1, 0.0, 1.0))
    r.streamed = 1
    return r


def test_a_prompt_counted_at_its_first_token_is_queued_and_an_estimate_is_not() -> None:
    """The exact count from the first chunk puts a streamed prompt in the queue; an estimate
    keeps the proxy's placement before the first token."""
    books = Books()
    books.prefill_rate.tokens_per_s = 1000.0
    ahead = streamed("a", 0.0, 1.0, 900.0, counted=True)
    behind = streamed("b", 0.5, 2.0, 1000.0, counted=True)
    books._work(ahead, 0.0, 0.5, 3.0)
    p_early, _, _ = books._work(behind, 0.5, 1.0, 3.0)
    assert behind.queued
    assert p_early < 250.0
    guess = streamed("c", 0.5, 2.0, 1000.0, counted=False)
    p_guess, _, _ = books._work(guess, 0.5, 1.0, 3.0)
    assert not guess.queued
    assert p_guess == pytest.approx(1000.0 / 3.0)  # 2 x tokens / rate covers its 1.5 s wait


def proxied_run(n: int, *, counted: bool) -> tuple[Ledger, dict[str, float]]:
    """``n`` proxied requests two at a time (200-token prompts, the count with the first
    token where ``counted``), a reading of each of two GPUs every 0.1 s, the second one's
    arriving 0.3 s late; the ledger and each request's energy."""
    ledger = Ledger(["0", "1"], idle_watts={"0": 50.0, "1": 50.0})
    t = 0.0
    for i in range(n):
        rid = f"r{i}"
        ledger.start(rid, t, model="m", prompt_tokens=200.0)
        if i % 2:  # its neighbour overlaps it: the queue places one behind the other
            ledger.first_token(rid, t + 0.05, prompt_tokens=200 if counted else None)
            ledger.first_token(f"r{i - 1}", t + 0.1, prompt_tokens=200 if counted else None)
            for rr in (f"r{i - 1}", rid):
                ledger.tokens(rr, t + 0.15)
                ledger.finish(rr, t + 0.2, prompt_tokens=200, completion_tokens=1)
            for dt, watts in ((0.1, 150.0), (0.2, 250.0), (0.3, 100.0)):
                ledger.sample("0", t + dt, watts)
                ledger.sample("1", t + dt - 0.3, watts + 20.0)  # a cycle behind
            t += 0.3
    ledger.flush()
    return ledger, {f.id: f.energy_j for f in ledger.pop_finished()}


def test_counted_prompts_leave_the_queue_once_done_with() -> None:
    """Prompts counted at their first token (proxy) do not pile up for KEEP_S: the queue
    holds about what is in flight, and the shares are those the unbounded queue gave."""
    ledger, got = proxied_run(600, counted=True)
    queue = ledger._books.prefill_queue
    assert ledger._books.prefill_rate.tokens_per_s is not None  # the queue was in use
    assert queue.counted == len(queue) <= 4
    unbounded = PrefillQueue.release
    try:
        PrefillQueue.release = lambda self, horizon_s: None  # type: ignore[method-assign]
        ledger_all, want = proxied_run(600, counted=True)
    finally:
        PrefillQueue.release = unbounded  # type: ignore[method-assign]
    assert len(ledger_all._books.prefill_queue) > 200
    assert got == pytest.approx(want, rel=1e-9)


def test_release_keeps_spans_and_prompts_still_ahead() -> None:
    """Spans (they report late) stay for KEEP_S; a counted prompt whose first token is after
    the horizon stays: a prompt still to come may have it ahead."""
    q = PrefillQueue()
    late = span("span", 0.0, 1.0, 100.0)
    q.note([late])
    done = streamed("done", 0.0, 1.5, 100.0, counted=True)
    q.add(done, 1.5, 100.0)
    ahead = streamed("ahead", 1.0, 3.0, 100.0, counted=True)
    q.add(ahead, 3.0, 100.0)
    q.release(2.0)
    assert len(q) == 2
    assert q.share(late, 0.0, 1.0, 1000.0) is not None
    assert q.share(ahead, 1.0, 3.0, 1000.0) is not None
    assert q.share(done, 0.0, 1.5, 1000.0) is None
    assert q.counted == 1


def test_prompts_under_the_rates_floor_never_queue() -> None:
    """Prompts counted at their first token but too short to read the prefill rate (the
    proxy bench's 11 tokens) leave no state behind: no rate, so no group is ever queued."""
    ledger = Ledger(["0"], idle_watts={"0": 50.0})
    t = 0.0
    for i in range(400):
        rid = f"r{i}"
        ledger.start(rid, t, model="m", prompt_tokens=11.0)
        ledger.first_token(rid, t + 0.02, prompt_tokens=11)
        ledger.tokens(rid, t + 0.03, 5)
        ledger.finish(rid, t + 0.04, prompt_tokens=11, completion_tokens=5)
        ledger.sample("0", t + 0.05, 150.0)
        t += 0.05
    ledger.flush()
    assert len(ledger.pop_finished()) == 400
    assert ledger._books.prefill_rate.tokens_per_s is None
    assert len(ledger._books.prefill_queue) == 0


def test_a_crowd_of_prompts_too_long_for_their_windows_stays_a_segment_each() -> None:
    """What does not fit is one spread over the window, not a piece in every cell.

    300 concurrent ~1 MiB prompts through the proxy took the old cell-by-cell
    placement half a minute of loop time (the relay's shutdown outran its 30 s wait in
    CI); kept as one spread each, the work ahead of the next prompt stays small.
    """
    q = PrefillQueue()
    q.capacity_tps = 1.0
    reqs = [span(f"r{i}", 0.01 * i, 5.0 + 0.013 * i, 1e6) for i in range(80)]
    q.note(reqs)
    shares = [q.share(r, 0.0, 100.0, 1.0) for r in reqs]
    assert shares == pytest.approx([1.0] * len(reqs))
    for r in reqs:  # evenly over its window: nothing had room ahead of it
        first = r.first_token_s
        assert first is not None
        mid = (r.start_s + first) / 2
        assert q.share(r, r.start_s, mid, 1.0) == pytest.approx(0.5, rel=0.01)
    groups = q._groups.values()
    assert max(len(g.profile or ()) for g in groups) <= 2
