"""The Dockerfile: its final image is slim, non-root and runs the sidecar; its install path works.

No container engine runs on these machines, so the install is proven by replay: the
test reads the builder's wheel build and the final stage's ARG, ENV, COPY and RUN lines
from the Dockerfile itself and performs them on this machine, then starts the installed
command and scrapes its ``/metrics``.

What the replay changes, and nothing else:

* every ARG or ENV of the final stage whose value is an absolute path (the virtual
  environment, the wheelhouse) points at a temporary directory instead;
* the builder's ``--outdir`` points at a temporary directory, and the final stage's
  ``COPY --from=builder`` reads from there;
* ``python`` is this test's Python 3.11 (the base image's interpreter), placed first on
  ``PATH``; the RUN lines run with ``/bin/sh -c`` as Docker's shell form does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from procs import ROOT, free_port, wait_http
from prometheus_client.parser import text_string_to_metric_families
from upstreams import create_upstream

from sidecar.config import Settings, split_host_port

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case) and its text after the keyword."""

    keyword: str
    value: str


@dataclass(slots=True)
class Stage:
    """One ``FROM`` stage: base image, optional ``AS`` name and its instructions in order."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.value for i in self.instructions if i.keyword == keyword]


def logical_lines(text: str) -> Iterator[str]:
    """Instructions as single lines: comments dropped, backslash continuations joined."""
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # Docker drops comment lines, also inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield (pending + stripped).strip()
        pending = ""
    if pending.strip():
        yield pending.strip()


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = value.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before FROM, got {line!r}"
            key, _, default = value.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value))
    return global_args, stages


def expand(value: str, variables: Mapping[str, str]) -> str:
    """Docker's ``$VAR`` / ``${VAR}`` substitution (unset variables become empty)."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), ""),
        value,
    )


def parse_env(value: str) -> list[tuple[str, str]]:
    """``ENV a=1 b="two words"`` (or the legacy ``ENV a 1``) as ordered pairs."""
    if "=" not in value.split(maxsplit=1)[0]:
        key, _, rest = value.partition(" ")
        return [(key, rest.strip())]
    return [(key, val) for key, _, val in (w.partition("=") for w in shlex.split(value))]


def parse_json_list(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"expected the exec (JSON) form, got {value!r}"
    return [str(v) for v in parsed]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def builder(stages: list[Stage], final: Stage) -> Stage:
    (source,) = {
        flag.split("=", 1)[1]
        for copy in final.all("COPY")
        for flag in copy.split()
        if flag.startswith("--from=")
    }
    return next(s for s in stages if s.name == source)


# --------------------------------------------------------------------------- static checks


class TestFinalImage:
    """What the final stage declares about how the image runs."""

    def test_multi_stage_on_slim_python(self, stages: list[Stage], final: Stage) -> None:
        """Two or more stages; the final one is python:3.11-slim (through the global ARG)."""
        global_args, _ = parse_dockerfile(DOCKERFILE.read_text())
        assert len(stages) >= 2
        assert expand(final.base, global_args) == "python:3.11-slim"

    def test_runs_as_numeric_non_root_user(self, final: Stage) -> None:
        """USER is a numeric uid (and gid) other than 0, so runAsNonRoot can verify it."""
        user = final.all("USER")[-1]
        uid, _, gid = user.partition(":")
        assert uid.isdigit(), user
        assert int(uid) != 0, user
        assert not gid or (gid.isdigit() and int(gid) != 0), user

    def test_entrypoint_is_the_command_and_cmd_is_run(self, final: Stage) -> None:
        """ENTRYPOINT and CMD use the exec form: the console script, then `run`."""
        assert parse_json_list(final.all("ENTRYPOINT")[-1]) == ["llm-energy-sidecar"]
        assert parse_json_list(final.all("CMD")[-1]) == ["run"]

    def test_exposes_the_default_proxy_and_metrics_ports(self, final: Stage) -> None:
        """EXPOSE lists exactly the ports of the `--listen` and `--metrics-listen` defaults."""
        exposed = {int(p.split("/")[0]) for value in final.all("EXPOSE") for p in value.split()}
        defaults = Settings.model_fields
        listen = split_host_port(str(defaults["listen"].default))[1]
        metrics = split_host_port(str(defaults["metrics_listen"].default))[1]
        assert exposed == {listen, metrics}

    def test_no_compiler_or_build_tooling_in_the_final_stage(self, final: Stage) -> None:
        """The final stage installs no compiler, no apt packages and builds no wheel itself."""
        text = " ".join(final.all("RUN")).lower()
        for banned in ("gcc", "g++", "build-essential", "apt-get", "apk add", "-m build"):
            assert banned not in text, banned
        assert "--only-binary=:all:" in text, "pip must never fall back to compiling an sdist"

    def test_oci_labels_carry_the_package_version(self, final: Stage) -> None:
        """The OCI title, licence and version labels match pyproject.toml."""
        labels = dict(pair for value in final.all("LABEL") for pair in parse_env(value))
        args = {k: d for k, _, d in (a.partition("=") for a in final.all("ARG"))}
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert labels["org.opencontainers.image.title"] == project["name"]
        assert labels["org.opencontainers.image.licenses"] == project["license"]
        assert expand(labels["org.opencontainers.image.version"], args) == project["version"]
        assert labels["org.opencontainers.image.description"]

    def test_python_writes_no_bytecode_and_does_not_buffer(self, final: Stage) -> None:
        """PYTHONDONTWRITEBYTECODE (read-only root) and PYTHONUNBUFFERED (logs) are set."""
        env = dict(pair for value in final.all("ENV") for pair in parse_env(value))
        assert env["PYTHONDONTWRITEBYTECODE"] == "1"
        assert env["PYTHONUNBUFFERED"] == "1"


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for token in re.split(r"(\*\*/?|\*|\?|\[[^\]]*\])", pattern.strip("/")):
            if token.startswith("[") and token.endswith("]"):
                out += token  # a character class means the same in Go's filepath.Match
            elif token.startswith("**"):
                out += "(.*/)?" if token.endswith("/") else ".*"
            elif token == "*":
                out += "[^/]*"
            elif token == "?":
                out += "[^/]"
            else:
                out += re.escape(token)
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


class TestDockerignore:
    """The build context holds what the builder copies and nothing else worth hiding."""

    def test_builder_sources_are_in_the_context(self, builder: Stage) -> None:
        """Every file the builder COPYs from the context survives .dockerignore."""
        patterns = [
            line.strip()
            for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        sources = [
            src
            for copy in builder.all("COPY")
            if "--from=" not in copy
            for src in copy.split()[:-1]
        ]
        assert sources
        for src in sources:
            path = (ROOT / src).resolve()
            files = [path] if path.is_file() else list(path.rglob("*.py"))
            assert files, src
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not _dockerignore_excludes(patterns, rel), rel

    @pytest.mark.parametrize(
        "path",
        [
            ".venv/bin/python",
            ".git/HEAD",
            "tests/test_ledger.py",
            "sidecar/__pycache__/app.cpython-311.pyc",
            "sidecar/stray.pyc",
        ],
    )
    def test_local_state_stays_out(self, path: str) -> None:
        """Virtual environments, VCS data, tests and bytecode are not sent to the builder."""
        patterns = [
            line.strip()
            for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert _dockerignore_excludes(patterns, path)


# --------------------------------------------------------------------------- the replay


@dataclass(frozen=True, slots=True)
class Installed:
    """The replayed image: its environment and the resolved ENTRYPOINT + CMD."""

    env: dict[str, str]
    command: list[str]
    venv: Path


def _run(command: str, *, env: Mapping[str, str], cwd: Path, timeout_s: float) -> None:
    done = subprocess.run(
        ["/bin/sh", "-c", command],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, (
        f"{command!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, builder: Stage, final: Stage) -> Installed:
    """Build the wheel as the builder does, then perform the final stage's install steps."""
    work = tmp_path_factory.mktemp("image")
    shim = work / "bin"
    shim.mkdir()
    # A wrapper, not a symlink: this interpreter's venv (where `build` lives) must apply.
    (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (shim / "python").chmod(0o755)
    host = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_ENERGY_", "PYTHON")) and k != "VIRTUAL_ENV"
    }
    host["PATH"] = f"{shim}{os.pathsep}{host.get('PATH', '')}"

    # Builder: its wheel build, with --outdir pointed at a temporary directory.
    (build,) = [run for run in builder.all("RUN") if "build --wheel" in run]
    words = shlex.split(build)
    image_dist = words[words.index("--outdir") + 1]
    dist = work / "dist"
    words[words.index("--outdir") + 1] = str(dist)
    _run(shlex.join(words), env=host, cwd=ROOT, timeout_s=180)
    assert list(dist.glob("*.whl")), "the builder made no wheel"

    # Final stage: ARG and ENV in order (absolute paths moved under `work`), COPY, RUN.
    variables = dict(host)
    for instruction in final.instructions:
        if instruction.keyword in ("ARG", "ENV"):
            pairs = (
                [tuple(instruction.value.partition("=")[::2])]
                if instruction.keyword == "ARG"
                else parse_env(instruction.value)
            )
            for key, raw in pairs:
                value = expand(raw, variables)
                if value.startswith("/") and key != "PATH":
                    value = str(work / key.lower())
                variables[key] = value
        elif instruction.keyword == "COPY":
            *flags_and_src, dest = shlex.split(instruction.value)
            (src,) = [w for w in flags_and_src if not w.startswith("--")]
            assert Path(src).as_posix().rstrip("/") == image_dist.rstrip("/"), (
                "the final stage should copy the builder's wheel directory"
            )
            shutil.copytree(dist, expand(dest, variables).rstrip("/"), dirs_exist_ok=True)
        elif instruction.keyword == "RUN":
            _run(instruction.value, env=variables, cwd=work, timeout_s=300)

    entrypoint = parse_json_list(final.all("ENTRYPOINT")[-1])
    cmd = parse_json_list(final.all("CMD")[-1])
    resolved = shutil.which(entrypoint[0], path=variables["PATH"])
    assert resolved is not None, f"{entrypoint[0]} is not on the image's PATH"
    venv = Path(variables["VIRTUAL_ENV"])
    return Installed(env=variables, command=[resolved, *entrypoint[1:], *cmd], venv=venv)


@pytest.mark.integration
def test_install_puts_the_wheel_in_the_image_venv(installed: Installed) -> None:
    """ENTRYPOINT resolves to the image's venv, whose `sidecar` is the wheel, not this checkout."""
    assert Path(installed.command[0]).is_relative_to(installed.venv)
    where = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", "import sidecar; print(sidecar.__file__)"],
        env=installed.env,
        cwd=installed.venv,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.venv), where
    assert not (installed.venv.parent / "wheelhouse").exists(), "the wheelhouse is removed"


@pytest.mark.integration
async def test_installed_command_serves_metrics(
    installed: Installed, aiohttp_server: ServerFactory
) -> None:
    """The installed `llm-energy-sidecar run` proxies a request and exports its build info."""
    upstream = await aiohttp_server(create_upstream())
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *installed.command,
            "--power-source",
            "simulated",
            "--upstream",
            str(upstream.make_url("/")),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{mport}",
        ],
        env=installed.env,
        cwd=installed.venv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_http(f"http://127.0.0.1:{mport}/healthz", timeout_s=30, proc=proc)
        async with aiohttp.ClientSession() as session:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
            async with session.get(f"http://127.0.0.1:{mport}/readyz") as r:
                assert r.status == 200
            async with session.get(f"http://127.0.0.1:{mport}/metrics") as r:
                assert r.status == 200
                text = await r.text()
        samples = {
            s.name: s
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "llm_energy_build_info"
        }
        info = samples["llm_energy_build_info"]
        assert info.value == 1
        assert info.labels["power_source"] == "simulated"
        assert info.labels["mode"] == "proxy"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
