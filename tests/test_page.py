"""The live page on the metrics port: served at ``/``, self-contained, and drawn in a real browser.

The browser test runs Debian's ``chromium`` headless against the demo while it runs and
reads back what the page's own script drew (the number of points of the power line, the
joules behind the phase bar), then takes a screenshot.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from demo_proc import start_demo
from procs import ROOT, free_port
from pytest_aiohttp import AiohttpClient
from tools import require_tool

from sidecar.page import add_page_route, page_html

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
SCREENSHOT_DIR_ENV = "LLM_ENERGY_PAGE_SCREENSHOT_DIR"


class TestServed:
    async def test_root_serves_the_page(self, aiohttp_client: AiohttpClient) -> None:
        """GET / answers the page as UTF-8 HTML that is never cached."""
        app = web.Application()
        add_page_route(app)
        client = await aiohttp_client(app)
        r = await client.get("/")
        assert r.status == 200
        assert r.content_type == "text/html"
        assert r.charset == "utf-8"
        assert r.headers["Cache-Control"] == "no-store"
        assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
        body = await r.read()
        assert body == page_html()
        assert b'id="power-chart"' in body

    def test_page_loads_nothing_from_elsewhere(self) -> None:
        """No script, stylesheet, image or font from another origin: it must work offline."""
        html = page_html().decode()
        assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", html)
        assert "@import" not in html
        assert "url(" not in html
        urls = set(re.findall(r"https?://[^\s\"')]+", html))
        assert urls <= {"http://www.w3.org/2000/svg"}, urls
        # It reads /summary relative to itself, so a path prefix in front of it still works.
        assert 'fetch("summary"' in html

    def test_wheel_ships_the_page(self, tmp_path: Path) -> None:
        """The built wheel contains sidecar/page/index.html (package data, not only source)."""
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        (wheel,) = tmp_path.glob("llm_energy_sidecar-*.whl")
        with zipfile.ZipFile(wheel) as z:
            assert z.read("sidecar/page/index.html") == page_html()


# A real browser against the running demo ---------------------------------------------------


@pytest.fixture
def demo() -> Iterator[str]:
    """The demo running in a child process; yields the page address it printed first."""
    port, mport = free_port(), free_port()
    proc = start_demo(port, mport, "--duration", "60", "--rps", "6")
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60.0)
        assert ready, "the demo printed nothing within 60 s"
        first = proc.stdout.readline().strip()
        assert first == f"demo: live page on http://127.0.0.1:{mport}/", first
        yield f"http://127.0.0.1:{mport}/"
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def chromium(binary: str, profile: Path, *args: str, timeout_s: float = 60.0) -> str:
    """Run headless Chromium with a fresh profile; its stdout."""
    done = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _attribute(dom: str, element_id: str, name: str) -> str:
    tag = re.search(rf"<[^>]*\bid=\"{element_id}\"[^>]*>", dom)
    assert tag, f"#{element_id} not in the DOM"
    value = re.search(rf'\b{name}="([^"]*)"', tag.group(0))
    assert value, f"#{element_id} has no {name}"
    return value.group(1)


def _text(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"#{element_id} not in the DOM"
    return m.group(1)


async def test_page_draws_live_data_in_chromium(demo: str, tmp_path: Path) -> None:
    """In headless Chromium the page polls /summary and draws a power line with points."""
    binary = require_tool("chromium")
    await asyncio.sleep(3.0)  # the demo's load has started: the figures are not all zero
    # Virtual time runs the page's once-a-second timer several times, waiting for each fetch.
    dom = await asyncio.to_thread(
        chromium, binary, tmp_path / "profile-dom", "--virtual-time-budget=6000", "--dump-dom", demo
    )
    points = int(_attribute(dom, "power-chart", "data-points"))
    assert points >= 3, dom[:2000]
    polyline = _attribute(dom, "power-line", "points")
    assert len(polyline.split()) == points
    assert float(_attribute(dom, "power-chart", "data-last-watts")) > 0
    assert float(_attribute(dom, "phase-chart", "data-total-joules")) > 0
    assert float(_attribute(dom, "phase-dynamic", "width")) > 0
    assert _text(dom, "power-now").endswith(" W")
    assert _text(dom, "status").startswith("updated ")
    assert "gCO2e" in dom

    shots = tmp_path / "shots"
    shots.mkdir()
    screenshot = shots / "page.png"
    await asyncio.to_thread(
        chromium,
        binary,
        tmp_path / "profile-shot",
        "--virtual-time-budget=6000",
        "--window-size=1280,1000",
        f"--screenshot={screenshot}",
        demo,
    )
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # text, a line and bars, not a blank page
    keep = os.environ.get(SCREENSHOT_DIR_ENV)
    if keep:  # for a person to look at: LLM_ENERGY_PAGE_SCREENSHOT_DIR=/tmp/shots
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / "page.png")
