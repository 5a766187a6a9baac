"""The one validated, frozen settings object, built once in ``main``.

Sources, strongest first: command-line flags, ``LLM_ENERGY_*`` environment
variables, then the ``--config`` YAML file (snake_case keys). pydantic-settings
does the merging and validation; :func:`load_settings` turns the first error
into one line naming the flag, as users of a CLI expect. Credentials come from
the environment only (:class:`Credentials`), never from flags or files.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "LLM_ENERGY_"
CarbonProvider = Literal["static", "electricitymaps", "watttime", "uk"]
LogLevel = Literal["debug", "info", "warning", "error"]
DataPlane = Literal["aiohttp", "relay"]
"""How the proxy moves bytes: aiohttp's server and client, or the relay (sidecar/relay)."""

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "config_file", default=None
)


class SettingsError(Exception):
    """A bad setting: the message is one line that names the flag."""


def _split(value: Any) -> Any:
    """A comma list from a flag or env, or a YAML list or scalar (``gpus: [0, 1]``)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, int | float):
        value = [value]
    if isinstance(value, list | tuple):
        # YAML gives ints for GPU indices; floats stay floats for --idle-watts
        return [v if isinstance(v, float) else str(v) for v in value]
    return value


def _host_port(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    _host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


def _gpu_list(value: Any) -> Any:
    """``--gpus`` checked before NVML starts: indices, UUIDs or MIG ids, no gaps, no repeats."""
    from sidecar.power.visibility import parse_gpu_list

    if isinstance(value, int):
        value = [value]
    if isinstance(value, list | tuple):  # YAML: gpus: [0, 1] or ["GPU-…"]; () the default
        if not value:
            return ()
        value = ",".join(str(v) for v in value)
    if isinstance(value, str):
        return parse_gpu_list(value)
    return value


HostPort = Annotated[str, BeforeValidator(_host_port)]
GpuList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_gpu_list)]
CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split)]
FloatList = Annotated[tuple[float, ...], NoDecode, BeforeValidator(_split)]


def split_host_port(value: str) -> tuple[str, int]:
    """``"0.0.0.0:9400"`` to ``("0.0.0.0", 9400)``; ``[::1]:80`` keeps its brackets off."""
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Settings(BaseSettings):
    """Every flag of ``run`` (CONTRACT.md); see the README's CLI reference."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    upstream: AnyHttpUrl | None = None
    listen: HostPort = "0.0.0.0:8080"
    metrics_listen: HostPort = "0.0.0.0:9400"
    observe: AnyHttpUrl | None = None
    power_source: str = "nvml"
    gpus: GpuList = ()
    sample_hz: float = Field(10.0, gt=0, le=100)
    idle_watts: FloatList = ()
    gpu_share: float | None = None
    """The fraction of each metered board's power this pod books (MIG, time-slicing)."""
    region: str | None = None
    carbon_provider: CarbonProvider = "static"
    carbon_intensity: float | None = Field(None, ge=0, le=5000)
    carbon_api_url: AnyHttpUrl | None = None
    carbon_refresh: float = Field(300.0, gt=0)
    emissions_budget: float | None = Field(None, gt=0)
    pue: float = Field(1.0, ge=1.0, le=5.0)
    model: str = Field("default", min_length=1, max_length=128)
    record: Path | None = None
    max_models: int = Field(20, ge=1, le=1000)
    carbon_zone: str | None = None
    gpu_embodied_kg: float | None = Field(None, ge=0)
    host_embodied_kg: float | None = Field(None, ge=0)
    lifetime_years: float | None = Field(None, gt=0)
    inject_usage: bool = True
    energy_receipts: bool = False
    data_plane: DataPlane = "relay"
    otlp_listen: HostPort | None = None
    """Traces mode: where the OTLP/HTTP receiver (``POST /v1/traces``) listens."""
    otlp_forward: AnyHttpUrl | None = None
    """The user's collector: every export received is sent on to it unchanged."""
    otlp_energy_spans: bool = False
    tenant_header: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
    )
    tenant_from_api_key: bool = False
    max_tenants: int = Field(50, ge=1, le=10000)
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_read_timeout: float = Field(600.0, gt=0)
    proxy_hold: float = Field(0.0, ge=0, le=900)
    """Proxy mode: seconds each interval waits before its energy is shared, so the usage
    at a stream's end (the exact prompt) is in when its prefill is placed."""
    grace_period: float = Field(30.0, ge=0)
    log_level: LogLevel = "info"

    @field_validator("power_source")
    @classmethod
    def _power_source(cls, value: str) -> str:
        kind, _, arg = value.partition(":")
        if kind in ("nvml", "simulated") and not arg:
            return value
        if kind == "replay" and arg:
            if not Path(arg).is_file():
                raise ValueError(f"replay file {arg!r} does not exist")
            return value
        if kind == "dcgm" and arg.startswith(("http://", "https://")):
            return value
        raise ValueError("expected nvml, simulated, dcgm:URL or replay:PATH")

    @field_validator("gpu_share")
    @classmethod
    def _fraction(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError("give the fraction in (0, 1] of each board this pod books")
        return value

    @field_validator("idle_watts")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 for v in value):
            raise ValueError("watts cannot be negative")
        return value

    @model_validator(mode="after")
    def _idle_watts_per_gpu(self) -> Settings:
        if self.gpus and len(self.idle_watts) > 1 and len(self.idle_watts) != len(self.gpus):
            raise ValueError(
                f"--idle-watts: {len(self.idle_watts)} values for {len(self.gpus)} GPU(s) "
                "in --gpus (give one total or one value per GPU, in --gpus order)"
            )
        return self

    @model_validator(mode="after")
    def _a_mode(self) -> Settings:
        if self.upstream is None and self.observe is None and self.otlp_listen is None:
            raise ValueError(
                "give --upstream URL (proxy mode), --observe URL (observer mode) "
                "or --otlp-listen HOST:PORT (traces mode), or several"
            )
        return self

    @model_validator(mode="after")
    def _otlp_together(self) -> Settings:
        if self.otlp_forward is not None and self.otlp_listen is None:
            raise ValueError("--otlp-forward: needs --otlp-listen (there is nothing to forward)")
        if self.otlp_energy_spans and self.otlp_forward is None:
            raise ValueError("--otlp-energy-spans: needs --otlp-forward URL to send them to")
        return self

    @model_validator(mode="after")
    def _proxy_hold_with_proxy(self) -> Settings:
        if self.proxy_hold and (self.upstream is None or self.otlp_listen is not None):
            raise ValueError(
                "--proxy-hold: needs --upstream URL and no --otlp-listen "
                "(traces mode holds for the server's spans itself)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @classmethod
    def without_env(cls, **values: Any) -> Settings:
        """Settings from the given values and defaults only (``demo`` reads no environment)."""
        return _ExplicitSettings(**values)

    @property
    def mode(self) -> str:
        """The active request sources joined by ``+`` in the order proxy, observer, traces."""
        on = (
            ("proxy", self.upstream is not None),
            ("observer", self.observe is not None),
            ("traces", self.otlp_listen is not None),
        )
        return "+".join(name for name, active in on if active)


class _ExplicitSettings(Settings):
    """The same fields and checks, fed only by the values given: no environment, no file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class Credentials(BaseModel):
    """Secrets for live carbon providers: environment only, never logged."""

    model_config = {"frozen": True}

    carbon_api_token: SecretStr | None = None
    watttime_user: str | None = None
    watttime_password: SecretStr | None = None
    tenant_salt: SecretStr | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Credentials:
        def get(name: str) -> str | None:
            return env.get(ENV_PREFIX + name.upper()) or None

        return cls.model_validate(
            {
                k: get(k)
                for k in ("carbon_api_token", "watttime_user", "watttime_password", "tenant_salt")
            }
        )


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    msg = str(first["msg"]).removeprefix("Value error, ")
    if not loc:
        return msg
    field = loc[0]
    if first["type"] == "extra_forbidden":
        return f"unknown setting {field!r} in the config file"
    value = first.get("input")
    shown = (
        f" (got {value!r})"
        if isinstance(value, str | int | float) and len(repr(value)) < 80
        else ""
    )
    return f"{_flag(field)}: {msg}{shown}"


def load_settings(flags: Mapping[str, Any], config_file: Path | None = None) -> Settings:
    """Merge flags, environment and file into one validated :class:`Settings`."""
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"--config: {str(config_file)!r} is not a readable file")
    token = _config_file.set(config_file)
    try:
        return Settings(**flags)
    except ValidationError as e:
        raise SettingsError(_describe(e)) from None
    except (ValueError, OSError) as e:  # a YAML file that does not parse
        raise SettingsError(f"--config: {e}".splitlines()[0]) from None
    finally:
        _config_file.reset(token)
