"""Podman for the image tests: the stand-in base, the build, and hardened runs.

No image registry is reachable from these machines and Docker's daemon is not installed,
so the tests use Debian's podman (REFERENCE.md, "A real container build on these
machines"). The flags below are the ones these machines need, not preferences:

* the build uses chroot isolation: the default OCI isolation fails with "cgroups in
  hybrid mode not supported";
* runs use runc with cgroupfs and explicit ulimits: crun and the default limits fail with
  "setrlimit ... Operation not permitted";
* the network is the host's, so a container reaches the test's servers on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from tools import require_tool

BASE_IMAGE = "localhost/python:3.11-slim"
IMAGE = "localhost/llm-energy-sidecar:test"
VENV = "/opt/llm-energy-sidecar"

# Global options (before the subcommand) for every `podman run`.
RUNTIME: tuple[str, ...] = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")
# What these machines need for any container to start (see the module docstring).
MACHINE: tuple[str, ...] = (
    "--ulimit",
    "nofile=16384:16384",
    "--ulimit",
    "nproc=4096:4096",
    "--network",
    "host",
)
# deploy/base/sidecar.yaml's securityContext, and its one writable volume (/tmp).
HARDENED: tuple[str, ...] = (
    "--read-only",
    "--read-only-tmpfs=false",
    "--tmpfs",
    "/tmp:rw,size=64m",
    "--user",
    "65532:65532",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
)
# What the official python:3.11-slim sets and a plain import would not.
BASE_CHANGES: tuple[str, ...] = (
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)


@dataclass(frozen=True, slots=True)
class Podman:
    """The podman executable, with the helpers the image tests share."""

    exe: str

    def __call__(
        self, *args: str, timeout_s: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.exe, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:3])} ... exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def run_args(self, image: str, *args: str, extra: Sequence[str] = ()) -> list[str]:
        """The argv of a hardened `podman run --rm` of ``image``."""
        return [self.exe, *RUNTIME, "run", "--rm", *MACHINE, *HARDENED, *extra, image, *args]

    def run(
        self, image: str, *args: str, extra: Sequence[str] = (), timeout_s: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``image`` hardened to completion; the caller checks the exit status."""
        return subprocess.run(
            self.run_args(image, *args, extra=extra),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def size_bytes(self, image: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def require_podman() -> Podman:
    """Podman, or skip (a failure under CI=true, like every missing tool)."""
    return Podman(require_tool("podman"))


# Shape the stand-in like the official image where the Dockerfile can tell: `python` on
# /usr/local/bin, no EXTERNALLY-MANAGED marker, and this machine's CA bundle (pip inside
# the build must trust what the host trusts).
BASE_HOOKS: tuple[str, ...] = (
    'ln -sf /usr/bin/python3 "$1/usr/local/bin/python"',
    'rm -f "$1/usr/lib/python3.11/EXTERNALLY-MANAGED"',
    'cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"',
)

# Debian's -slim images leave out documentation, manuals and translations (debuerreotype's
# slimming); so does the stand-in, which also makes it smaller to import.
BASE_DPKG: tuple[str, ...] = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
)


def make_base(podman: Podman) -> float | None:
    """Import the python:3.11-slim stand-in once per machine; seconds spent, None if reused.

    mmdebstrap's minbase with bookworm's Python 3.11, pip and venv, streamed as a tarball
    into `podman import`. mmdebstrap rather than debootstrap: it resolves with apt and
    unpacks without fsync, about half debootstrap's CPU time, which counts against CI's
    budget on a fresh machine.
    """
    if podman.exists(BASE_IMAGE):
        return None
    mmdebstrap = require_tool("mmdebstrap")
    if os.geteuid() != 0:
        message = f"{BASE_IMAGE} is missing and making it needs root (mmdebstrap --mode=root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    start = time.monotonic()
    hooks = [f"--customize-hook={hook}" for hook in BASE_HOOKS]
    hooks += [f"--dpkgopt={option}" for option in BASE_DPKG]
    changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
    with tempfile.TemporaryFile() as log:
        strap = subprocess.Popen(
            [
                mmdebstrap,
                "--mode=root",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                *hooks,
                "bookworm",
                "-",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            imported = subprocess.run(
                [podman.exe, "import", *changes, "-", BASE_IMAGE],
                stdin=strap.stdout,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
        finally:
            if strap.stdout is not None:
                strap.stdout.close()
            code = strap.wait(timeout=60)
        log.seek(0)
        strap_log = log.read().decode(errors="replace")
    if code != 0 or imported.returncode != 0:
        podman("rmi", "--force", BASE_IMAGE, check=False)  # never reuse a partial base
    assert code == 0, f"mmdebstrap failed:\n{strap_log[-3000:]}"
    assert imported.returncode == 0, f"podman import failed: {imported.stderr[-3000:]}"
    return time.monotonic() - start


def build(podman: Podman, context: Path, tag: str, *build_args: str) -> float:
    """`podman build` of ``context`` on the stand-in base; seconds it took."""
    args = [arg for pair in (("--build-arg", a) for a in build_args) for arg in pair]
    start = time.monotonic()
    podman(
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--build-arg",
        f"PYTHON_IMAGE={BASE_IMAGE}",
        *args,
        "-t",
        tag,
        str(context),
        timeout_s=600,
    )
    return time.monotonic() - start


def report(config: pytest.Config, line: str) -> None:
    """Write one line to the terminal even while output is captured (figures for the log)."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if terminal is None:
        print(line)
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            terminal.ensure_newline()
            terminal.write_line(line)
    else:
        terminal.ensure_newline()
        terminal.write_line(line)
