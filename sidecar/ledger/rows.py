"""One grid row at a time: :meth:`Books.assign_grid` with the work of each request
worked out for all pieces of the row in one pass, not once per piece.

The sharing rule is :meth:`Books._weights_many` and :meth:`Books._book`, unchanged;
this module only reorders the arithmetic so that its cost per (piece, request) pair
is a few operations inside builtins (``sum``, ``map``, ``zip``) instead of a
function call and a dozen list passes: 8 GPUs at 100 Hz with 256 streams in flight
is ~54k pairs per simulated second, and 10x real time on one core leaves ~1 us each.

What makes the reordering exact (results equal within rounding, which
``tests/test_ledger_recorded.py`` checks at 1e-9):

* A request's weight in a piece is linear in its work there: ``alpha*p + (beta +
  gamma*ctx)*d`` with the piece's coefficients (the step model's, or the prompt
  ratio's), so the piece's total weight is the same sum over the piece's totals
  P, D and K, and a request's share summed over the row is a dot product of its
  work columns with the pieces' coefficients. Where its work is spread evenly over
  segments of time, the dot product is an integral of the coefficients over each
  segment: two entries of a running sum (:class:`_Sparse`), whatever the pieces.
* The fits (:class:`PrefillFit`, :class:`StepModel`), the lockstep probe and the
  coefficients they yield still run piece by piece, in time order.
* Only a prompt that is still running (or ends) in the row reads and feeds the
  server's prefill rate (:class:`PrefillRate`), in piece order then request order:
  those requests go through :meth:`Books._work` in exactly that order, except where
  what it reads cannot change their work (a prompt still running; the rate unknown
  through the row), and they skip the pieces before their placement begins; the
  others (decode, or a whole non-streamed reply) never touch the rate.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from operator import mul
from typing import TYPE_CHECKING

from sidecar.ledger.prefill_fit import CONTEXT_UNIT, PrefillFit, StepModel
from sidecar.ledger.requests import INF, Request

if TYPE_CHECKING:
    from sidecar.ledger.pieces import Books, Interval
    from sidecar.ledger.prefill_queue import Segment

# one GPU's part of a piece: (gpu, interval, idle J, dynamic J, seconds of the piece)
_Part = tuple[int, int, float, float, float]


def assign_row(
    books: Books, per_gpu: list[list[Interval]], reqs: list[Request], now_s: float
) -> list[list[float]]:
    """:meth:`Books.assign_grid` for a server not known to batch (``paced`` off)."""
    from sidecar.ledger.pieces import PLACE_FACTOR, PROBE_EVERY

    energies = [[0.0] * len(ivs) for ivs in per_gpu]
    starts, ends = _grid(per_gpu, reqs)
    m = len(starts)
    if not m:
        return energies
    lo, hi = starts[0], ends[-1]
    # each request's run of pieces [i, j): start_s <= a and end_s >= b
    spans: list[tuple[Request, int, int]] = []
    count = [0] * (m + 1)
    for r in reqs:
        i = 0 if r.start_s <= lo else bisect_left(starts, r.start_s)
        j = m if r.end_s >= hi else bisect_right(ends, r.end_s)
        if i < j:
            spans.append((r, i, j))
            count[i] += 1
            count[j] -= 1
    n_in = list(itertools.accumulate(count[:m]))
    parts, gpu_dyns, gpu_covers, runs = _parts(books, per_gpu, starts, ends, n_in, energies)
    active = [any(p[3] > 0.0 for p in ps) for ps in parts]

    # --- each informed request's work in every piece of the row (0 outside its run)
    d_rows: list[list[float] | None] = []  # decode tokens, one row per informed request
    # (None: its work kept as segments, see _Sparse)
    p_rows: list[list[float] | None] = []  # prefill tokens (None: none in the row)
    ctxs: list[float] = []
    informed_count = [0] * (m + 1)
    # per span: (request, i, j, index of its rows or -1 when uninformed)
    owners: list[tuple[Request, int, int, int]] = []
    slow: list[tuple[int, Request, int, int]] = []
    # the pieces the lockstep probe looks at (every PROBE_EVERY-th piece with energy), and
    # there each stream's token arrivals (:meth:`Books._probe`), gathered on the way
    probe_at = [False] * m
    seen = books._pieces
    for k in range(m):
        if active[k]:
            seen += 1
            probe_at[k] = seen % PROBE_EVERY == 0
    probing = any(probe_at)
    arrivals: list[tuple[int, int, float]] = []  # (piece, row, time)
    sparse = _Sparse(starts, ends)
    rate_of = books.prefill_rate
    calm = _calm(books, spans, starts, ends, active)
    # prompts kept as segments that feed the prefill rate where their first token is:
    # (piece, row, request, tokens, seconds), fed in the piece loop's order (below)
    feeds: list[tuple[int, int, Request, float, float]] = []
    for r, i, j, told in _informed_runs(spans, starts):
        if not told or not (r.segments or r.streamed or r.prompt_work is not None):
            owners.append((r, i, j, -1))  # uninformed there (r.informed_at)
            continue
        informed_count[i] += 1
        informed_count[j] -= 1
        w = len(d_rows)
        owners.append((r, i, j, w))
        streamed = r.streamed  # _context(r), inlined (hot)
        prompt = r.prompt_tokens if r.prompt_tokens is not None else (r.prompt_work or 0.0)
        ctxs.append(prompt + (streamed if streamed else (r.completion_tokens or 0) / 2.0))
        first = r.first_token_s
        probe = probing and streamed != 0 and first is not None
        slow_prompt = (first is None and r.end_s == INF) or (
            first is not None and first > starts[i]
        )
        if not slow_prompt and sparse.add(
            r, w, i, j, ctxs[-1], probe_at if probe else None, arrivals
        ):  # a stream past its first token, or a reply not streamed that ended
            d_rows.append(None)
            p_rows.append(None)
            continue
        if slow_prompt:
            # Books._work spreads a prompt still running over its time so far, and one
            # that ended evenly over its window while the prefill rate is unknown (and
            # stays so through this row): both as segments
            spread_work = _prompt_segments(r, now_s, hi, calm)
            if spread_work is not None and sparse.add(
                r, w, i, j, ctxs[-1], probe_at if probe else None, arrivals, spread_work
            ):
                if (
                    first is not None
                    and not r.rate_seen
                    and spread_work
                    and spread_work[0][2] > 0.0
                    and spread_work[0][1] == first
                ):
                    fed_at = _feeding_piece(first, i, j, starts, ends, active)
                    if fed_at is not None:
                        t0, t1, p, _ = spread_work[0]
                        feeds.append((fed_at, w, r, p, t1 - t0))
                d_rows.append(None)
                p_rows.append(None)
                continue
        dw = [0.0] * m
        pw: list[float] | None = None
        if slow_prompt:
            # its prompt reads the prefill rate up to its first token: those pieces go
            # through Books._work; the pieces after it are decode only (below)
            q = j if first is None else bisect_left(starts, first, i, j)
            slow.append((w, r, i, q))
            pw = [0.0] * m
            if q == j or sparse.add(r, w, q, j, ctxs[-1], probe_at if probe else None, arrivals):
                d_rows.append(dw)
                p_rows.append(pw)
                continue
            i = q
        # Books._work for a prompt over before these pieces: the same shares, in segment order
        lo_i = starts[i]
        for t0, t1, p, d in r.segments:
            if t1 <= lo_i:
                continue
            if t0 >= hi:
                break
            if t1 <= t0:  # all at one instant: the piece that ends there or later
                k = bisect_left(ends, t0, i, j)
                if k < j and starts[k] < t0:
                    dw[k] += d
                    if p:
                        if pw is None:
                            pw = [0.0] * m
                        pw[k] += p
                    elif probe and d > 0.0 and probe_at[k]:  # tokens at a touch's instant
                        arrivals.append((k, w, t0))
                continue
            span = t1 - t0
            k = i if t0 <= lo_i else bisect_right(ends, t0, i, j)
            if p:
                if pw is None:
                    pw = [0.0] * m
                while k < j:
                    a = starts[k]
                    if a >= t1:
                        break
                    b = ends[k]
                    overlap = (t1 if t1 < b else b) - (t0 if t0 > a else a)
                    if overlap > 0.0:
                        dw[k] += d * (overlap / span)
                        pw[k] += p * (overlap / span)
                    k += 1
                continue
            while k < j:  # decode only: the hot loop
                a = starts[k]
                if a >= t1:
                    break
                b = ends[k]
                overlap = (t1 if t1 < b else b) - (t0 if t0 > a else a)
                if overlap > 0.0:
                    dw[k] += d * (overlap / span)
                k += 1
            if probe and d > 0.0:  # a token arrived at t1: in piece k - 1, if any
                k -= 1
                if k >= i and probe_at[k] and t1 <= ends[k]:
                    arrivals.append((k, w, t1))
        d_rows.append(dw)
        p_rows.append(pw)
    # a streamed prompt placed by the rate alone (not counted) does nothing in a piece that
    # ends before its placement starts: Books._work would return zeros there (a burst of
    # 100 streams: most of its pieces, 15k calls of a row)
    placed: dict[int, tuple[float, float]] = {}
    for w, r, _, _ in slow:
        first = r.first_token_s
        if first is not None and not r.counted and r.segments:
            _, t1, p, _ = r.segments[0]
            if p > 0.0 and t1 == first:  # Books._work's placement, up to the rate
                placed[w] = (first, PLACE_FACTOR * r.exact_prompt(p))
    # a prompt counted at its first token and placed by the queue likewise does nothing
    # before its placement begins (500 short streams a second queued at the server: most of
    # their windows), once the queue placed it
    queue = books.prefill_queue
    queued: dict[int, tuple[list[Segment], float] | None] = {}
    feeds.sort(key=lambda f: (f[0], f[1]))
    fed = 0
    for k in range(m):  # piece-major, as the rate is read and fed
        if not active[k]:
            continue
        a, b = starts[k], ends[k]
        for w, r, i, j in slow:
            while fed < len(feeds) and (feeds[fed][0], feeds[fed][1]) < (k, w):
                _, _, fr, tokens, seconds = feeds[fed]
                fr.rate_seen = True
                rate_of.observe(tokens, seconds)
                fed += 1
            if i <= k < j:
                at = placed.get(w)
                rate = rate_of.tokens_per_s  # fed by the requests before it
                if at is not None:
                    if rate is not None and b <= at[0] - at[1] / rate:
                        continue
                elif w in queued:
                    held = queued[w]
                    first = r.first_token_s
                    if (
                        held is not None
                        and b <= held[1]
                        and first is not None
                        and b < first
                        and queue.holds(r, held[0])
                    ):
                        continue
                p, d, s = books._work(r, a, b, now_s)
                d_rows[w][k] = d + s  # type: ignore[index]
                p_rows[w][k] = p  # type: ignore[index]
                if rate is not None and r.counted and r.queued and w not in queued:
                    queued[w] = queue.placed(r)  # Books._work shared it out by the queue
    for _, _, fr, tokens, seconds in feeds[fed:]:
        fr.rate_seen = True
        rate_of.observe(tokens, seconds)
    dense = [(dw, ctx) for dw, ctx in zip(d_rows, ctxs, strict=True) if dw is not None]
    cols = list(zip(*[dw for dw, _ in dense], strict=True)) if dense else [()] * m
    dense_ctx = [ctx for _, ctx in dense]
    prefill, decode, context, decoding = sparse.columns()
    for k, col in enumerate(cols):
        decode[k] += sum(col)
        context[k] = (context[k] + sum(map(mul, col, dense_ctx))) / CONTEXT_UNIT
        decoding[k] += len(col) - col.count(0.0)
    prompts = [pw for pw in p_rows if pw is not None]
    if prompts:
        for k, col in enumerate(zip(*prompts, strict=True)):
            prefill[k] += sum(col)
    n_inf = list(itertools.accumulate(informed_count[:m]))

    # --- the pieces in time order: fits, probe, each piece's coefficients
    c_p, c_d, c_g, c_u, c_m = [0.0] * m, [0.0] * m, [0.0] * m, [0.0] * m, [0.0] * m
    totals = [0.0] * m  # the weights' sum (0: equal shares)
    preds: list[float | None] = [None] * m  # the step model's prediction of each piece
    step, fit = books.step_model, books.prefill_fit
    for k in range(m):
        ps = parts[k]
        if not ps:
            continue
        if active[k]:
            a, b = starts[k], ends[k]
            p_k, d_k, dec = prefill[k], decode[k], decoding[k]
            x = [p_k, d_k, context[k], d_k / dec if dec else 0.0]
            observe(fit, step, p_k, d_k, x, gpu_dyns[k], gpu_covers[k], b - a)
            books._pieces += 1
            if probe_at[k]:
                _probe(books, k, a, b, arrivals, slow)
            alpha, beta, gamma, modelled = _coefficients(books, x)
            total = alpha * p_k + beta * d_k + gamma * x[2] * CONTEXT_UNIT
            inf = n_inf[k]
            mean = total / inf if inf else 1.0
            whole = total + (n_in[k] - inf) * mean
            if whole > 0.0:
                totals[k] = whole
                c_p[k], c_d[k], c_g[k] = alpha, beta, gamma
                c_m[k] = mean
                if modelled and inf:
                    preds[k] = whole
    if any(pred is not None for pred in preds):  # each interval reshaped by the predictions
        dyns_j = [0.0] * m  # added to in the order of each piece's parts, as a sum of them
        reshape = books._reshape
        for run in runs:
            if len(run) == 1:  # Books._reshape keeps an interval of one piece as it is
                q, dyn, _ = run[0]
                dyns_j[q] += dyn
                continue
            shares = [  # a part's share of its piece's prediction: work is even in a piece
                None if (pred := preds[q]) is None else pred * (secs / (ends[q] - starts[q]))
                for q, _, secs in run
            ]
            for (q, _, _), dyn in zip(run, reshape([d for _, d, _ in run], shares), strict=True):
                dyns_j[q] += dyn
    else:  # nothing to reshape by (Books._reshape would keep every interval as it is)
        dyns_j = [sum(p[3] for p in ps) for ps in parts]
    each_idle = [0.0] * m
    phase = books.phase_j
    for k in range(m):
        ps = parts[k]
        if not ps:
            continue
        idle = sum(p[2] for p in ps)
        dyn = dyns_j[k]
        phase["idle_serving"] += idle
        phase["dynamic"] += dyn
        each_idle[k] = idle / n_in[k]
        if totals[k] > 0.0:
            scale = dyn / totals[k]
            c_p[k] *= scale
            c_d[k] *= scale
            c_g[k] *= scale
            c_m[k] *= scale
        elif dyn > 0.0:
            c_u[k] = c_m[k] = dyn / n_in[k]  # no weights: equal shares

    # --- each request's shares over its run, then the books
    by_model: dict[str, list[float]] = {}
    # running sums: a request's part over its run of pieces is a difference, not a slice's sum
    idle_cum = [0.0, *itertools.accumulate(each_idle)]
    u_cum = [0.0, *itertools.accumulate(c_u)]
    m_cum = [0.0, *itertools.accumulate(c_m)]
    contexts = any(c_g)  # the step model's context term (none before the fit)
    sparse.coefficients(c_p, c_d, c_g if contexts else None)
    unattributed = 0.0
    for r, i, j, w in owners:
        idle_r = idle_cum[j] - idle_cum[i]
        if w < 0:
            dyn_r = m_cum[j] - m_cum[i]
        else:
            row, pw, ctx = d_rows[w], p_rows[w], ctxs[w]
            dyn_r = u_cum[j] - u_cum[i] + sparse.share(w, ctx)
            if row is not None:
                dyn_r += sum(map(mul, row, c_d))
                if ctx and contexts:
                    dyn_r += ctx * sum(map(mul, row, c_g))
            if pw is not None:
                dyn_r += sum(map(mul, pw, c_p))
        if r.emitted or not r.attributable:
            unattributed += idle_r + dyn_r
            continue
        r.idle_j += idle_r
        r.dynamic_j += dyn_r
        first = r.first_token_s
        if first is None and w >= 0 and d_rows[w] is None:  # a whole reply, as segments
            r.prefill_j += idle_r + dyn_r
        elif first is None or first >= ends[i]:  # pieces before its first token
            q = j if first is None else bisect_right(ends, first, i, j)
            if w >= 0 and d_rows[w] is None:  # kept as segments: its prompt's share
                before = idle_cum[q] - idle_cum[i] + u_cum[q] - u_cum[i]
                r.prefill_j += before + sparse.share(w, ctxs[w], until=ends[q - 1])
            else:
                r.prefill_j += _before(
                    i, q, w, each_idle, c_u, c_d, c_g, c_p, c_m, d_rows, p_rows, ctxs
                )
        if r.booked:
            acc = by_model.get(r.model)
            if acc is None:
                acc = by_model[r.model] = [0.0, 0.0]
            acc[0] += idle_r
            acc[1] += dyn_r
    books.unattributed_j += unattributed
    for model, (idle_j, dyn_j) in by_model.items():
        books._add_model(model, idle_j, dyn_j)
    return energies


def _informed_runs(
    spans: list[tuple[Request, int, int]], starts: list[float]
) -> Iterator[tuple[Request, int, int, bool]]:
    """Each request's run of pieces, and whether its work there may be told: a stream with
    no prompt estimate is cut at its first token, before which it tells nothing
    (:meth:`Request.informed_at`)."""
    for r, i, j in spans:
        first = r.first_token_s
        if r.prompt_work is None and first is not None and first > starts[i]:
            q = bisect_left(starts, first, i, j)
            yield r, i, q, False
            if q < j:
                yield r, q, j, True
            continue
        yield r, i, j, True


def _calm(
    books: Books,
    spans: list[tuple[Request, int, int]],
    starts: list[float],
    ends: list[float],
    active: list[bool],
) -> bool:
    """Whether the prefill rate is unknown and stays so through this row: the prompts whose
    first token falls in the row would not bring it to its first figure."""
    rate = books.prefill_rate
    if rate.tokens_per_s is not None:
        return False
    more = 0
    for r, i, j in spans:
        first = r.first_token_s
        if first is None or first <= starts[i] or r.rate_seen or not r.segments:
            continue
        t0, t1, p, _ = r.segments[0]
        if not (p > 0.0 and t1 == first) or not rate.counts(r.exact_prompt(p), t1 - t0):
            continue
        if _feeding_piece(first, i, j, starts, ends, active) is not None:
            more += 1
    return not rate.would_know(more)


def _feeding_piece(
    first: float, i: int, j: int, starts: list[float], ends: list[float], active: list[bool]
) -> int | None:
    """The piece of [i, j) that ends at a prompt's first token, where :meth:`Books._work`
    feeds the prefill rate, if it has energy (only such pieces are worked); else ``None``."""
    k = bisect_left(ends, first, i, j)
    return k if k < j and starts[k] < first and active[k] else None


def _prompt_segments(
    r: Request, now_s: float, hi: float, calm: bool
) -> list[tuple[float, float, float, float]] | None:
    """The work of a request whose prompt runs in the row (up to ``hi``) as
    :meth:`Books._work` spreads it, where that is even over time: a prompt still running
    over its time so far (up to ``now_s``), a prompt that ended over its whole window while
    the rate is unknown (``calm``); ``None`` where the rate or the queue places it."""
    if r.first_token_s is None:
        if not r.prompt_work:
            return list(r.segments)
        if now_s > r.start_s and now_s >= hi:
            return [*r.segments, (r.start_s, now_s, r.prompt_work, 0.0)]
        return None
    if not calm:
        return None
    first = r.first_token_s
    return [
        (t0, t1, r.exact_prompt(p), d) if p > 0.0 and t1 == first else (t0, t1, p, d)
        for t0, t1, p, d in r.segments
    ]


def _probe(
    books: Books,
    k: int,
    a: float,
    b: float,
    arrivals: list[tuple[int, int, float]],
    slow: list[tuple[int, Request, int, int]],
) -> None:
    """:meth:`Books._probe` of piece ``k`` from the arrivals the work pass gathered (and
    the few requests whose prompt runs in the row, read as it reads them): the same
    streams, in the same order, so the same vote."""
    from sidecar.ledger.pieces import PROBE_STREAMS

    mine = [(w, t1) for kk, w, t1 in arrivals if kk == k]
    for w, r, i, j in slow:
        if i <= k < j and r.streamed != 0 and r.first_token_s is not None:
            for _, t1, p, d in r.segments:
                if t1 > b:
                    break
                if t1 > a and d > 0.0 and p == 0.0:
                    mine.append((w, t1))
    mine.sort(key=lambda x: x[0])  # stable: each stream's arrivals in segment order
    times: list[float] = []
    most = streams = run = 0
    last = -1
    for w, t1 in mine:
        if w != last:
            if streams == PROBE_STREAMS:
                break
            streams += 1
            last, run = w, 0
        run += 1
        most = max(most, run)
        times.append(t1)
    books._vote(times, most, streams, b - a)


def _before(
    i: int,
    q: int,
    w: int,
    each_idle: list[float],
    c_u: list[float],
    c_d: list[float],
    c_g: list[float],
    c_p: list[float],
    c_m: list[float],
    d_rows: list[list[float] | None],
    p_rows: list[list[float] | None],
    ctxs: list[float],
) -> float:
    """A request's shares (idle and dynamic) in pieces [i, q) of the row."""
    out: float = sum(each_idle[i:q])
    if w < 0:
        return out + sum(c_m[i:q])
    row = d_rows[w]
    assert row is not None  # a stream kept as segments is past its first token
    dw, pw, ctx = row[i:q], p_rows[w], ctxs[w]
    out += sum(c_u[i:q]) + sum(map(mul, dw, c_d[i:q])) + ctx * sum(map(mul, dw, c_g[i:q]))
    if pw is not None:
        out += sum(map(mul, pw[i:q], c_p[i:q]))
    return out


# one work segment of a request in a row: (from, to, prompt and output tokens per second,
# its first and last piece), clipped to the request's pieces
_Seg = tuple[float, float, float, float, int, int]


class _Sparse:
    """Requests whose work in a row is spread evenly over segments of time (streams past
    their first token, the decode after a prompt's first token, replies not streamed that
    ended), kept as those segments, not as rows of every piece: a segment's work in a
    piece is its density times the overlap, and its share is its density times the
    integral of the pieces' coefficients over it, two entries of a running sum. The cost
    per request is its segments, not the pieces, which every request start and end and
    8 GPUs read in turn multiply (no two share an interval end): the dense pass went over
    1.4 million (segment, piece) pairs a simulated second at 8 GPUs, and over every piece
    of a request's life for each of 500 short requests a second. Results equal the dense
    pass within rounding."""

    __slots__ = (
        "_c_d", "_c_g", "_c_p", "_cd", "_cg", "_cov", "_cp", "_ctx", "_ctx_diff", "_dec",
        "_dec_diff", "_ends", "_n_diff", "_pre", "_pre_diff", "_segs", "_starts",
    )  # fmt: skip

    def __init__(self, starts: list[float], ends: list[float]) -> None:
        m = len(starts)
        self._starts, self._ends = starts, ends
        self._segs: dict[int, list[_Seg]] = {}
        # prompt, output and context-weighted output tokens per piece: the partly covered
        # pieces directly, the wholly covered ones as a density, by differences
        self._pre, self._pre_diff = [0.0] * m, [0.0] * (m + 1)
        self._dec, self._dec_diff = [0.0] * m, [0.0] * (m + 1)
        self._ctx, self._ctx_diff = [0.0] * m, [0.0] * (m + 1)
        self._cov = [0] * (m + 1)  # requests with output in a piece, by differences
        # segments covering a piece whole, by differences: where none does, the densities
        # are 0 exactly, not what rounding leaves of adding and taking them away (a weight
        # of 3e-18 where nobody works would take a piece's energy from everyone)
        self._n_diff = [0] * (m + 1)
        self._cp: list[float] = []
        self._cd: list[float] = []
        self._cg: list[float] | None = None
        self._c_p: list[float] = []
        self._c_d: list[float] = []
        self._c_g: list[float] | None = None

    def add(
        self,
        r: Request,
        w: int,
        i: int,
        j: int,
        ctx: float,
        probe_at: list[bool] | None,
        arrivals: list[tuple[int, int, float]],
        segments: Iterable[tuple[float, float, float, float]] | None = None,
    ) -> bool:
        """Keep ``r``'s work in pieces [i, j) as row ``w``, when every segment there is
        spread over time (none at one instant); else keep nothing (the dense pass takes
        it). With ``probe_at``, its token arrivals in the pieces the lockstep probe looks
        at go to ``arrivals``. ``segments``: its work as :meth:`Books._work` reads it, where
        that is not its own segments as they are."""
        starts, ends = self._starts, self._ends
        lo, hi = starts[i], ends[j - 1]
        work = r.segments if segments is None else segments
        for t0, t1, _, _ in work:  # first, whether it can go as segments at all
            if t1 <= lo:
                continue
            if t0 >= hi:
                break
            if not t1 > t0:
                return False
        pre, pre_diff, dec, dec_diff, cx, cx_diff, cov, n_diff = (
            self._pre, self._pre_diff, self._dec, self._dec_diff, self._ctx, self._ctx_diff,
            self._cov, self._n_diff,
        )  # fmt: skip
        segs: list[_Seg] = []
        cov_lo = cov_hi = -2  # the pieces with output so far, one run (segments in order)
        for t0, t1, p, d in work:
            if t1 <= lo:
                continue
            if t0 >= hi:
                break
            if not (p > 0.0 or d > 0.0):
                continue
            span = t1 - t0
            dens, pdens = d / span, p / span
            a0 = t0 if t0 > lo else lo
            a1 = t1 if t1 < hi else hi
            k0 = bisect_right(starts, a0, i, j) - 1
            k1 = bisect_left(ends, a1, i, j)
            segs.append((a0, a1, pdens, dens, k0, k1))
            dctx = dens * ctx
            if k0 == k1:
                if pdens:
                    pre[k0] += pdens * (a1 - a0)
                dec[k0] += dens * (a1 - a0)
                cx[k0] += dctx * (a1 - a0)
            else:
                head, tail = ends[k0] - a0, a1 - starts[k1]
                dec[k0] += dens * head
                dec[k1] += dens * tail
                cx[k0] += dctx * head
                cx[k1] += dctx * tail
                if pdens:
                    pre[k0] += pdens * head
                    pre[k1] += pdens * tail
                if k1 > k0 + 1:
                    n_diff[k0 + 1] += 1
                    n_diff[k1] -= 1
                    dec_diff[k0 + 1] += dens
                    dec_diff[k1] -= dens
                    cx_diff[k0 + 1] += dctx
                    cx_diff[k1] -= dctx
                    if pdens:
                        pre_diff[k0 + 1] += pdens
                        pre_diff[k1] -= pdens
            if not d > 0.0:
                continue
            if k0 <= cov_hi + 1:
                if k1 > cov_hi:
                    cov_hi = k1
            else:
                if cov_hi >= 0:
                    cov[cov_lo] += 1
                    cov[cov_hi + 1] -= 1
                cov_lo, cov_hi = k0, k1
            # a token arrived at t1, in piece k1 (the last that starts before it), if the
            # segment ends inside the request's pieces
            if probe_at is not None and not p and a1 == t1 and probe_at[k1]:
                arrivals.append((k1, w, t1))
        if cov_hi >= 0:
            cov[cov_lo] += 1
            cov[cov_hi + 1] -= 1
        self._segs[w] = segs
        return True

    def columns(self) -> tuple[list[float], list[float], list[float], list[int]]:
        """Per piece: the kept requests' prompt tokens, output tokens, context-weighted
        output tokens and how many have output there (fresh lists, for the dense rows to
        add to)."""
        starts, ends = self._starts, self._ends
        prefill, decode, context = self._pre[:], self._dec[:], self._ctx[:]
        m = len(decode)
        pdens = dens = cdens = 0.0
        covering = 0
        diffs = zip(
            self._n_diff[:m],
            self._pre_diff[:m],
            self._dec_diff[:m],
            self._ctx_diff[:m],
            strict=True,
        )
        for k, (nd, pd, dd, cd) in enumerate(diffs):
            covering += nd
            if not covering:
                pdens = dens = cdens = 0.0
                continue
            pdens += pd
            dens += dd
            cdens += cd
            if pdens or dens or cdens:
                span = ends[k] - starts[k]
                prefill[k] += pdens * span
                decode[k] += dens * span
                context[k] += cdens * span
        decoding = list(itertools.accumulate(self._cov[:m]))
        return prefill, decode, context, decoding

    def coefficients(self, c_p: list[float], c_d: list[float], c_g: list[float] | None) -> None:
        """The pieces' final weights of a prompt token, an output token (and an output
        token per token of context): their running integrals over the row, for
        :meth:`share`."""
        spans = [b - a for a, b in zip(self._starts, self._ends, strict=True)]
        self._c_p, self._c_d, self._c_g = c_p, c_d, c_g
        self._cp = [0.0, *itertools.accumulate(map(mul, c_p, spans))]
        self._cd = [0.0, *itertools.accumulate(map(mul, c_d, spans))]
        self._cg = None if c_g is None else [0.0, *itertools.accumulate(map(mul, c_g, spans))]

    def share(self, w: int, ctx: float, until: float = INF) -> float:
        """Row ``w``'s dynamic share from the work kept as its segments (0 if none), of the
        segments that end by ``until``: what the dense row's dot products give."""
        segs = self._segs.get(w)
        if segs is None:
            return 0.0
        starts, ends = self._starts, self._ends
        cp, c_p, cd, c_d, cg, c_g = self._cp, self._c_p, self._cd, self._c_d, self._cg, self._c_g
        out = 0.0
        for a0, a1, pdens, dens, k0, k1 in segs:
            if a1 > until:
                break
            if k0 == k1:
                width = a1 - a0
                out += dens * c_d[k0] * width
                if pdens:
                    out += pdens * c_p[k0] * width
                if cg is not None and ctx:
                    assert c_g is not None
                    out += dens * ctx * c_g[k0] * width
                continue
            head, tail = ends[k0] - a0, a1 - starts[k1]
            out += dens * (c_d[k0] * head + (cd[k1] - cd[k0 + 1]) + c_d[k1] * tail)
            if pdens:
                out += pdens * (c_p[k0] * head + (cp[k1] - cp[k0 + 1]) + c_p[k1] * tail)
            if cg is not None and ctx:
                assert c_g is not None
                out += dens * ctx * (c_g[k0] * head + (cg[k1] - cg[k0 + 1]) + c_g[k1] * tail)
        return out


def _grid(per_gpu: list[list[Interval]], reqs: list[Request]) -> tuple[list[float], list[float]]:
    """The row's pieces (starts, ends): the ends of one GPU's intervals (the one read most
    often in the row), every crossing of its baseline, every request start, first token
    and end inside the row, and the row's first and last instant on any GPU.

    Not every GPU's ends: the sampler reads the GPUs in turn, so no two share an interval
    end, and a grid of them all has as many pieces as GPUs times readings, each costing
    the weights and fits of its requests (8 GPUs at 100 Hz: 5x real time where one grid
    is 9x). The other GPUs' lines are integrated over each piece exactly (:func:`_parts`),
    so the energy and its phases are the same; only the weights are read over the pieces
    of one GPU's readings, which one GPU's own ledger reads them over anyway."""
    ref: list[Interval] = []
    lo, hi = INF, -INF
    for ivs in per_gpu:
        if not ivs:
            continue
        if len(ivs) > len(ref):
            ref = ivs
        if ivs[0][0] < lo:
            lo = ivs[0][0]
        if ivs[-1][2] > hi:
            hi = ivs[-1][2]
    if not ref:
        return [], []
    cuts: set[float] = {lo, hi}
    for t0, p0, t1, p1, idle_w in ref:
        cuts.add(t0)
        cuts.add(t1)
        if (p0 - idle_w) * (p1 - idle_w) < 0:
            cuts.add(t0 + (idle_w - p0) / ((p1 - p0) / (t1 - t0)))
    for r in reqs:
        for c in (r.start_s, r.first_token_s, r.end_s):
            if c is not None and lo < c < hi:
                cuts.add(c)
    points = sorted(cuts)
    starts: list[float] = []
    ends: list[float] = []
    for a, b in itertools.pairwise(points):
        if b > a:
            starts.append(a)
            ends.append(b)
    return starts, ends


def _parts(
    books: Books,
    per_gpu: list[list[Interval]],
    starts: list[float],
    ends: list[float],
    n_in: list[int],
    energies: list[list[float]],
) -> tuple[
    list[list[_Part]], list[list[float]], list[list[float]], list[list[tuple[int, float, float]]]
]:
    """Each piece's parts, one per (GPU, interval) overlapping it, in GPU then time order;
    each piece's dynamic joules per GPU that has a part there and the seconds of the
    piece those parts cover (what the fits learn from); each interval's parts as (piece,
    dynamic J, seconds), in GPU then time order (what the step model reshapes); a piece
    nobody is in is standby. An interval's line is integrated over each
    piece it overlaps, split at its baseline where it crosses it inside, so each phase
    is exact whichever GPU's readings cut the grid."""
    m = len(starts)
    out: list[list[_Part]] = [[] for _ in range(m)]
    dyns: list[list[float]] = [[] for _ in range(m)]
    covers: list[list[float]] = [[] for _ in range(m)]
    runs: list[list[tuple[int, float, float]]] = []
    last_g = [-1] * m
    standby = 0.0
    for g, ivs in enumerate(per_gpu):
        e_g = energies[g]
        for k, (t0, p0, t1, p1, idle_w) in enumerate(ivs):
            q = bisect_right(starts, t0) - 1
            slope = (p1 - p0) / (t1 - t0)
            total = 0.0
            run: list[tuple[int, float, float]] = []
            while q < m:
                a = starts[q]
                if a >= t1:
                    break
                b = ends[q]
                x0 = a if a > t0 else t0
                x1 = b if b < t1 else t1
                if x1 <= x0:
                    q += 1
                    continue
                pa = p0 + slope * (x0 - t0)
                pb = p0 + slope * (x1 - t0)
                if pa < 0.0:  # a line down to 0 W, a rounding below it near its end
                    pa = 0.0
                if pb < 0.0:
                    pb = 0.0
                energy = (pa + pb) / 2.0 * (x1 - x0)
                total += energy
                if not n_in[q]:
                    standby += energy
                    q += 1
                    continue
                if (pa - idle_w) * (pb - idle_w) < 0:  # crosses its baseline inside
                    xc = x0 + (idle_w - pa) / slope
                    above = (pa if pa > pb else pb) - idle_w
                    dyn = above / 2.0 * ((x1 - xc) if pb > pa else (xc - x0))
                    if dyn > energy:  # rounding, where the baseline is near 0 W
                        dyn = energy
                    idle_part = energy - dyn
                elif pa + pb > 2.0 * idle_w:
                    idle_part = idle_w * (x1 - x0)
                    dyn = energy - idle_part
                else:
                    idle_part, dyn = energy, 0.0
                out[q].append((g, k, idle_part, dyn, x1 - x0))
                run.append((q, dyn, x1 - x0))
                if last_g[q] == g:
                    dyns[q][-1] += dyn
                    covers[q][-1] += x1 - x0
                else:
                    dyns[q].append(dyn)
                    covers[q].append(x1 - x0)
                    last_g[q] = g
                q += 1
            e_g[k] += total
            if run:
                runs.append(run)
    books.phase_j["idle_standby"] += standby
    return out, dyns, covers, runs


def observe(
    fit: PrefillFit,
    step: StepModel,
    prefill: float,
    decode: float,
    x: list[float],
    dyns: list[float],
    covers: list[float],
    seconds: float,
) -> None:
    """The fits learn each GPU's dynamic joules in a piece against the piece's work, on the
    part of the piece the GPU's readings cover (a GPU read a little later covers the
    piece's last instants in its next row): the work over that part, as work is even
    within a piece. Counted against the whole piece, a sliver of energy against a whole
    piece's work pulled the fits down."""
    if min(covers) >= seconds * (1.0 - 1e-9):  # whole, up to rounding of the parts' sum
        fit.observe_each(prefill, decode, dyns, seconds)
        step.observe_each(x, dyns, seconds)
        return
    for dyn, cover in zip(dyns, covers, strict=True):
        f = cover / seconds
        fit.observe_each(prefill * f, decode * f, [dyn], cover)
        step.observe_each([v * f for v in x], [dyn], cover)


def _coefficients(books: Books, x: list[float]) -> tuple[float, float, float, bool]:
    """A piece's weight of a prompt token, of an output token, and of an output token
    per token of context: :meth:`StepModel.weights` (or the prompt ratio) as linear
    coefficients; whether the step model gave them."""
    coef = books.step_model.coef
    if coef is None:
        return books.prefill_fit.ratio, 1.0, 0.0, False
    a, b, c, _ = coef
    batched = books.paced or books.lockstep > 0.5
    s = books.step_model.step_share(x, batched=batched)
    return a + (s if batched else 0.0), b + s, c / CONTEXT_UNIT, True
