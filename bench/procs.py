"""The processes of the proxy benchmarks: stand-in upstream, nginx, sidecar, load generator.

Each runs on 127.0.0.1 in a temporary directory of its own and is stopped
by its own process id when the benchmark ends (never by name).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from bench.common import ROOT, children, free_port, nginx_binary, python

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    upstream model {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


class ProcessError(RuntimeError):
    """A benchmark process did not start: the message says which and why."""


def wait_http(url: str, proc: subprocess.Popen[Any], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``url`` until it answers with any status; fail if ``proc`` dies first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ProcessError(f"{what} exited with status {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                r.read()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ProcessError(f"{what} did not answer {url} within {timeout_s:.0f} s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[Any] | None, *, sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its pid: a signal, then a kill if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)


def _log(tmp: Path, name: str) -> IO[bytes]:
    return (tmp / f"{name}.log").open("wb")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ENERGY_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def start_upstream(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [python(), "-m", "bench.upstream", str(port)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=_log(tmp, "upstream"),
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc, "the stand-in upstream")
    return proc, port


def start_nginx(tmp: Path, upstream_port: int) -> tuple[subprocess.Popen[bytes], int]:
    exe = nginx_binary()
    if exe is None:
        raise ProcessError("nginx is not installed (apt-get install nginx)")
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, upstream_port=upstream_port))
    tmp.chmod(0o755)
    proc = subprocess.Popen(
        [exe, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=_log(tmp, "nginx"),
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc, "nginx")
    return proc, port


def nginx_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """nginx's master and its workers: their CPU counts together."""
    return [proc.pid, *children(proc.pid)]


def run_args(upstream_port: int, port: int, metrics_port: int) -> list[str]:
    """``run``'s flags for a benchmark's sidecar: the stand-in upstream, a simulated GPU,
    both listeners on 127.0.0.1, a 2 s grace so a stop does not wait."""
    return [
        "run",
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
        "--power-source",
        "simulated",
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--grace-period",
        "2",
    ]


def start_sidecar(
    tmp: Path,
    upstream_port: int,
    *,
    name: str = "sidecar",
    uvloop: bool = False,
    data_plane: str | None = None,
    lag_out: Path | None = None,
    variant: str | None = None,
) -> tuple[subprocess.Popen[bytes], int, int]:
    """The real sidecar process, simulated power source, in front of the upstream.

    ``data_plane``: ``--data-plane`` (``aiohttp`` or ``relay``); ``None``, the default's.
    ``lag_out``: run it under ``bench.lag_sidecar``'s event-loop lag probe, writing there.
    ``variant``: run it as ``bench.variant_sidecar`` with that part of its work off.
    """
    port, mport = free_port(), free_port()
    module = "bench.uvloop_sidecar" if uvloop else "sidecar"
    probe: list[str] = []
    if lag_out is not None:
        module, probe = "bench.lag_sidecar", [str(lag_out)]
    elif variant is not None:
        module, probe = "bench.variant_sidecar", [variant]
    proc = subprocess.Popen(
        [
            python(),
            "-m",
            module,
            *probe,
            *run_args(upstream_port, port, mport),
            *(["--data-plane", data_plane] if data_plane else []),
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=_log(tmp, name),
    )
    wait_http(f"http://127.0.0.1:{mport}/healthz", proc, f"the sidecar ({name})")
    wait_http(f"http://127.0.0.1:{port}/health", proc, f"the sidecar's proxy ({name})")
    return proc, port, mport


def start_tree_sidecar(
    h: Harness, tree: Path, command: list[str], *, timeout_s: float
) -> tuple[subprocess.Popen[bytes], Callable[[int, bool], None]]:
    """A sidecar from checkout ``tree`` under a counting tool, in front of a fresh stand-in
    upstream, sampled once a second; ``command`` is what comes before its ``run`` flags (the
    tool and the module). Returns the process and ``load(count, plain)``, which sends
    ``count`` requests 32 at a time (20-token streams, or plain requests) and stops the
    benchmark if any fails. The instruction and system-call counts both start so."""
    up, up_port = start_upstream(h.tmp)
    h.procs.append(up)
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [*command, *run_args(up_port, port, mport), "--sample-hz", "1", "--log-level", "warning"],
        cwd=tree,  # its own package first: the working directory leads sys.path
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    h.procs.append(proc)
    wait_http(f"http://127.0.0.1:{mport}/healthz", proc, "the sidecar", timeout_s=timeout_s)
    gen = h.gen = LoadGen(h.tmp)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def load(count: int, plain: bool) -> None:
        r = gen.call(cmd="load", url=url, n=count, concurrency=32, stream=not plain, max_tokens=20)
        if r["errors"]:
            raise SystemExit(f"{r['errors']} of {count} requests failed under {command[0]}")

    return proc, load


class LoadGen:
    """The load generator process: one JSON command in, one JSON answer out."""

    def __init__(self, tmp: Path) -> None:
        self.proc = subprocess.Popen(
            [python(), "-m", "bench.loadgen"],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=_log(tmp, "loadgen"),
            text=True,
        )

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.receive(cmd["cmd"])

    def send(self, **cmd: Any) -> None:
        """Start a command without waiting for its answer (see :meth:`ready`, :meth:`receive`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def ready(self, timeout_s: float) -> bool:
        """Whether the answer of the command sent is there to read, waiting up to ``timeout_s``."""
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return bool(readable)

    def receive(self, what: str) -> dict[str, Any]:
        """The answer of the command sent last."""
        assert self.proc.stdout is not None
        cmd = {"cmd": what}
        line = self.proc.stdout.readline()
        if not line:
            raise ProcessError(
                f"the load generator exited ({self.proc.poll()}) during {cmd['cmd']}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop(self.proc)


def start_bare(
    tmp: Path, upstream_port: int, *, uvloop: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """The bare aiohttp proxy (no metering): the floor a Python proxy starts from."""
    return _start_floor(tmp, "bench.bare_proxy", "bare", upstream_port, uvloop=uvloop)


def start_relay(
    tmp: Path, upstream_port: int, *, uvloop: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    """The bare httptools relay (no metering, no aiohttp): the other candidate's floor."""
    return _start_floor(tmp, "bench.bare_relay", "relay", upstream_port, uvloop=uvloop)


def _start_floor(
    tmp: Path, module: str, name: str, upstream_port: int, *, uvloop: bool
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    name = f"{name}-uvloop" if uvloop else name
    proc = subprocess.Popen(
        [python(), "-m", module, str(upstream_port), str(port)] + (["uvloop"] if uvloop else []),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=_log(tmp, name),
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc, f"the {name} proxy")
    return proc, port


class Harness:
    """A benchmark's scratch directory and what it started there, torn down as one.

    ``with Harness("prefix-") as h``: processes appended to ``h.procs`` are stopped
    last started first, and ``h.gen`` (the load generator, once set) is closed before
    them, whatever the run raised: every harness here had its own copy of that.
    """

    def __init__(self, prefix: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.tmp = Path(self._dir.name)
        self.procs: list[Any] = []
        self.gen: LoadGen | None = None

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.gen is not None:
                self.gen.close()
            for p in reversed(self.procs):
                stop(p)
        finally:
            self._dir.cleanup()
