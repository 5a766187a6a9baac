"""Command line: ``run``, ``demo`` and ``attribute``.

argparse parses; the settings model validates (``sidecar.config``). User
errors are one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from sidecar import __version__


class UsageError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _fail(message: str) -> NoReturn:
    print(f"llm-energy-sidecar: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or a comma-separated list of numbers"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative watts")
    return values


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-energy-sidecar",
        description="Per-request GPU energy and carbon accounting beside an LLM inference server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    att = sub.add_parser(
        "attribute",
        help="attribute a recorded trace offline and print JSON",
        description="Offline attribution of a recorded trace with the same ledger as `run`.",
    )
    att.add_argument(
        "--power", type=Path, required=True, help="power CSV: time_s,gpu,power_w[,energy_j]"
    )
    att.add_argument(
        "--requests",
        type=Path,
        required=True,
        help="requests CSV: id,model,start_s,end_s[,first_token_s,prompt_tokens,completion_tokens,status]",
    )
    att.add_argument(
        "--idle-watts",
        type=_float_list,
        help="idle baseline: one total over the GPUs, or one value per GPU (comma separated)",
    )
    att.add_argument(
        "--carbon-intensity", type=_non_negative, help="gCO2e/kWh; adds emissions_grams"
    )
    att.set_defaults(handler=_cmd_attribute)

    return parser


def _cmd_attribute(args: argparse.Namespace) -> int:
    from sidecar.attribute import AttributionInputError, attribute
    from sidecar.trace import TraceError, read_power, read_requests

    try:
        result = attribute(
            read_power(args.power),
            read_requests(args.requests),
            idle_watts=args.idle_watts,
            carbon_intensity_g_per_kwh=args.carbon_intensity,
        )
    except (TraceError, AttributionInputError) as e:
        _fail(str(e))
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except UsageError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; that is not our error
        sys.stderr.close()
        return 0
    return code
