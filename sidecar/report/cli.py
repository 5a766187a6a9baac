"""The ``report`` subcommand's flags and handler, registered by :mod:`sidecar.cli`."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Final

_NEGATIVE_OR_RELATIVE: Final = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(\.\d+)?(ms|s|m|h|d|w)$")


def add_report_parser(sub: Any) -> None:
    from sidecar.cli import _non_negative

    rep = sub.add_parser(
        "report",
        help="write the environmental report (report.md, report.json, PNG figures)",
        description=(
            "The environmental report for a model card or an ESG filing, from a --record "
            "directory or from a Prometheus that scraped the sidecar. Needs the extra `report` "
            "(pip install 'llm-energy-sidecar[report]'). Reads no environment variables."
        ),
    )
    # `--from -7d`: argparse takes a value that starts with "-" for an option unless it
    # looks like a negative number; relative times are made to look like one.
    rep._negative_number_matcher = _NEGATIVE_OR_RELATIVE
    source = rep.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, metavar="DIR", help="a `run --record DIR` directory")
    source.add_argument("--prometheus", metavar="URL", help="a Prometheus that scraped the sidecar")
    rep.add_argument(
        "--selector",
        metavar="SEL",
        help='with --prometheus: a series selector such as {namespace="serving",job="vllm"}',
    )
    rep.add_argument(
        "--from",
        dest="from_",
        metavar="T",
        help="start: RFC 3339 time or relative (-7d); default the recording's start, "
        "or with --prometheus 24 h before --to",
    )
    rep.add_argument(
        "--to",
        metavar="T",
        help="end: RFC 3339 time or relative; default the recording's end, or now",
    )
    rep.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    rep.add_argument(
        "--carbon-intensity",
        type=_non_negative,
        metavar="G",
        help="gCO2e/kWh for the whole period, instead of what was recorded",
    )
    rep.add_argument(
        "--pue", type=_non_negative, metavar="F", help="PUE instead of the recorded one"
    )
    rep.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from sidecar.cli import _fail
    from sidecar.report.command import ReportRequest, run_report
    from sidecar.report.inputs import ReportError
    from sidecar.report.render import MatplotlibMissing

    request = ReportRequest(
        trace=args.trace,
        prometheus=args.prometheus,
        selector=args.selector,
        from_text=args.from_,
        to_text=args.to,
        out=args.out,
        carbon_intensity_g_per_kwh=args.carbon_intensity,
        pue=args.pue,
    )
    try:
        written = run_report(request)
    except (ReportError, MatplotlibMissing) as e:
        _fail(str(e))
    for path in written:
        print(path)
    sys.stdout.flush()
    return 0
