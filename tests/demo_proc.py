"""Starting ``python -m sidecar demo`` as a child process, for the tests that run the demo."""

from __future__ import annotations

import os
import subprocess
import sys

from procs import ROOT


def start_demo(
    port: int, metrics_port: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """The demo on 127.0.0.1 only, pipes captured, with no LLM_ENERGY_* from the caller's
    environment (the demo must read none) beyond what ``env`` adds."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ENERGY_")}
    clean.update(env or {})
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            *extra,
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean,
        cwd=ROOT,
    )
