"""The step-based serving engine: continuous batching, load-dependent costs, exact truth."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.serving_sim import EngineSpec, load_trace, serve

DATA = Path(__file__).resolve().parents[1] / "bench" / "data"
QUIET = EngineSpec(gpus=2, noise_w=0.0, standby_lead_s=1.0, duration_s=60.0)


def _dynamic_from_counter(
    spec: EngineSpec, samples: list[tuple[float, str, float, float]]
) -> float:
    first: dict[str, tuple[float, float]] = {}
    last: dict[str, tuple[float, float]] = {}
    for t, g, _, e in samples:
        first.setdefault(g, (t, e))
        last[g] = (t, e)
    return sum(last[g][1] - first[g][1] - spec.idle_w * (last[g][0] - first[g][0]) for g in last)


def test_truth_is_every_joule_above_idle() -> None:
    """The requests' true dynamic energy sums to the counters' increase above the idle draw."""
    trace = [(0.05 * i, 200 + 37 * i, 5 + i % 40) for i in range(120)]
    wl = serve(trace, QUIET)
    truth = sum(r.truth_j for r in wl.requests)
    assert truth > 0
    assert _dynamic_from_counter(QUIET, wl.samples) == pytest.approx(truth, rel=1e-9)
    for r in wl.requests:
        assert 0.0 < r.truth_prefill_j < r.truth_j
        assert r.start_s <= (r.scheduled_s or 0.0) < r.first_token_s <= r.end_s


def test_a_long_prompt_is_chunked_and_its_first_token_waits_for_all_of_it() -> None:
    """A 5,000-token prompt takes three steps of a 2,048-token budget before its first token."""
    wl = serve([(0.0, 5000, 4)], QUIET)
    r = wl.requests[0]
    assert r.token_s is not None
    assert len(r.token_s) == 4
    prefill_s = 3 * QUIET.step_fixed_s + 5000 * QUIET.prefill_token_s
    assert r.first_token_s - (r.scheduled_s or 0.0) == pytest.approx(
        prefill_s + QUIET.stream_delay_s, rel=1e-6
    )
    assert r.token_s == sorted(r.token_s)


def test_decode_gets_cheaper_per_token_as_the_batch_grows() -> None:
    """Memory-bound decode: 16 requests in one batch cost far less than 16 times one alone."""
    one = serve([(0.0, 10, 200)], QUIET).requests[0]
    batch = serve([(0.0, 10, 200)] * 16, QUIET).requests
    alone_decode = one.truth_j - one.truth_prefill_j
    shared_decode = batch[0].truth_j - batch[0].truth_prefill_j
    assert shared_decode < alone_decode / 3
    assert len({round(r.truth_j, 9) for r in batch}) == 1  # identical requests, equal truth


def test_prefill_energy_is_about_linear_in_prompt_tokens() -> None:
    """Compute-bound prefill: four times the prompt, about four times the prefill energy."""
    short = serve([(0.0, 1000, 2)], QUIET).requests[0].truth_prefill_j
    long = serve([(0.0, 4000, 2)], QUIET).requests[0].truth_prefill_j
    assert 3.6 < long / short < 4.1


def test_same_trace_same_run() -> None:
    """The engine is deterministic for a trace and a seed."""
    trace = load_trace(DATA / "azure_llm_2023_conv_20min.csv")
    spec = EngineSpec(duration_s=20.0)
    a, b = serve(trace, spec), serve(trace, spec)
    assert a.samples == b.samples
    assert [r.truth_j for r in a.requests] == [r.truth_j for r in b.requests]


def test_bundled_traces_are_small_named_and_readable() -> None:
    """The bundled Azure samples load, stay under 1 MB together, and carry their licence."""
    files = sorted(DATA.glob("azure_llm_2023_*.csv"))
    assert len(files) == 2
    assert sum(f.stat().st_size for f in files) < 1_000_000
    assert (DATA / "LICENSE-azure-llm-inference-trace-2023.txt").exists()
    rows = load_trace(files[0])
    assert len(rows) > 1000
    assert all(p >= 1 and o >= 1 for _, p, o in rows)


def test_a_bad_header_names_the_file(tmp_path: Path) -> None:
    """A trace with the wrong header is refused with one line naming the file."""
    bad = tmp_path / "t.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.csv: header must be"):
        load_trace(bad)


def test_a_shared_prefix_is_read_from_the_cache_once_prefilled() -> None:
    """Requests opening with the shared prefix compute it once: later ones read it in whole
    blocks (their prefill is shorter and cheaper), and every joule is still someone's."""
    spec = EngineSpec(
        gpus=2, noise_w=0.0, standby_lead_s=1.0, duration_s=60.0,
        prefix_share=1.0, prefix_tokens=1000,
    )  # fmt: skip
    trace = [(0.0, 1200, 5), (2.0, 1200, 5), (4.0, 1200, 5), (6.0, 600, 5)]
    wl = serve(trace, spec)
    first, second, third, short = wl.requests
    assert first.cached_tokens == 0
    assert second.cached_tokens == third.cached_tokens == 1000 - 1000 % spec.cache_block
    assert short.cached_tokens == 592  # a prompt inside the prefix: all but its last block
    assert second.first_token_s - second.start_s < (first.first_token_s - first.start_s) / 2
    assert second.truth_prefill_j < first.truth_prefill_j / 2
    truth = sum(r.truth_j for r in wl.requests)
    assert _dynamic_from_counter(spec, wl.samples) == pytest.approx(truth, rel=1e-9)
    plain = serve(trace, QUIET)
    assert all(r.cached_tokens == 0 for r in plain.requests)
