"""The ledger's step model of dynamic energy and the prefill rate it places prompts with."""

from __future__ import annotations

import random

import pytest

from sidecar.ledger.prefill_fit import PrefillFit, PrefillRate, StepModel


def _bins(coef: tuple[float, float, float, float], n: int, seed: int = 1) -> StepModel:
    rnd = random.Random(seed)
    m = StepModel()
    for _ in range(n):
        x = [rnd.uniform(0, 4000), rnd.uniform(20, 900), 0.0, 0.0]
        x[2] = x[1] * rnd.uniform(0.2, 3.0)  # output tokens x context, in thousands
        x[3] = x[1] / rnd.uniform(1, 40)  # steps: tokens over the requests decoding
        m.observe(x, sum(c * v for c, v in zip(coef, x, strict=True)), 1.0)
    return m


def test_fit_recovers_the_costs_behind_the_energy() -> None:
    """Energy made of prompt, output, context and step costs gives those costs back."""
    truth = (0.0225, 0.01, 0.053, 2.2)
    m = _bins(truth, 200)
    assert m.coef is not None
    for got, want in zip(m.coef, truth, strict=True):
        assert got == pytest.approx(want, rel=1e-3)
    assert m.gain > 0.5  # the step terms explain what tokens alone cannot


def test_no_cost_is_ever_negative() -> None:
    """Data that would pull a coefficient below zero leaves it at zero, the rest non-negative."""
    m = _bins((0.02, 0.05, -0.01, 0.0), 200)
    assert m.coef is not None
    assert all(c >= 0.0 for c in m.coef)


def test_no_fit_until_enough_bins_mix_prefill_and_decode() -> None:
    """Before MIN_BINS bins with both prompt and output work, the caller's fallback holds."""
    m = _bins((0.02, 0.01, 0.05, 2.0), StepModel.MIN_BINS - 1)
    assert m.coef is None
    assert m.weights([1.0, 1.0, 0.0, 1.0], [(1.0, 1.0)], [0.0]) is None
    decode_only = StepModel()
    for _ in range(100):
        decode_only.observe([0.0, 30.0, 30.0, 1.0], 36.0, 1.0)
    assert decode_only.coef is None


def test_step_cost_is_shared_by_the_requests_decoding() -> None:
    """In a piece, the step cost goes evenly to the decoders; prompts pay their own tokens."""
    m = StepModel()
    m.coef = (0.02, 0.0, 0.0, 2.0)
    works = [(0.0, 3.0), (0.0, 3.0), (1000.0, 0.0)]
    x = StepModel.features(works, [500.0, 500.0, 0.0])
    assert x == [1000.0, 6.0, 3.0, 3.0]
    w = m.weights(x, works, [500.0, 500.0, 0.0])
    assert w is not None
    assert w[0] == w[1] == pytest.approx(3.0)  # 3 steps x 2 J, split over two decoders
    assert w[2] == pytest.approx(20.0)


def test_prefill_rate_is_a_high_quantile_of_unqueued_prompts() -> None:
    """Short prompts are ignored; the rate is what requests that did not wait achieved."""
    r = PrefillRate()
    for _ in range(100):
        r.observe(8.0, 0.001)  # too short to tell anything
    assert r.tokens_per_s is None
    for k in range(100):
        r.observe(1000.0, 0.05 if k % 10 == 0 else 0.5)  # most waited in a queue
    assert r.tokens_per_s == pytest.approx(20_000.0)


def test_observe_each_is_observe_per_positive_energy() -> None:
    """One call for a piece's GPUs folds and fits exactly as one call per GPU did."""
    one, each = StepModel(), StepModel()
    fit_one, fit_each = PrefillFit(), PrefillFit()
    for k in range(400):
        x = [float(k % 7), 3.0 + k % 5, 0.5 * (k % 3), 1.0 + k % 2]
        energies = [0.0 if g == k % 4 else 2.0 + g + 0.1 * (k % 9) for g in range(4)]
        for e in energies:
            if e > 0.0:
                one.observe(x, e, 0.13)
                fit_one.observe(x[0], x[1], e, 0.13)
        each.observe_each(x, energies, 0.13)
        fit_each.observe_each(x[0], x[1], energies, 0.13)
    assert each.bins == one.bins > 30
    assert each.coef == one.coef
    assert each.coef is not None
    assert each._bin == one._bin
    assert (fit_each.ratio, fit_each.bins, fit_each._bin) == (
        fit_one.ratio,
        fit_one.bins,
        fit_one._bin,
    )
