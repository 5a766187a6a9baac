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
