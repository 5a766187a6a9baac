"""The proxy's behaviour tests, run again on ``--data-plane aiohttp``.

The relay is the default data plane, so the main run exercises it; the aiohttp
data plane stays a supported choice and must keep passing the same assertions.
They run in a child pytest because ``make_rig`` picks its data plane from the
environment once per test, and running each test twice in one process would
double every fixture's set-up for the default path too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
BEHAVIOUR = ("test_proxy.py", "test_proxy_inject.py", "test_receipts.py", "test_shapes.py")


def test_behaviour_tests_pass_on_the_aiohttp_data_plane() -> None:
    """Every proxy, injection, receipt and shape test passes with data_plane=aiohttp."""
    env = {**os.environ, "LLM_ENERGY_TEST_DATA_PLANE": "aiohttp"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(str(TESTS / name) for name in BEHAVIOUR)],
        env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
