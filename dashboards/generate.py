"""Write the Grafana dashboards as JSON to ``dashboards/json/``.

    python -m dashboards.generate          # write dashboards/json/*.json
    python -m dashboards.generate --check  # exit 1 if a committed file differs

The JSON is what Grafana provisioning or the kustomize ConfigMap loads (docs/dashboards.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from grafana_foundation_sdk.builders.dashboard import Dashboard

from dashboards import fleet, overview, requests
from dashboards.common import PanelQuery, iter_dashboard_queries, to_json

__all__ = ["DASHBOARDS", "JSON_DIR", "iter_queries", "main", "render_all", "write_all"]

JSON_DIR: Final = Path(__file__).resolve().parent / "json"

DASHBOARDS: Final[Mapping[str, Callable[[], Dashboard]]] = {
    overview.UID: overview.overview_dashboard,
    requests.UID: requests.requests_dashboard,
    fleet.UID: fleet.fleet_dashboard,
}
"""Dashboard uid -> the pure function that builds it; the file is ``json/<uid>.json``."""


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{uid}.json": to_json(build()) for uid, build in DASHBOARDS.items()}


def iter_queries() -> Iterator[PanelQuery]:
    """Every (dashboard uid, panel title, ref id, expr, instant) of every dashboard.

    Substitute the template variables with ``dashboards.common.substitute`` before sending an
    expr to Prometheus.
    """
    for build in DASHBOARDS.values():
        yield from iter_dashboard_queries(build())


def write_all(directory: Path = JSON_DIR, *, check: bool = False) -> list[Path]:
    """Write (or with ``check``, only compare) every dashboard; return the files that differed.

    With ``check``, JSON files in ``directory`` that no dashboard produces count as differing.
    """
    rendered = render_all()
    stale: list[Path] = []
    for name, text in rendered.items():
        path = directory / name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not check:
            directory.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if directory.is_dir():
        stale += sorted(p for p in directory.glob("*.json") if p.name not in rendered)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the dashboards, or ``--check`` that the committed JSON is current."""
    parser = argparse.ArgumentParser(description="Generate the llm-energy Grafana dashboards.")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a JSON file differs from generation"
    )
    args = parser.parse_args(argv)
    stale = write_all(check=args.check)
    for path in stale:
        print(f"{path}: {'out of date' if args.check else 'written'}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
