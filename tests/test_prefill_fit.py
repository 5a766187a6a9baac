"""Who pays a step's cost when a prompt chunk shares it: the step model's two conventions."""

from __future__ import annotations

import pytest

from sidecar.ledger.pieces import Books
from sidecar.ledger.prefill_fit import StepModel
from sidecar.ledger.requests import Request

WORKS = [(0.0, 3.0), (0.0, 3.0), (1000.0, 0.0)]
CONTEXTS = [500.0, 500.0, 0.0]


def _model() -> StepModel:
    m = StepModel()
    m.coef = (0.02, 0.0, 0.0, 2.0)
    return m


def test_a_continuous_batcher_shares_the_step_cost_over_every_token() -> None:
    """Batched: 3 steps x 2 J over 1,006 tokens, so the prompt pays most of it beside its own."""
    x = StepModel.features(WORKS, CONTEXTS)
    w = _model().weights(x, WORKS, CONTEXTS, batched=True)
    assert w is not None
    each = 6.0 / 1006.0
    assert w[0] == w[1] == pytest.approx(3.0 * each)
    assert w[2] == pytest.approx(1000.0 * (0.02 + each))
    assert sum(w) == pytest.approx(6.0 + 20.0)  # the piece's modelled energy is unchanged


def test_a_server_of_unknown_kind_charges_the_step_cost_to_decode() -> None:
    """Not batched: the same piece's step cost goes to the two decoders only."""
    x = StepModel.features(WORKS, CONTEXTS)
    w = _model().weights(x, WORKS, CONTEXTS, batched=False)
    assert w == pytest.approx([3.0, 3.0, 20.0])


def test_a_prefill_only_piece_has_no_step_cost_to_share() -> None:
    """With nothing decoding there are no counted steps: prompts weigh their tokens alone."""
    works = [(300.0, 0.0), (100.0, 0.0)]
    x = StepModel.features(works, [0.0, 0.0])
    for batched in (True, False):
        assert _model().weights(x, works, [0.0, 0.0], batched=batched) == pytest.approx([6.0, 2.0])


def test_a_span_keeps_its_whole_prefill_window_a_stream_is_narrowed() -> None:
    """Paced (server spans): a totals-only prompt spreads from its scheduling; a streamed
    prompt is placed in the last tokens/rate seconds before its first token."""
    books = Books()
    books.prefill_rate.tokens_per_s = 1000.0
    span = Request("s", "m", "chat", 0.0, 500.0, end_s=3.0, first_token_s=2.0)
    span.segments.extend([(0.0, 2.0, 500.0, 0.0), (2.0, 3.0, 0.0, 10.0)])
    books.paced = True
    assert books._work(span, 0.0, 1.0, 3.0)[0] == pytest.approx(250.0)
    books.paced = False
    assert books._work(span, 0.0, 1.0, 3.0)[0] == pytest.approx(0.0)  # placed in [1.0, 2.0]
    assert books._work(span, 1.0, 2.0, 3.0)[0] == pytest.approx(500.0)


def _streams(offsets_s: list[float], gap_s: float, count: int) -> list[Request]:
    """Streams whose tokens come every ``gap_s`` from their offset (one segment each)."""
    out = []
    for i, off in enumerate(offsets_s):
        r = Request(f"r{i}", "m", "chat", 0.0, 100.0, first_token_s=0.05)
        r.segments.append((0.0, 0.05, 100.0, 1.0))
        t = 0.05
        for k in range(count):
            nxt = 0.05 + off + (k + 1) * gap_s
            r.segments.append((t, nxt, 0.0, 1.0))
            t = nxt
        r.streamed = count + 1
        out.append(r)
    return out


def test_streams_in_lockstep_mark_a_continuous_batcher() -> None:
    """Five streams that get each token in the same step: the probe finds lockstep."""
    books = Books()
    inside = _streams([0.0] * 5, 0.02, 20)
    for _ in range(30):
        books._probe(inside, 0.1, 0.3)
    assert books.lockstep > 0.9


def test_streams_on_their_own_clocks_are_not_a_batcher() -> None:
    """Five streams with their own phases: the probe never finds lockstep."""
    books = Books()
    inside = _streams([0.0, 0.0031, 0.0077, 0.0113, 0.0159], 0.02, 20)
    for _ in range(30):
        books._probe(inside, 0.1, 0.3)
    assert books.lockstep == 0.0


def test_lockstep_switches_the_proxy_view_to_the_batched_split() -> None:
    """Once lockstep is found, a prompt beside decoding streams pays its share of the step cost."""
    books = Books()
    books.step_model.coef = (0.02, 0.0, 0.0, 2.0)
    prompt = Request("p", "m", "chat", 0.0, 1000.0, first_token_s=0.3)
    prompt.segments.append((0.1, 0.3, 1000.0, 1.0))
    prompt.streamed = 1
    inside = [*_streams([0.0] * 3, 0.02, 20), prompt]
    before, _ = books._weights_many(inside, 0.1, 0.3, [10.0], 1.0)
    books.lockstep = 1.0
    after, _ = books._weights_many(inside, 0.1, 0.3, [10.0], 1.0)
    assert before is not None
    assert after is not None
    assert after[3] / sum(after) > before[3] / sum(before)


def test_spans_decoding_side_by_side_weigh_the_same_tokens() -> None:
    """Paced: two spans decoding through one piece did one token a step each, whatever
    their average rates; unpaced, each keeps its own average rate."""
    books = Books()
    books.step_model.coef = (0.02, 0.01, 0.0, 0.0)
    slow = Request("slow", "m", "chat", 0.0, 10.0, end_s=10.0, first_token_s=0.1)
    slow.segments.extend([(0.0, 0.1, 10.0, 0.0), (0.1, 10.0, 0.0, 99.0)])
    fast = Request("fast", "m", "chat", 0.0, 10.0, end_s=2.0, first_token_s=0.1)
    fast.segments.extend([(0.0, 0.1, 10.0, 0.0), (0.1, 2.0, 0.0, 95.0)])
    books.paced = True
    paced, _ = books._weights_many([slow, fast], 1.0, 1.5, [5.0], 20.0)
    books.paced = False
    unpaced, _ = books._weights_many([slow, fast], 1.0, 1.5, [5.0], 20.0)
    assert paced is not None
    assert unpaced is not None
    assert paced[0] == pytest.approx(paced[1])
    assert unpaced[1] == pytest.approx(5.0 * unpaced[0])
