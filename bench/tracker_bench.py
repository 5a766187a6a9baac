"""CPU of the response tracker alone, per streamed request: ``python -m bench.tracker_bench``.

The proxy's per-chunk metering in isolation (no sockets, no event loop, no
ledger): the stand-in upstream's own 20-token stream (22 SSE events, usage
included) through :class:`ResponseTracker`, one event per chunk and four per
chunk (what a busy upstream's reads coalesce to), as sent and in strip mode
(the injected usage chunk removed). Best of 5 rounds of 1,000 streams, with
``time.process_time``; prints one JSON line of µs per stream.
"""

from __future__ import annotations

import json
import sys
import time

from bench.common import ROOT

sys.path.insert(0, str(ROOT / "tests"))

from upstreams import openai_chunks  # the stand-in upstream's own chunks

from sidecar.tracking.protocols import ResponseTracker, parse_request

BODY = json.dumps(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 20,
        "stream_options": {"include_usage": True},
    }
).encode()


def us_per_stream(n: int, *, strip: bool, per_chunk: int) -> float:
    info = parse_request("chat", "openai", BODY, "application/json", path="/v1/chat/completions")
    events = openai_chunks("m", 20, True)
    chunks = [b"".join(events[i : i + per_chunk]) for i in range(0, len(events), per_chunk)]
    t0 = time.process_time()
    for _ in range(n):
        tracker = ResponseTracker(info, "text/event-stream", None, {}, strip_usage_chunk=strip)
        for chunk in chunks:
            tracker.feed(chunk)
        tracker.flush()
        tracker.finish()
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    out: dict[str, float] = {}
    for strip in (False, True):
        for per_chunk in (1, 4):
            us_per_stream(200, strip=strip, per_chunk=per_chunk)  # warm
            best = min(us_per_stream(1000, strip=strip, per_chunk=per_chunk) for _ in range(5))
            mode = "strip" if strip else "as_sent"
            out[f"tracker_us_per_stream_{mode}_{per_chunk}_per_chunk"] = round(best, 1)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
