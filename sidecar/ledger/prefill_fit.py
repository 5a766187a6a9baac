"""The energy of a prompt token relative to an output token, fitted from the GPU."""

from __future__ import annotations

from typing import Final


class PrefillFit:
    """How much a prompt token costs relative to an output token, learned from the GPU.

    Prefill runs as a few large, compute-bound steps; decode as many small,
    memory-bound ones, so per token they cost very different energy (prefill
    typically a few percent of decode). Weighing them 1:1 would hand requests
    in prefill most of a shared interval's dynamic energy. The ledger already
    knows, per stretch of time, how many prompt tokens (P) and output tokens (D)
    were worked and how much dynamic energy (E) the GPUs drew, so it fits
    E = a*P + b*D by least squares over ~1 s bins (forgetting old bins slowly)
    and weighs a prompt token as a/b output tokens. Until the data can tell
    (enough bins with prefill and decode both present, a well-conditioned fit),
    the ratio is ``prior``: 1, the plain reading of token counts.
    """

    BIN_S: Final = 1.0
    MIN_BINS: Final = 20
    FORGET: Final = 0.998  # per bin: a half-life of about six minutes of work
    BOUNDS: Final = (0.002, 2.0)

    def __init__(self, prior: float = 1.0) -> None:
        self.prior = prior
        self._bin = [0.0, 0.0, 0.0, 0.0]  # P, D, E, seconds
        self._s = [0.0] * 5  # Spp, Spd, Sdd, Spe, Sde
        self.bins = 0
        self.ratio = prior

    def observe(self, prefill: float, decode: float, energy_j: float, seconds: float) -> None:
        b = self._bin
        b[0] += prefill
        b[1] += decode
        b[2] += energy_j
        b[3] += seconds
        if b[3] >= self.BIN_S:
            self._fold()

    def observe_each(
        self, prefill: float, decode: float, energies_j: list[float], seconds: float
    ) -> None:
        """:meth:`observe` once for each positive energy (one piece on several GPUs),
        inlined: a call per GPU per piece cost about a fifth of the 8-GPU ledger bench."""
        for energy_j in energies_j:
            if energy_j > 0.0:
                b = self._bin
                b[0] += prefill
                b[1] += decode
                b[2] += energy_j
                b[3] += seconds
                if b[3] >= self.BIN_S:
                    self._fold()

    def _fold(self) -> None:
        p, d, e, _ = self._bin
        self._bin = [0.0, 0.0, 0.0, 0.0]
        s = self._s
        for i in range(5):
            s[i] *= self.FORGET
        s[0] += p * p
        s[1] += p * d
        s[2] += d * d
        s[3] += p * e
        s[4] += d * e
        if p > 0 and d > 0:
            self.bins += 1
        self.ratio = self._solve()

    def _solve(self) -> float:
        spp, spd, sdd, spe, sde = self._s
        det = spp * sdd - spd * spd
        if self.bins < self.MIN_BINS or det <= 1e-6 * spp * sdd:
            return self.prior
        a = (spe * sdd - sde * spd) / det
        b = (sde * spp - spe * spd) / det
        if a <= 0 or b <= 0:
            return self.prior
        lo, hi = self.BOUNDS
        return min(hi, max(lo, a / b))


CONTEXT_UNIT: Final = 1000.0
"""Context is counted in thousands of tokens, so the fit's features have like scales."""


class StepModel:
    """Dynamic energy of a stretch of serving as the sum of what the engine did in it.

    Under continuous batching one forward step carries a decode token for
    every running request plus chunks of prompts, so a token's cost depends on
    its company: each step reads the weights once (memory-bound) whatever it
    carries, decode also reads each sequence's KV cache, and prefill is
    compute-bound, about linear in prompt tokens (vLLM's chunked prefill;
    Sarathi-Serve, OSDI 2024; Splitwise, ISCA 2024). One constant prompt/output
    ratio cannot follow that: energy per output token falls several-fold from
    batch 1 to batch 32 (ML.ENERGY leaderboard; DynamoLLM, HPCA 2025) while a
    prompt token's stays put. So the ledger fits, by least squares over ~1 s
    bins (forgetting old bins slowly), with every coefficient kept >= 0::

        E = a*P + b*D + c*K + f*S

    P prompt tokens, D output tokens, K output tokens times their context (in
    thousands), and S steps: in a piece where n requests decode, every one
    emits about one token a step, so S = D/n. A piece's energy is then shared
    by each request's part of that sum: ``w = a*p + (b + s + c*ctx)*d``. Who pays
    the step cost of a step that carries prompt chunks cannot be told from
    energy totals, so it depends on what the server is known to be:

    * ``batched`` (the server's own spans: vLLM, a continuous batcher; or streams
      seen to get their tokens in lockstep, :meth:`Books._probe`): every
      token in a step uses the one weight read, so the step cost is split over
      every token in the piece, prompt and output alike: ``s = f*S/(P+D)``, and
      a prompt token weighs ``a + s``. Charged to decode only, output riding on
      prompt chunks was overcharged: on the serving bench's code trace (long
      prompts, a few decoding requests beside them) 14-token requests took two
      to five times their energy (traces p90 34.0 -> 31.2 %, proxy p90
      63.8 -> 46.9 % with the split; chat proxy p90 13.8 -> 11.6 %).
    * otherwise (streams not in lockstep, a recording with no token times):
      ``s = f*S/D = f/n``, decode only. A server that gives each request its
      own draw (the plain per-request simulator) has no shared step cost, and
      the S term it fits belongs to the requests decoding: the split by tokens
      there took median error in ``attribute``'s test from 6 % to 16 %.

    Until the data can tell (:attr:`coef` is ``None``), or where the step model
    explains the energy no better than prompt and output tokens alone, the
    weights are ``a*p + b*d`` from those two.
    """

    BIN_S: Final = 1.0
    MIN_BINS: Final = 30
    FORGET: Final = 0.998
    FEATURES: Final = 4
    GAIN: Final = 0.1

    def __init__(self) -> None:
        n = self.FEATURES
        self._bin = [0.0] * (n + 2)  # features, energy, seconds
        self._xx = [[0.0] * n for _ in range(n)]
        self._xy = [0.0] * n
        self._yy = 0.0
        self.bins = 0
        self.gain = 0.0
        """How much of the two-term fit's residual the step model removes (0..1)."""
        self.coef: tuple[float, ...] | None = None

    @staticmethod
    def features(works: list[tuple[float, float]], contexts: list[float]) -> list[float]:
        """(P, D, K, S) of one piece from each request's (prefill, decode) work and context."""
        p = sum(w[0] for w in works)
        d = sum(w[1] for w in works)
        k = sum(w[1] * c for w, c in zip(works, contexts, strict=True)) / CONTEXT_UNIT
        decoding = sum(1 for w in works if w[1] > 0.0)
        return [p, d, k, d / decoding if decoding else 0.0]

    def observe(self, x: list[float], energy_j: float, seconds: float) -> None:
        b = self._bin
        for i, v in enumerate(x):
            b[i] += v
        b[-2] += energy_j
        b[-1] += seconds
        if b[-1] >= self.BIN_S:
            self._fold()

    def observe_each(self, x: list[float], energies_j: list[float], seconds: float) -> None:
        """:meth:`observe` once for each positive energy (one piece on several GPUs),
        inlined: a call per GPU per piece cost about a fifth of the 8-GPU ledger bench."""
        x0, x1, x2, x3 = x
        for energy_j in energies_j:
            if energy_j > 0.0:
                b = self._bin
                b[0] += x0
                b[1] += x1
                b[2] += x2
                b[3] += x3
                b[4] += energy_j
                b[5] += seconds
                if b[5] >= self.BIN_S:
                    self._fold()

    def step_share(self, x: list[float], *, batched: bool) -> float:
        """The per-step cost each token of a piece with features ``x`` carries: output
        tokens only, or every token where the server batches continuously (``batched``).
        Needs the fit (:attr:`coef`)."""
        assert self.coef is not None
        f = self.coef[3]
        if x[1] <= 0:
            return 0.0
        if batched:
            return f * x[3] / (x[0] + x[1])
        return f * x[3] / x[1]

    def weights(
        self,
        x: list[float],
        works: list[tuple[float, float]],
        contexts: list[float],
        *,
        batched: bool = False,
    ) -> list[float] | None:
        """Each request's share of a piece with features ``x``; ``None`` before the fit.
        ``batched``: the server is known to batch continuously, so prompt tokens share
        the step cost (see the class docstring)."""
        if self.coef is None:
            return None
        a, b, c, _ = self.coef
        s = self.step_share(x, batched=batched)
        sp = s if batched else 0.0
        return [
            (a + sp) * p + (b + s + c * ctx / CONTEXT_UNIT) * d
            for (p, d), ctx in zip(works, contexts, strict=True)
        ]

    def _fold(self) -> None:
        n = self.FEATURES
        x, y = self._bin[:n], self._bin[n]
        self._bin = [0.0] * (n + 2)
        self._yy = self._yy * self.FORGET + y * y
        for i in range(n):
            self._xy[i] = self._xy[i] * self.FORGET + x[i] * y
            row = self._xx[i]
            for j in range(n):
                row[j] = row[j] * self.FORGET + x[i] * x[j]
        if x[0] > 0 and x[1] > 0:
            self.bins += 1
        if self.bins >= self.MIN_BINS:
            self.coef = self._solve()

    def _solve(self) -> tuple[float, ...] | None:
        """The step model where it explains the energy clearly better (``GAIN``) than
        prompt and output tokens alone, else those two; ``None`` if neither fits."""
        full = self._nnls(list(range(self.FEATURES)))
        tokens = self._nnls([0, 1])
        if full is None or tokens is None:
            return full or tokens
        self.gain = 1.0 - self._rss(full) / self._rss(tokens) if self._rss(tokens) > 0 else 0.0
        return full if self.gain >= self.GAIN else tokens

    def _rss(self, coef: tuple[float, ...]) -> float:
        n = self.FEATURES
        fit = sum(coef[i] * self._xy[i] for i in range(n))
        quad = sum(coef[i] * coef[j] * self._xx[i][j] for i in range(n) for j in range(n))
        return max(0.0, self._yy - 2.0 * fit + quad)

    def _nnls(self, features: list[int]) -> tuple[float, ...] | None:
        """Non-negative least squares over ``features`` on the normal equations (drop the
        most negative coefficient until none is); prompt and output tokens must both
        cost something."""
        active = [i for i in features if self._xx[i][i] > 0.0]
        while active:
            sol = _solve(
                [[self._xx[i][j] for j in active] for i in active], [self._xy[i] for i in active]
            )
            if sol is None:
                return None
            worst = min(range(len(active)), key=lambda k: sol[k])
            if sol[worst] >= 0.0:
                coef = [0.0] * self.FEATURES
                for k, i in enumerate(active):
                    coef[i] = sol[k]
                if coef[0] <= 0.0 or coef[1] + coef[3] <= 0.0:
                    return None
                return tuple(coef)
            del active[worst]
        return None


def _solve(a: list[list[float]], y: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; ``None`` when (nearly) singular."""
    n = len(y)
    m = [[*row, v] for row, v in zip(a, y, strict=True)]
    scale = max((abs(m[i][i]) for i in range(n)), default=0.0)
    if scale <= 0.0:
        return None
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) <= 1e-12 * scale:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            k = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= k * m[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][c] * out[c] for c in range(r + 1, n))) / m[r][r]
    return out


class PrefillRate:
    """How fast this server prefills a prompt when nothing holds it up, in tokens a second.

    Time to first token is queueing plus prefill, and prefill comes last: a
    request waits (for a batch slot, behind earlier prompts in chunked prefill)
    and then its prompt runs in the steps just before its first token. Spread
    over the whole wait, a queued prompt would take energy while other requests
    do the work. Requests that did not wait show the server's own rate, so the
    rate is a high percentile (``QUANTILE``) of prompt tokens over time to first
    token among recent requests, and a prompt is placed in the last
    ``tokens / rate`` seconds before its first token.
    """

    KEEP: Final = 256
    MIN_OBS: Final = 16
    MIN_TOKENS: Final = 32.0
    """Shorter prompts' time to first token is mostly fixed overhead, not prefill."""
    QUANTILE: Final = 0.9

    def __init__(self) -> None:
        self._rates: list[float] = []
        self._next = 0
        self.tokens_per_s: float | None = None

    def counts(self, tokens: float, ttft_s: float) -> bool:
        """Whether :meth:`observe` keeps a prompt of ``tokens`` with this time to first token."""
        return tokens >= self.MIN_TOKENS and ttft_s > 0.0

    def would_know(self, more: int) -> bool:
        """Whether the rate has a figure, or ``more`` prompts kept would give it its first."""
        return self.tokens_per_s is not None or len(self._rates) + more >= self.MIN_OBS

    def observe(self, tokens: float, ttft_s: float) -> None:
        if not self.counts(tokens, ttft_s):
            return
        rate = tokens / ttft_s
        if len(self._rates) < self.KEEP:
            self._rates.append(rate)
        else:
            self._rates[self._next] = rate
            self._next = (self._next + 1) % self.KEEP
        if len(self._rates) >= self.MIN_OBS:
            ranked = sorted(self._rates)
            self.tokens_per_s = ranked[min(len(ranked) - 1, int(self.QUANTILE * len(ranked)))]
