"""Settings: flags over env over file, and one-line errors that name the flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import Credentials, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LLM_ENERGY_"):
            monkeypatch.delenv(key)


def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag wins over LLM_ENERGY_*, which wins over the YAML file."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        "upstream: http://file:1\nsample_hz: 11\npue: 1.2\nmetrics_listen: 127.0.0.1:9999\n"
    )
    monkeypatch.setenv("LLM_ENERGY_SAMPLE_HZ", "22")
    monkeypatch.setenv("LLM_ENERGY_PUE", "1.3")
    s = load_settings({"pue": "1.4"}, cfg)
    assert (s.sample_hz, s.pue, s.metrics_listen) == (22.0, 1.4, "127.0.0.1:9999")
    assert str(s.upstream) == "http://file:1/"


def test_lists_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """Comma lists parse the same from env and flags."""
    monkeypatch.setenv("LLM_ENERGY_GPUS", "GPU-a, GPU-b")
    s = load_settings({"upstream": "http://x", "idle_watts": "60,70"})
    assert s.gpus == ("GPU-a", "GPU-b")
    assert s.idle_watts == (60.0, 70.0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "give --upstream URL"),
        ({"upstream": "http://x", "sample_hz": "500"}, "--sample-hz:"),
        ({"upstream": "not a url"}, "--upstream:"),
        ({"upstream": "http://x", "power_source": "tpu"}, "--power-source: expected nvml"),
        ({"upstream": "http://x", "listen": "8080"}, "--listen: '8080' is not HOST:PORT"),
        ({"upstream": "http://x", "pue": "0.5"}, "--pue:"),
        ({"upstream": "http://x", "carbon_provider": "magic"}, "--carbon-provider:"),
        ({"upstream": "http://x", "idle_watts": "a,b"}, "--idle-watts:"),
        ({"upstream": "http://x", "proxy_hold": "-1"}, "--proxy-hold:"),
        ({"observe": "http://x", "proxy_hold": "30"}, "--proxy-hold: needs --upstream"),
        (
            {"upstream": "http://x", "otlp_listen": "127.0.0.1:4318", "proxy_hold": "30"},
            "--proxy-hold: needs --upstream URL and no --otlp-listen",
        ),
    ],
)
def test_bad_values_name_the_flag(flags: dict[str, str], message: str) -> None:
    """Each bad value becomes one line starting with the flag's name."""
    with pytest.raises(SettingsError) as exc:
        load_settings(flags)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_file_key_is_named(tmp_path: Path) -> None:
    """A typo in the YAML file is refused with the key's name."""
    cfg = tmp_path / "c.yml"
    cfg.write_text("upstream: http://x\nsampel_hz: 3\n")
    with pytest.raises(SettingsError, match="sampel_hz"):
        load_settings({}, cfg)


def test_credentials_only_from_env() -> None:
    """Secrets come from LLM_ENERGY_* variables and never print their value."""
    creds = Credentials.from_env(
        {"LLM_ENERGY_CARBON_API_TOKEN": "s3cret", "LLM_ENERGY_WATTTIME_USER": "u"}
    )
    assert creds.carbon_api_token is not None
    assert creds.carbon_api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(creds)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"gpus": "0,,1"}, "--gpus: empty entry"),
        ({"gpus": "0,"}, "--gpus: empty entry"),
        ({"gpus": "0,1,0"}, "--gpus: GPU 0 is listed twice"),
        ({"gpus": "gpu0"}, "--gpus: 'gpu0' is not a GPU index"),
        ({"gpus": ""}, "--gpus: empty GPU list"),
        ({"gpu_share": "0"}, "--gpu-share:"),
        ({"gpu_share": "1.5"}, "--gpu-share:"),
        ({"gpus": "0,1", "idle_watts": "60,70,80"}, "--idle-watts: 3 values for 2 GPU(s)"),
        ({"gpu_share": "nan"}, "--gpu-share: give the fraction"),
    ],
)
def test_gpu_settings_checked_before_nvml(flags: dict[str, str], message: str) -> None:
    """--gpus, --gpu-share and a per-GPU --idle-watts are refused at parse time, naming the flag."""
    with pytest.raises(SettingsError) as exc:
        load_settings({"upstream": "http://x", **flags})
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_gpu_share_and_gpus_from_env_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpu_share reads LLM_ENERGY_GPU_SHARE and YAML; a YAML list of indices is a GPU list."""
    cfg = tmp_path / "c.yml"
    cfg.write_text("upstream: http://x\ngpus: [0, 1]\ngpu_share: 0.25\nidle_watts: [60, 70]\n")
    s = load_settings({}, cfg)
    assert (s.gpus, s.gpu_share, s.idle_watts) == (("0", "1"), 0.25, (60.0, 70.0))
    monkeypatch.setenv("LLM_ENERGY_GPU_SHARE", "0.5")
    assert load_settings({}, cfg).gpu_share == 0.5


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [("--sample-hz", "0", "--sample-hz"), ("--gpus", "0,,1", "--gpus: empty entry")],
)
def test_run_with_bad_flag_exits_2_with_one_line(flag: str, value: str, says: str) -> None:
    """`run` with a bad flag value exits 2 with one line on stderr naming the flag (for
    --gpus, before NVML is reached)."""
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--upstream", "http://127.0.0.1:1", flag, value],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert says in line


class TestStartupFailures:
    async def test_idle_watts_count_against_the_gpus_found(self, tmp_path: Path) -> None:
        """Without --gpus the count is checked once the GPUs are known, still naming --idle-watts."""
        from sidecar.app import StartupError, _started
        from sidecar.config import Settings

        power = tmp_path / "p.csv"
        power.write_text("time_s,gpu,power_w\n1,0,100\n1,1,100\n2,0,100\n2,1,100\n")
        settings = Settings.without_env(
            upstream="http://127.0.0.1:9", power_source=f"replay:{power}", idle_watts=(1, 2, 3)
        )
        with pytest.raises(StartupError, match=r"^--idle-watts: 3 values for 2 GPUs"):
            await _started(settings)

    async def test_port_in_use_names_the_listen_flag(self) -> None:
        """A metrics port already taken is a start-up error naming --metrics-listen."""
        import socket

        from sidecar.app import StartupError, serve
        from sidecar.config import Settings

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            settings = Settings.without_env(
                upstream="http://127.0.0.1:9",
                power_source="simulated",
                metrics_listen=f"127.0.0.1:{port}",
            )
            with pytest.raises(StartupError, match=r"^--metrics-listen: cannot listen"):
                await serve(settings)

    def test_a_crash_after_start_is_not_a_bad_flag(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An error raised once serving propagates as itself: no exit 2, no 'bad flag' line."""
        import sidecar.app
        from sidecar.cli import main

        async def crash(settings: object) -> int:
            raise OSError("disk full while serving")

        monkeypatch.setattr(sidecar.app, "serve", crash)
        with pytest.raises(OSError, match="disk full"):
            main(["run", "--upstream", "http://127.0.0.1:9"])
