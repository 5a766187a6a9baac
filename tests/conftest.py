"""Suite-wide rules: under CI a skipped integration test is a failure, not a skip."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest
import structlog
from vllm_server import vllm, vllm_factory  # noqa: F401  (session fixtures: one real vLLM)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """With CI=true, only tests marked `gpu` may skip: a missing tool must not hide a test."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and item.get_closest_marker("gpu") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (only `gpu` tests may skip): {report.longrepr}"


@pytest.fixture(autouse=True)
def _reset_logging() -> Generator[None, None, None]:
    """Each test starts and ends with structlog's defaults: no configuration leaks across tests."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
