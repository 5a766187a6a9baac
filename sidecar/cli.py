"""Command line: ``run``, ``demo``, ``attribute`` and ``report``.

argparse parses; the settings model validates (``sidecar.config``). User
errors are one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

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


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
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
        help=(
            "requests CSV: id,model,start_s,end_s[,first_token_s,prompt_tokens,"
            "completion_tokens,status,cached_tokens]"
        ),
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
    _add_run(sub)

    demo = sub.add_parser(
        "demo",
        help="run the sidecar in front of an embedded simulated model server with load",
        description="The main job on an embedded simulated GPU and model server; reads no environment.",
    )
    demo.add_argument(
        "--duration", type=_positive, default=30.0, help="seconds to run (default 30)"
    )
    demo.add_argument(
        "--rps", type=_positive, default=4.0, help="mean requests per second (default 4)"
    )
    demo.add_argument(
        "--listen", default="127.0.0.1:8080", help="proxy HOST:PORT (default 127.0.0.1:8080)"
    )
    demo.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9400",
        help="metrics HOST:PORT (default 127.0.0.1:9400)",
    )
    demo.set_defaults(handler=_cmd_demo)
    from sidecar.report.cli import add_report_parser

    add_report_parser(sub)

    return parser


RUN_HELP: dict[str, str] = {
    "upstream": "the model server to proxy to (proxy mode)",
    "listen": "HOST:PORT where the proxy listens (default 0.0.0.0:8080)",
    "metrics_listen": "HOST:PORT for /metrics, /healthz, /readyz, /summary (default 0.0.0.0:9400)",
    "observe": "the model server's own Prometheus endpoint (observer mode)",
    "power_source": "nvml | dcgm:URL | simulated | replay:PATH (default nvml)",
    "gpus": "GPU indices or UUIDs, comma separated (default: all visible)",
    "sample_hz": "power samples per second per GPU, up to 100 (default 10)",
    "idle_watts": "fixed idle baseline: one total, or one value per GPU (default: estimated)",
    "gpu_share": (
        "fraction in (0, 1] of each metered board's power this pod books, where the board "
        "is shared (MIG, time-slicing); required when a metered GPU is in MIG mode"
    ),
    "region": "grid region: ISO country, grid zone, or aws:/gcp:/azure: cloud region",
    "carbon_provider": "static | electricitymaps | watttime | uk (default static)",
    "carbon_intensity": "fixed gCO2e/kWh; overrides the provider",
    "carbon_api_url": "base URL of the live carbon provider's API",
    "carbon_refresh": "seconds between live intensity refreshes (default 300)",
    "emissions_budget": "grams CO2e per day this deployment may emit",
    "pue": "data-centre power usage effectiveness (default 1.0)",
    "model": "model label when a request names none (default 'default')",
    "record": "append power samples and finished requests to DIR/power.csv and DIR/requests.csv",
    "max_models": "distinct model labels before the rest become 'other' (default 20)",
    "carbon_zone": "the live provider's own zone code, when it differs from --region",
    "gpu_embodied_kg": "manufacturing emissions per GPU in kg (default by GPU model)",
    "host_embodied_kg": "manufacturing emissions of the host in kg (default 2500 per 8-GPU server)",
    "lifetime_years": "hardware lifetime for amortising embodied emissions",
    "energy_receipts": (
        "tell each client what its request cost (an SSE comment before [DONE],"
        " or an `energy` member in a JSON body)"
    ),
    "data_plane": (
        "relay | aiohttp: how the proxy moves bytes (relay: asyncio protocols and llhttp; "
        "aiohttp: its web server and client, the earlier default; same metering; default relay)"
    ),
    "inject_usage": (
        "add stream_options.include_usage to streaming OpenAI requests and strip the extra "
        "chunk, for exact token counts (default on; --no-inject-usage turns it off)"
    ),
    "otlp_listen": (
        "HOST:PORT of an OTLP/HTTP receiver (POST /v1/traces) for the model server's "
        "request spans (traces mode, no proxy in the path)"
    ),
    "otlp_forward": "OTLP/HTTP endpoint (the user's collector) that gets every export unchanged",
    "otlp_energy_spans": (
        "with --otlp-forward: also send a span llm_energy.request with its energy per finished request"
    ),
    "tenant_header": "request header naming the tenant for showback (for example x-tenant-id)",
    "tenant_from_api_key": (
        "tenant = first 12 hex digits of SHA-256(salt + bearer token); "
        "salt from LLM_ENERGY_TENANT_SALT (required)"
    ),
    "max_tenants": "distinct tenant labels before the rest become 'other' (default 50)",
    "upstream_connect_timeout": "seconds to connect to the upstream (default 5)",
    "upstream_read_timeout": "longest silence between upstream bytes, seconds (default 600)",
    "proxy_hold": (
        "proxy mode: seconds each interval's energy waits before it is shared, so a stream's "
        "final usage (its exact prompt) is in when its prefill is placed; per-request and "
        "per-model figures come that much later (default 0; 30 covers most streams)"
    ),
    "grace_period": "on SIGTERM, seconds in-flight requests may take to finish (default 30)",
    "log_level": "debug | info | warning | error (default info)",
}


RUN_METAVAR: dict[str, str] = {
    "upstream": "URL",
    "observe": "URL",
    "otlp_listen": "HOST:PORT",
    "otlp_forward": "URL",
    "carbon_api_url": "URL",
    "listen": "HOST:PORT",
    "metrics_listen": "HOST:PORT",
    "power_source": "SOURCE",
    "gpus": "LIST",
    "sample_hz": "N",
    "idle_watts": "W",
    "gpu_share": "F",
    "region": "CODE",
    "carbon_zone": "CODE",
    "carbon_provider": "PROVIDER",
    "carbon_intensity": "G",
    "emissions_budget": "G",
    "carbon_refresh": "S",
    "upstream_connect_timeout": "S",
    "upstream_read_timeout": "S",
    "grace_period": "S",
    "proxy_hold": "S",
    "pue": "F",
    "model": "NAME",
    "record": "DIR",
    "max_models": "N",
    "max_tenants": "N",
    "tenant_header": "NAME",
    "gpu_embodied_kg": "KG",
    "host_embodied_kg": "KG",
    "lifetime_years": "Y",
    "log_level": "LEVEL",
    "data_plane": "PLANE",
}


def _add_run(sub: Any) -> None:
    from sidecar.config import Settings

    run = sub.add_parser(
        "run",
        help="run the sidecar (proxy and/or observer) with metrics",
        description=(
            "Run the sidecar. Every flag also reads LLM_ENERGY_<FLAG> from the environment, "
            "and --config FILE reads the same keys (snake_case) from YAML; flags win over env, env over file."
        ),
        argument_default=argparse.SUPPRESS,
    )
    run.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML file with the same keys in snake_case"
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            run.add_argument(
                flag, action="store_const", const="true", dest=name, help=RUN_HELP[name]
            )
            if field.default is True:  # a flag that is on by default can be turned off
                run.add_argument(
                    "--no-" + flag[2:],
                    action="store_const",
                    const="false",
                    dest=name,
                    help=argparse.SUPPRESS,
                )
        else:
            run.add_argument(
                flag, dest=name, metavar=RUN_METAVAR.get(name, "VALUE"), help=RUN_HELP[name]
            )
    run.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from sidecar import logs
    from sidecar.app import StartupError, serve
    from sidecar.config import SettingsError, load_settings

    flags = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "config")}
    try:
        settings = load_settings(flags, getattr(args, "config", None))
    except SettingsError as e:
        _fail(str(e))
    logs.configure(settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except StartupError as e:  # only start-up: a crash once serving is not a bad flag
        _fail(str(e).splitlines()[0])


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from sidecar import logs
    from sidecar.demo import run_demo

    logs.configure("warning")
    try:
        return asyncio.run(run_demo(args.duration, args.rps, args.listen, args.metrics_listen))
    except OSError as e:
        _fail(
            f"cannot listen: {e.strerror or e} (use --listen/--metrics-listen to pick free ports)"
        )


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
