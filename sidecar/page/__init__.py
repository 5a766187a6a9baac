"""The live page on the metrics port: ``GET /`` serves one self-contained HTML file.

Clusters are often offline, so the page loads nothing from elsewhere: its
script and its SVG chart are inline, shipped as package data, and it reads only
``/summary`` on the same port, once a second. The file is read once, at the
first request, and served from memory after that.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

__all__ = ["add_page_route", "page_html"]


@cache
def page_html() -> bytes:
    """The page's bytes, from the installed package (wheel, editable or source tree)."""
    return resources.files(__package__).joinpath("index.html").read_bytes()


async def page(request: web.Request) -> web.Response:
    """``GET /``: the page. No caching, so an upgraded sidecar serves its own page."""
    return web.Response(
        body=page_html(),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            # Same-origin only: the page fetches /summary and nothing else.
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'; img-src 'self' data:"
            ),
        },
    )


def add_page_route(app: web.Application) -> None:
    """Serve the page at ``/`` on ``app`` (the metrics application)."""
    app.router.add_get("/", page)
