"""The container image, built from the Dockerfile and run as Kubernetes runs it.

Podman builds the Dockerfile on a python:3.11-slim stand-in (tests/containers.py says why
and how) and runs it with deploy/base/sidecar.yaml's securityContext: read-only root with
a writable /tmp, uid 65532, every capability dropped, no privilege escalation. The checks
are what a user sees: `--help`, a bad flag, the proxy in front of a model server, the
metrics port, `--record` onto a volume, and SIGTERM during a stream. Inside the image, a
second look for what must not be there: compilers, build backends, the source tree.

The build time and the image's size over its base are printed to the terminal.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from containers import BASE_IMAGE, IMAGE, VENV, Podman, build, make_base, report, require_podman
from procs import ROOT, free_port, wait_http
from prometheus_client.parser import text_string_to_metric_families
from upstreams import create_upstream

from sidecar.config import Settings, split_host_port

pytestmark = pytest.mark.integration

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
MiB = 2**20
# Issue 14's goal for what the image adds to its base.
SIZE_GOAL_MIB = 60
# Compilers, and the modules that build or install packages: none belongs in the image.
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "ld", "as", "make")
BUILD_MODULES = (
    "pip",
    "setuptools",
    "pkg_resources",
    "_distutils_hack",
    "wheel",
    "hatchling",
    "build",
)


@dataclass(frozen=True, slots=True)
class Built:
    """The image under test and what making it cost."""

    podman: Podman
    tag: str
    build_s: float
    size_over_base_bytes: int


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Built:
    """The stand-in base (made once per machine), then this checkout's image, timed."""
    podman = require_podman()
    base_s = make_base(podman)
    if base_s is not None:
        report(request.config, f"image: made the {BASE_IMAGE} stand-in in {base_s:.0f} s")
    build_s = build(podman, ROOT, IMAGE)
    over = podman.size_bytes(IMAGE) - podman.size_bytes(BASE_IMAGE)
    report(
        request.config,
        f"image: built {IMAGE} in {build_s:.0f} s; {over / MiB:.1f} MiB over its base",
    )
    return Built(podman=podman, tag=IMAGE, build_s=build_s, size_over_base_bytes=over)


def _inside(image: Built, code: str, *, python: str = "python", tag: str | None = None) -> object:
    """Run ``code`` with the image's Python (or ``tag``'s), hardened; stdout parsed as JSON."""
    done = image.podman.run(tag or image.tag, "-c", code, extra=("--entrypoint", python))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@dataclass(frozen=True, slots=True)
class Container:
    """A running `podman run` of the image and the container's name."""

    proc: subprocess.Popen[bytes]
    name: str
    log: Path


@asynccontextmanager
async def running(
    image: Built, *args: str, log: Path, extra: tuple[str, ...] = ()
) -> AsyncIterator[Container]:
    """The image's `run` with ``args``, named so a signal reaches it as the kubelet's does."""
    name = f"llm-energy-test-{uuid.uuid4().hex[:12]}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            image.podman.run_args(image.tag, "run", *args, extra=("--name", name, *extra)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Container(proc=proc, name=name, log=log)
    finally:
        if proc.poll() is None:
            await asyncio.to_thread(image.podman, "rm", "--force", "--time", "0", name, check=False)
            await asyncio.to_thread(proc.wait, 30)


async def _started(container: Container, mport: int) -> None:
    """Wait for /healthz; a container that exited says why (its log)."""
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", timeout_s=60)
    except TimeoutError:
        raise AssertionError(container.log.read_text()[-3000:]) from None
    assert container.proc.poll() is None, container.log.read_text()[-3000:]


def _listen(port: int, mport: int) -> tuple[str, ...]:
    return ("--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}")


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


async def _metrics_when(
    session: aiohttp.ClientSession, url: str, done: Callable[[str], bool], timeout_s: float = 15
) -> str:
    """Scrape ``url`` until ``done`` holds (finished requests are booked asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        async with session.get(url) as r:
            assert r.status == 200
            text = await r.text()
        if done(text) or asyncio.get_running_loop().time() > deadline:
            return text
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- what it is


def test_size_over_base_within_goal(image: Built) -> None:
    """The image adds at most 60 MiB to its base (the figure is printed with the build)."""
    assert image.size_over_base_bytes <= SIZE_GOAL_MIB * MiB, image.size_over_base_bytes / MiB


def test_config_matches_the_manifests_and_the_package(image: Built) -> None:
    """Numeric non-root USER, exec-form ENTRYPOINT/CMD, default ports, OCI labels from pyproject."""
    (doc,) = json.loads(image.podman("image", "inspect", image.tag).stdout)
    config = doc["Config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["llm-energy-sidecar"]
    assert config["Cmd"] == ["run"]
    defaults = Settings.model_fields
    ports = {split_host_port(str(defaults[f].default))[1] for f in ("listen", "metrics_listen")}
    assert {int(p.split("/")[0]) for p in config["ExposedPorts"]} == ports
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # the root is read-only
    assert env["PYTHONUNBUFFERED"] == "1"  # logs reach the kubelet as they are written
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.base.name"] == BASE_IMAGE


def test_hardened_run_is_non_root_without_capabilities(image: Built) -> None:
    """Run hardened: uid/gid 65532, no capabilities, no_new_privs, only /tmp writable."""
    found = _inside(
        image,
        "import json, os\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines()"
        " if ':\\t' in l)\n"
        "def writable(p):\n"
        "    try:\n"
        "        open(p, 'w').close(); return True\n"
        "    except OSError:\n"
        "        return False\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(),"
        " 'cap_eff': status['CapEff'].strip(), 'cap_bnd': status['CapBnd'].strip(),"
        " 'no_new_privs': status['NoNewPrivs'].strip(),"
        f" 'writable': [p for p in ('/tmp/x', '/x', '{VENV}/x', '/run/x') if writable(p)]}}))",
    )
    assert found == {
        "uid": 65532,
        "gid": 65532,
        "cap_eff": "0000000000000000",
        "cap_bnd": "0000000000000000",
        "no_new_privs": "1",
        "writable": ["/tmp/x"],
    }


LIST_FILES = """
import json, os
skip = {'/proc', '/sys', '/dev', '/run', '/tmp', '/var/tmp'}
paths = []
for root, dirs, files in os.walk('/'):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
    paths += [os.path.join(root, n) for n in dirs + files]
print(json.dumps(paths))
"""

FIND_TOOLS = f"""
import importlib.metadata, importlib.util, json, shutil, sys
print(json.dumps({{
    'compilers': [t for t in {COMPILERS!r} if shutil.which(t)],
    'modules': [m for m in {BUILD_MODULES!r} if importlib.util.find_spec(m)],
    'distributions': sorted(d.metadata['Name'].lower() for d in importlib.metadata.distributions()),
    'prefix': sys.prefix,
}}))
"""


def test_no_compiler_build_backend_or_source_tree(
    image: Built, request: pytest.FixtureRequest
) -> None:
    """From inside: no compiler, no pip/setuptools/wheel/hatchling/build, nothing but the venv added."""
    found = _inside(image, FIND_TOOLS)
    assert isinstance(found, dict)
    assert found["prefix"] == VENV, "`python` on PATH must be the image's environment"
    assert found["compilers"] == [], found["compilers"]
    assert found["modules"] == [], found["modules"]
    assert "llm-energy-sidecar" in found["distributions"]
    # The base's own interpreter keeps what the base ships: reported, not the image's doing.
    base_tools = _inside(image, FIND_TOOLS, python="/usr/local/bin/python")
    assert isinstance(base_tools, dict)

    in_base = _inside(image, LIST_FILES, python="/usr/local/bin/python", tag=BASE_IMAGE)
    in_image = _inside(image, LIST_FILES)
    assert isinstance(in_base, list)
    assert isinstance(in_image, list)
    added = sorted(set(in_image) - set(in_base))
    outside = [p for p in added if p != VENV and not p.startswith(VENV + "/")]
    assert outside == [], outside[:20]
    leftovers = [
        p
        for p in added
        if p.endswith((".whl", "/pyproject.toml", "/setup.py")) or "/site-packages/tests/" in p
    ]
    assert leftovers == [], leftovers[:20]
    report(
        request.config,
        "image: in-image check: compilers on PATH none; build modules in the image's Python none; "
        f"{len(added)} paths added, all under {VENV}; {len(found['distributions'])} distributions "
        f"installed; the base's own interpreter keeps {base_tools['modules'] or 'nothing'}",
    )


def test_build_context_is_only_what_the_builder_copies(image: Built, tmp_path: Path) -> None:
    """.dockerignore leaves exactly pyproject.toml, README.md and sidecar/ (no bytecode) in the context."""
    probe = tmp_path / "Containerfile"
    probe.write_text(
        f"FROM {BASE_IMAGE}\nCOPY . /ctx\n"
        "RUN echo CONTEXT-BEGIN && cd /ctx && find . -type f | sort && echo CONTEXT-END\n"
    )
    tag = f"localhost/llm-energy-context-probe:{uuid.uuid4().hex[:8]}"
    try:
        out = image.podman(
            "build", "--isolation", "chroot", "--no-cache", "-f", str(probe), "-t", tag, str(ROOT)
        ).stdout
    finally:
        image.podman("rmi", "--force", tag, check=False)
    listed = out.split("CONTEXT-BEGIN\n", 1)[1].split("CONTEXT-END", 1)[0].split()
    context = {p.removeprefix("./") for p in listed}
    expected = {"pyproject.toml", "README.md"} | {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "sidecar").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo", ".pyd")
    }
    assert context == expected, (sorted(context - expected)[:20], sorted(expected - context)[:20])


# --------------------------------------------------------------------------- what it does


def test_help_answers(image: Built) -> None:
    """`--help` prints the usage and exits 0, as the image's entrypoint."""
    done = image.podman.run(image.tag, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: llm-energy-sidecar")
    assert "run" in done.stdout


def test_bad_flag_exits_2_with_one_line(image: Built) -> None:
    """A bad flag value: exit 2 and one line on stderr that names the flag, no traceback."""
    done = image.podman.run(
        image.tag, "run", "--upstream", "http://127.0.0.1:1", "--sample-hz", "0"
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "--sample-hz" in lines[0]


def test_report_extra_is_left_out_and_report_says_how_to_get_it(image: Built) -> None:
    """The default image has no matplotlib; `report` then exits 2 with one line naming the extra."""
    found = _inside(image, FIND_TOOLS)
    assert isinstance(found, dict)
    assert "matplotlib" not in found["distributions"]
    done = image.podman.run(image.tag, "report", "--trace", "/tmp", "--out", "/tmp/report")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "llm-energy-sidecar[report]" in lines[0]


async def test_proxies_a_stream_byte_for_byte_and_counts_it(
    image: Built, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """In front of a model server: the stream arrives unchanged, is counted, and every endpoint answers."""
    upstream = await aiohttp_server(create_upstream())
    port, mport = free_port(), free_port()
    args = ("--power-source", "simulated", "--upstream", str(upstream.make_url("/")))
    log = tmp_path / "container.log"
    body = {
        "model": "image-test",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 9,
        "stream_options": {"include_usage": True},
    }
    async with running(image, *args, *_listen(port, mport), log=log) as container:
        await _started(container, mport)
        async with aiohttp.ClientSession() as session:
            async with session.post(upstream.make_url("/v1/chat/completions"), json=body) as r:
                direct = await r.read()
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                proxied = await r.read()
            for path in ("/healthz", "/readyz"):
                async with session.get(f"http://127.0.0.1:{mport}{path}") as r:
                    assert r.status == 200, path

            def counted(text: str) -> bool:
                return any(
                    v == 1 and lab.get("model") == "image-test"
                    for lab, v in _samples(text, "llm_energy_requests_total")
                )

            text = await _metrics_when(session, f"http://127.0.0.1:{mport}/metrics", counted)
    assert proxied == direct
    assert proxied.endswith(b"data: [DONE]\n\n")
    requests = _samples(text, "llm_energy_requests_total")
    assert ({"model": "image-test", "endpoint": "chat", "status": "ok"}, 1.0) in requests, requests
    tokens = {
        lab["kind"]: v
        for lab, v in _samples(text, "llm_energy_tokens_total")
        if lab.get("model") == "image-test"
    }
    assert tokens == {"prompt": 11.0, "completion": 9.0}
    (info,) = _samples(text, "llm_energy_build_info")
    assert info[0]["power_source"] == "simulated"
    assert info[0]["mode"] == "proxy"


async def test_sigterm_drains_a_stream_and_records_onto_a_volume(
    image: Built, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """SIGTERM mid-stream: the stream finishes, the exit is 0 within the grace period, records land."""
    upstream = await aiohttp_server(create_upstream())
    port, mport = free_port(), free_port()
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)  # written by uid 65532, like an emptyDir
    grace_s = 20
    args = (
        "--power-source",
        "simulated",
        "--upstream",
        str(upstream.make_url("/")),
        "--record",
        "/data/rec",
        "--grace-period",
        str(grace_s),
        "--sample-hz",
        "20",
    )
    log = tmp_path / "container.log"
    async with running(
        image, *args, *_listen(port, mport), log=log, extra=("--volume", f"{data}:/data")
    ) as container:
        await _started(container, mport)
        body = {
            "model": "slow",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "max_tokens": 40,
            "delay": 0.05,
        }
        async with aiohttp.ClientSession() as session:
            quick = {"model": "quick", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=quick
            ) as r:
                assert r.status == 200
                await r.read()
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                first = await r.content.readany()
                # Off the loop: the stand-in upstream serving the stream runs on it.
                await asyncio.to_thread(image.podman, "kill", "--signal", "TERM", container.name)
                rest = await r.read()
        stream = first + rest
        assert stream.endswith(b"data: [DONE]\n\n")
        assert stream.count(b"data: ") == 40 + 1
        # The kubelet would SIGKILL after the grace period: the exit must come before.
        code = await asyncio.to_thread(container.proc.wait, grace_s)
        assert code == 0, log.read_text()[-3000:]
    power = (data / "rec" / "power.csv").read_text().splitlines()
    requests = (data / "rec" / "requests.csv").read_text().splitlines()
    assert power[0] == "time_s,gpu,power_w,energy_j"
    assert len(power) > 1
    assert len(requests) == 1 + 2, requests
    assert any(",slow," in line for line in requests)


def test_every_dependency_has_an_arm64_wheel(tmp_path: Path) -> None:
    """The builder's `--only-binary=:all:` install resolves for linux/arm64 (GH200/GB200) too.

    No arm64 build runs here (no emulation on these machines); what could break one is a
    dependency without an aarch64 wheel, so resolve the package's dependencies for that
    platform as pip inside an arm64 build would (bookworm's glibc 2.36, CPython 3.11).
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    platforms = [a for m in range(17, 37) for a in ("--platform", f"manylinux_2_{m}_aarch64")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            *platforms,
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            "--dest",
            str(tmp_path),
            *project["dependencies"],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = [p.name for p in tmp_path.glob("*.whl")]
    native = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert native, wheels  # aiohttp, pydantic-core and yaml are compiled: arm64 builds of them
    assert all("aarch64" in w for w in native), native
