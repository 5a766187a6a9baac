"""The serving bench's error breakdown: every scored request lands in one bin of each kind."""

from __future__ import annotations

from bench.serving_accuracy import BINS, MODES, breakdown


def test_each_breakdown_counts_every_scored_request_once() -> None:
    """Per view, the bins of every kind hold the same requests (each once), errors are >= 0."""
    rows = breakdown("chat", 20.0)
    for mode in MODES:
        counts = {
            what: sum(int(r["requests"]) for r in rows[f"chat {mode} by {what}"]) for what in BINS
        }
        assert len(set(counts.values())) == 1, counts
        assert next(iter(counts.values())) > 20
        for what in BINS:
            for r in rows[f"chat {mode} by {what}"]:
                assert 0.0 <= r["median"] <= r["p90"]
                assert r["from"] < r["to"]
