"""The stand-in model server in a process of its own: ``python -m bench.upstream PORT``.

It is the tests' OpenAI-compatible stand-in (``tests/upstreams.py``): it streams
``max_tokens`` SSE chunks, with ``delay`` seconds between them, plus the usage
chunk and ``[DONE]``. Its CPU is nobody's figure; it only has to be the same
for the direct path, nginx and the sidecar.
"""

from __future__ import annotations

import sys

from aiohttp import web

from bench.common import ROOT

sys.path.insert(0, str(ROOT / "tests"))

from upstreams import create_upstream


def main() -> None:
    port = int(sys.argv[1])
    web.run_app(
        create_upstream(),
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
