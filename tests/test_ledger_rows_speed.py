"""The row-at-a-time assignment (:mod:`sidecar.ledger.rows`, the fast path) against the
plain piece-at-a-time statement of the rule (:meth:`Books._assign_pieces`).

The same seeded live traces run through two ledgers, one per path, and every figure
must agree within 1e-9 relative: finished requests' dynamic, idle and prefill joules,
phases, per-model totals, each GPU's energy, the unattributed bucket and the fits'
state. The traces mix what the fast path handles apart: streamed requests (prompt
still running, or over, in a row), replies not streamed (prefill and decode in one
segment, some of zero duration), requests that tell nothing of their work, ones still
waiting for a first token when time runs out, chunks without tokens (a gap between a
stream's segments), provisional labels, activity that is no request, and the step model
and prefill rate in force or not.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
import random
from typing import Any

import pytest

from sidecar.ledger import Ledger
from sidecar.ledger import rows as rows_module
from sidecar.ledger.pieces import Books
from sidecar.ledger.prefill_fit import PrefillFit, StepModel
from sidecar.ledger.requests import Request

GPUS = ("0", "1", "2", "3")
FITTED = (0.02, 0.01, 0.05, 2.0)
MOVE = 0.025
"""The most a request's figure may move when a slice or a row books a piece's GPUs apart.
The grid is one GPU's readings (:func:`sidecar.ledger.rows._grid`), so a GPU read 1 to
3 ms later puts its interval's last instants in a sliver piece of the slice, shared by
the work of that sliver alone, where all at once they share the next reading's piece.
On these traces, whose power jumps by up to 260 W between readings 10 ms apart, 2.0 %
at most, medians 0 (0.14 % when the grid was every GPU's readings)."""


def trace(
    seed: int,
    *,
    fitted: bool,
    fast: bool,
    sliced: bool = False,
    gpus: tuple[str, ...] = GPUS,
    touches: bool = False,
    gathered: bool = False,
    counted: bool = False,
) -> dict[str, Any]:
    """One seeded live trace through a ledger on the fast path (``fast``) or the plain one;
    ``sliced``: an interval per GPU a call, the backlog worked off before the next event;
    ``touches``: some streams send chunks without tokens; ``gathered``: samples go in
    through :meth:`Ledger.samples` in rows (:meth:`Ledger.gather`), as the live path's;
    ``counted``: most first chunks carry the exact prompt count (placed by the queue)."""
    rnd = random.Random(seed)
    ledger = Ledger(gpus, sample_period_s=0.01)
    books = ledger._books
    backlogs = 0
    if sliced:
        ledger.intervals_per_call = 1
    if gathered:
        ledger.gather(0.05)
    if not fast:
        books.assign_grid = books._assign_pieces  # type: ignore[method-assign]
    if fitted:
        books.step_model.coef = FITTED
        books.prefill_rate.tokens_per_s = 4000.0
    events: list[tuple[float, int, str, tuple[Any, ...]]] = []
    order = 0

    def push(t: float, kind: str, *args: Any) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (t, order, kind, args))

    for i in range(80):
        rid = f"r{i}"
        start = rnd.uniform(0.1, 3.0)
        shape = rnd.random()
        prompt = rnd.choice((None, rnd.randint(10, 3000)))
        push(start, "start", rid, rnd.choice(("a", "b")), prompt, rnd.random() < 0.1)
        if shape < 0.15:  # not streamed, sometimes all at one instant
            end = start + rnd.choice((0.0, rnd.uniform(0.01, 1.0)))
            push(end, "finish", rid, prompt, rnd.choice((None, rnd.randint(1, 300))))
            continue
        if shape < 0.2:
            continue  # still waiting for its first token at the end
        t = start + rnd.uniform(0.005, 0.4)
        if rnd.random() < 0.3:  # at a sample's time: a cut that ends a piece anyway
            t = math.ceil(t / 0.01) * 0.01 + 0.001 * rnd.randrange(len(GPUS))
        exact = None
        if counted and rnd.random() < 0.7:
            exact = prompt if prompt is not None else rnd.randint(10, 3000)
        push(t, "first", rid, exact)
        n = rnd.randint(0, 40)
        for _ in range(n):
            t += rnd.choice((0.0, rnd.expovariate(30.0)))
            push(t, "tokens", rid, rnd.choice((1, 1, 2, 4)))
            if touches and rnd.random() < 0.15:  # a chunk without tokens: a gap, or an instant
                t += rnd.expovariate(60.0)
                push(t, "touch", rid)
        push(t + rnd.uniform(0.0, 0.03), "finish", rid, prompt, n)
    for i in range(40):  # a batcher's streams: a token each per engine step, at sample times
        rid = f"lock{i}"
        step = rnd.randint(40, 120)
        push(step * 0.01, "start", rid, "b", 200, False)
        push((step + 2) * 0.01, "first", rid)
        n = rnd.randint(5, 60)
        for k in range(1, n + 1):
            push((step + 2 + k) * 0.01 + 0.001 * (k % len(GPUS)), "tokens", rid, 1)
        push((step + 2 + n) * 0.01 + 0.002, "finish", rid, 200, n)
    for i in range(6):  # late and sparse: a long quiet tail after the last token
        rid = f"tail{i}"
        start = 3.2 + 0.12 * i
        push(start, "start", rid, "a", 100, False)
        push(start + 0.01, "first", rid)
        push(start + 0.02, "tokens", rid, 1)
        push(start + 0.2, "finish", rid, 100, 1)
    for k in range(400):
        t = k * 0.01
        for g in GPUS:
            power = 70.0 + 260.0 * rnd.random()  # drawn for every GPU: the same trace
            if g in gpus:
                push(t + 0.001 * int(g), "sample", g, power)
        if k % 50 == 0:
            push(t, "relabel", f"r{rnd.randrange(80)}")
    while events:
        t, _, kind, args = heapq.heappop(events)
        if kind == "start":
            rid, model, prompt, other = args
            ledger.start(
                rid, t, model=model, prompt_tokens=prompt, provisional=rid.endswith("3"),
                attributable=not other,
            )  # fmt: skip
        elif kind == "first":
            ledger.first_token(args[0], t, prompt_tokens=args[1] if len(args) > 1 else None)
        elif kind == "tokens":
            ledger.tokens(args[0], t, args[1])
        elif kind == "finish":
            ledger.finish(args[0], t, prompt_tokens=args[1], completion_tokens=args[2])
        elif kind == "touch":
            ledger.touch(args[0], t)
        elif kind == "relabel":
            ledger.relabel(args[0], "c")
        elif gathered:
            ledger.samples([(args[0], t, args[1], None)])
        else:
            ledger.sample(args[0], t, args[1])
        while ledger.backlog:
            backlogs += 1
            ledger.work()
    ledger.flush()
    return {
        "requests": {
            f.id: [f.dynamic_j, f.idle_j, f.prefill_j]
            for f in sorted(ledger.pop_finished(), key=lambda f: f.id)
        },
        "phase_j": dict(ledger.phase_j),
        "model_j": {f"{m}/{p}": v for (m, p), v in sorted(ledger.model_j.items())},
        "gpu_j": {g: ledger.gpu_energy_j(g) for g in ledger.gpus},
        "unattributed_j": ledger.unattributed_j,
        "fits": [books.prefill_fit.ratio, books.lockstep, books.prefill_rate.tokens_per_s],
        "backlogs": backlogs if sliced else None,
    }


def close(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            close(g, w, f"{where}[{i}]")
    elif want is None:
        assert got is None, where
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), where


@pytest.mark.parametrize(("touches", "counted"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("fitted", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rows_match_the_piece_at_a_time_rule(
    seed: int, fitted: bool, touches: bool, counted: bool
) -> None:
    """The fast path books every figure the plain rule books, within 1e-9 relative."""
    want = trace(seed, fitted=fitted, fast=False, touches=touches, counted=counted)
    got = trace(seed, fitted=fitted, fast=True, touches=touches, counted=counted)
    assert len(want["requests"]) >= 100  # most requests finish: the trace exercises them
    assert sum(v[0] for v in want["requests"].values()) > 0.0
    close(got, want, f"seed {seed}")
    assert math.isfinite(got["unattributed_j"])


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_an_interval_a_call_books_what_all_at_once_does(seed: int) -> None:
    """The live path's slices (:attr:`Ledger.intervals_per_call`, a loop turn each) cut one
    GPU's grid at its intervals' ends only: every figure as the backlog at once, 1e-9."""
    want = trace(seed, fitted=True, fast=True, gpus=("0",))
    got = trace(seed, fitted=True, fast=True, sliced=True, gpus=("0",))
    assert got.pop("backlogs") > 20  # held intervals came free together, and were sliced
    want.pop("backlogs")
    close(got, want, f"seed {seed}")


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_an_interval_a_call_on_gpus_read_in_turn_conserves_and_stays_close(seed: int) -> None:
    """GPUs read in turn (1 ms apart) have no common interval end: a slice books a piece's
    GPUs apart (a prompt still feeds the prefill rate once: ``Request.rate_seen``; before
    it, 4.6-5.7 % moves). Each GPU's energy and the phases stay exact; requests move
    less than MOVE (1.3 and 1.7 % at most on seeds 2 and 5)."""
    want = trace(seed, fitted=True, fast=True)
    got = trace(seed, fitted=True, fast=True, sliced=True)
    assert got.pop("backlogs") > 20
    want.pop("backlogs")
    close(got["gpu_j"], want["gpu_j"], "gpu_j")
    close(got["phase_j"], want["phase_j"], "phase_j")
    assert sorted(got["requests"]) == sorted(want["requests"])
    moved = [
        abs(g - w) / max(abs(w), 1e-9)
        for rid, figures in want["requests"].items()
        for g, w in zip(got["requests"][rid], figures, strict=True)
        if abs(w) > 1e-6
    ]
    print(
        f"seed {seed}: largest move {max(moved):.2e}, median {sorted(moved)[len(moved) // 2]:.2e}"
    )
    assert max(moved) < MOVE


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_samples_gathered_in_rows_conserve_and_stay_close(seed: int) -> None:
    """Rows of samples (:meth:`Ledger.gather`, the live path's) book each GPU's energy and
    the phases exactly, on one GPU and on GPUs read in turn, and requests within MOVE
    (2.0 % at most on these seeds: a row's last reading of the GPUs read later is a
    sliver piece; a prompt still waiting is spread up to the time its pieces go). A stream with no prompt estimate weighs as the others' mean before its
    first token whenever its pieces go (:meth:`Request.informed_at`); it weighed nothing
    where they went after that token arrived, and when they went moved it 65 % (seed 1)."""
    for gpus in (("0",), GPUS):
        want = trace(seed, fitted=True, fast=True, gpus=gpus, touches=True)
        got = trace(seed, fitted=True, fast=True, gpus=gpus, touches=True, gathered=True)
        close(got["gpu_j"], want["gpu_j"], "gpu_j")
        close(got["phase_j"], want["phase_j"], "phase_j")
        assert sorted(got["requests"]) == sorted(want["requests"])
        for rid, figures in want["requests"].items():
            for g, w in zip(got["requests"][rid], figures, strict=True):
                assert abs(g - w) <= MOVE * max(abs(w), 1e-6), (rid, g, w)


def _request(rid: str, start: float, segments: list[tuple[float, float, float, float]]) -> Request:
    r = Request(rid, "a", "chat", start, 100.0)
    r.segments.extend(segments)
    r.first_token_s = segments[0][1] if segments and segments[0][2] > 0.0 else start
    r.streamed = sum(1 for s in segments if s[2] == 0.0)
    return r


def test_rows_match_on_edges_the_traces_rarely_hit() -> None:
    """A first token that ends the row's first piece (that piece is prefill), a piece whose
    requests did no work (equal shares), one that told nothing (the mean), on both paths."""
    fast = Books()
    fast.prefill_rate.tokens_per_s = 400.0
    plain = copy.deepcopy(fast)
    reqs = [
        _request(
            "first", -1.0, [(-1.0, 0.5, 100.0, 0.0), (0.5, 0.8, 0.0, 3.0), (0.8, 1.2, 0.0, 2.0)]
        ),
        _request("idle", -1.0, [(-1.0, -0.5, 0.0, 2.0)]),  # streamed, nothing in the row
        _request("quiet", -1.0, []),
        _request("done", -1.0, [(-1.0, 0.5, 0.0, 4.0)]),
    ]
    reqs[2].prompt_work = None  # tells nothing: it gets the others' mean
    reqs[3].end_s = 0.5
    rows = [[(0.0, 150.0, 1.0, 250.0, 80.0)], [(0.0, 200.0, 1.0, 120.0, 80.0)]]
    twins = copy.deepcopy(reqs)
    got = fast.assign_grid(rows, reqs, 2.0)
    want = plain._assign_pieces(rows, twins, 2.0)
    close(got, want, "energies")
    for r, t in zip(reqs, twins, strict=True):
        close([r.dynamic_j, r.idle_j, r.prefill_j], [t.dynamic_j, t.idle_j, t.prefill_j], r.id)
    assert reqs[0].prefill_j > 0.0
    quiet = [_request("q1", -1.0, [(-1.0, -0.5, 0.0, 1.0)]), _request("q2", -1.0, [])]
    quiet[1].prompt_work = None
    twins = copy.deepcopy(quiet)
    late = [[(2.0, 300.0, 3.0, 300.0, 80.0)]]
    close(fast.assign_grid(late, quiet, 4.0), plain._assign_pieces(late, twins, 4.0), "late")
    for r, t in zip(quiet, twins, strict=True):
        close([r.dynamic_j, r.idle_j, r.prefill_j], [t.dynamic_j, t.idle_j, t.prefill_j], r.id)
    assert quiet[0].dynamic_j == pytest.approx(quiet[1].dynamic_j)
    assert quiet[0].dynamic_j > 0.0
    close(
        [fast.phase_j, fast.unattributed_j, fast.prefill_fit._bin, fast.step_model._bin],
        [plain.phase_j, plain.unattributed_j, plain.prefill_fit._bin, plain.step_model._bin],
        "books",
    )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_streams_kept_as_segments_match_the_plain_rule(seed: int) -> None:
    """Streams past their first token go as their segments (:class:`rows._Sparse`), not as
    rows of every piece: on GPUs read in turn (many pieces), with gaps between a stream's
    segments (chunks without tokens), segments inside one piece, across many, and past
    both ends of the row, every figure equals the plain rule's within 1e-9."""
    rnd = random.Random(seed)
    fast = Books()
    fast.step_model.coef = FITTED  # its context term and its count of decoding streams
    plain = copy.deepcopy(fast)
    reqs: list[Request] = []
    for n in range(30):
        start = rnd.uniform(-2.0, 0.5)
        t = max(start, -0.5) + rnd.uniform(0.0, 0.1)
        segments = [(start, t, float(rnd.randint(10, 500)), 0.0)]  # its prompt, then decode
        while t < 1.3:
            t0 = t + (rnd.expovariate(20.0) if rnd.random() < 0.3 else 0.0)  # a gap, or none
            t = t0 + rnd.choice((0.0005, rnd.expovariate(25.0), 0.4))
            segments.append((t0, t, 0.0, float(rnd.choice((1, 2, 5)))))
        r = _request(f"s{n}", start, segments)
        if rnd.random() < 0.3:
            r.end_s = rnd.uniform(0.3, 0.9)
            r.segments = type(r.segments)(s for s in r.segments if s[1] <= r.end_s)
        reqs.append(r)
    per_gpu: list[list[tuple[float, float, float, float, float]]] = []
    for _ in range(4):
        times = [0.0, *sorted(rnd.uniform(0.0, 1.0) for _ in range(40)), 1.0]
        per_gpu.append(
            [
                (a, rnd.uniform(60.0, 300.0), b, rnd.uniform(60.0, 300.0), 80.0)
                for a, b in itertools.pairwise(times)
                if b > a
            ]
        )
    kept = 0
    add = rows_module._Sparse.add

    def counting(self: Any, *args: Any) -> bool:
        nonlocal kept
        ok = add(self, *args)
        kept += ok
        return ok

    twins = copy.deepcopy(reqs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rows_module._Sparse, "add", counting)
        got = fast.assign_grid(per_gpu, reqs, 2.0)
    want = plain._assign_pieces(per_gpu, twins, 2.0)
    assert kept >= 20  # most streams went as segments
    close(got, want, "energies")
    for r, twin in zip(reqs, twins, strict=True):
        figures = [twin.dynamic_j, twin.idle_j, twin.prefill_j]
        close([r.dynamic_j, r.idle_j, r.prefill_j], figures, r.id)
    close([fast.phase_j, fast.step_model._bin], [plain.phase_j, plain.step_model._bin], "books")


def _line(t0: float, p0: float, t1: float, p1: float, idle_w: float) -> tuple[float, float]:
    """(idle J, dynamic J) of a straight power line: min(p, idle) and max(p - idle, 0)
    integrated in closed form."""
    energy = (p0 + p1) / 2.0 * (t1 - t0)
    if (p0 - idle_w) * (p1 - idle_w) >= 0:
        return (
            (energy, 0.0)
            if p0 + p1 <= 2.0 * idle_w
            else (idle_w * (t1 - t0), energy - idle_w * (t1 - t0))
        )
    tc = t0 + (idle_w - p0) * (t1 - t0) / (p1 - p0)
    dyn = (max(p0, p1) - idle_w) / 2.0 * ((t1 - tc) if p1 > p0 else (tc - t0))
    return energy - dyn, dyn


def test_the_grid_is_one_gpus_readings_and_every_gpu_integrates_exactly() -> None:
    """Eight GPUs read in turn (100 us apart) make the pieces of one GPU's readings, not
    eight times as many, and each GPU's energy, idle and dynamic joules over those pieces
    are its own line's, baseline crossings inside a piece included."""
    rnd = random.Random(4)
    per_gpu = []
    for g in range(8):
        times = [g * 1e-4 + k * 0.01 for k in range(11)]
        watts = [rnd.uniform(40.0, 200.0) for _ in times]  # crosses the 80 W baseline often
        per_gpu.append(
            [
                (a, pa, b, pb, 80.0)
                for (a, pa), (b, pb) in itertools.pairwise(zip(times, watts, strict=True))
            ]
        )
    r = Request("r", "a", "chat", -1.0, 100.0)
    starts, ends = rows_module._grid(per_gpu, [r])
    own = {t for t0, _, t1, _, _ in per_gpu[0] for t in (t0, t1)}
    own |= {  # GPU 0's readings and its baseline crossings ...
        t0 + (80.0 - p0) * (t1 - t0) / (p1 - p0)
        for t0, p0, t1, p1, _ in per_gpu[0]
        if (p0 - 80.0) * (p1 - 80.0) < 0
    }
    assert [*starts, ends[-1]] == pytest.approx(sorted({*own, per_gpu[7][-1][2]}), abs=1e-12)
    assert len(starts) < 25  # ... and the row's last instant: not 8 x 10 readings
    books = Books()
    energies = [[0.0] * len(ivs) for ivs in per_gpu]
    parts, dyns, covers, _ = rows_module._parts(
        books, per_gpu, starts, ends, [1] * len(starts), energies
    )
    crossing = 0
    for g, ivs in enumerate(per_gpu):
        for k, iv in enumerate(ivs):
            idle, dyn = _line(*iv)
            crossing += (iv[1] - 80.0) * (iv[3] - 80.0) < 0
            mine = [p for ps in parts for p in ps if p[:2] == (g, k)]
            assert sum(p[2] for p in mine) == pytest.approx(idle, rel=1e-12)
            assert sum(p[3] for p in mine) == pytest.approx(dyn, rel=1e-12, abs=1e-12)
            assert sum(p[4] for p in mine) == pytest.approx(iv[2] - iv[0], rel=1e-12)
            assert energies[g][k] == pytest.approx(idle + dyn, rel=1e-12)
    assert crossing > 20
    # the fits' view: per piece, one dynamic figure per GPU there and the time it covers
    for k, (a, b) in enumerate(zip(starts, ends, strict=True)):
        assert len(dyns[k]) == len(covers[k]) == len({p[0] for p in parts[k]})
        assert all(0.0 < c <= (b - a) * (1 + 1e-12) for c in covers[k])


def test_the_fits_learn_a_partly_covered_piece_against_the_work_it_covers() -> None:
    """A GPU whose readings cover a tenth of a piece teaches the fits its energy against a
    tenth of the piece's work, not all of it (which pulled them down: 8 GPUs read 2 ms
    apart at 50 Hz moved the serving bench's chat trace from 7.8 to 13.4 % p90 before)."""
    whole, part = PrefillFit(), PrefillFit()
    step_whole, step_part = StepModel(), StepModel()
    x = [100.0, 20.0, 3.0, 2.0]
    rows_module.observe(whole, step_whole, 100.0, 20.0, x, [5.0], [0.01], 0.01)
    rows_module.observe(part, step_part, 100.0, 20.0, x, [0.5], [0.001], 0.01)
    assert part._bin == pytest.approx([v / 10.0 for v in whole._bin])
    assert step_part._bin == pytest.approx([v / 10.0 for v in step_whole._bin])


@pytest.mark.parametrize("idle_w", [0.0, 1e-300, 1.1689778425312157e-276, 80.0])
def test_a_line_down_to_zero_watts_beside_the_grid_gpu_books_nothing_negative(
    idle_w: float,
) -> None:
    """A GPU not cutting the grid whose line falls to 0 W (rounding ends it a hair below,
    under a baseline near 0 W) books no negative idle or dynamic joules (hypothesis found
    -1.1e-14 J of idle at the crossing it saw there)."""
    per_gpu = [[(0.0, 0.0, 1.0, 0.0, 1.0)], [(0.0, 521.0, 1.815756063111054, 0.0, idle_w)]]
    r = Request("r", "a", "chat", 1.5, None)
    r.end_s = 2.0
    starts, ends = rows_module._grid(per_gpu, [r])
    energies = [[0.0], [0.0]]
    parts, *_ = rows_module._parts(Books(), per_gpu, starts, ends, [1] * len(starts), energies)
    assert all(p[2] >= 0.0 and p[3] >= 0.0 for ps in parts for p in ps)
    assert energies[1][0] == pytest.approx(521.0 / 2.0 * 1.815756063111054)
