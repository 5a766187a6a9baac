"""``python -m bench.uvloop_sidecar run ...``: the sidecar's own CLI on uvloop's event loop.

Only for the uvloop experiment: the sidecar does not depend on uvloop.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from sidecar.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main())
