"""Helpers for tests that run outside programs (promtool, prometheus, alertmanager, kubectl)."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["require_tool"]


def require_tool(name: str) -> str:
    """Return the path of the executable ``name``, or skip the test when it is not installed.

    In CI (``CI=true``) a missing tool fails the test instead: a skipped integration test there
    would hide that the check never ran.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not on PATH"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)
    pytest.skip(message)
