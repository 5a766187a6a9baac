"""Tenant labels for showback, and the proxy's flags: bounded, salted, never the raw key."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from sidecar.cli import build_parser
from sidecar.config import Credentials, SettingsError, load_settings
from sidecar.tracking.tenant import TenantLabels, build_tenants

KEY = "sk-proj-0123456789abcdef"


def run_flags(*argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["run", "--upstream", "http://127.0.0.1:8000", *argv])
    return {k: v for k, v in vars(args).items() if k not in ("handler", "command", "config")}


class TestTenantLabels:
    """From headers to a candidate, and from a candidate to a bounded label."""

    def test_header_taken_when_plain(self) -> None:
        """A short plain token is the label; anything else is `invalid`; no header is `none`."""
        t = TenantLabels(header="X-Tenant", salt=None, max_tenants=5)
        assert t.candidate({"x-tenant": "team.a:1-b_c"}) == "team.a:1-b_c"
        assert t.candidate({"X-Tenant": "a b"}) == "invalid"
        assert t.candidate({"x-tenant": "x" * 65}) == "invalid"
        assert t.candidate({"x-tenant": "é"}) == "invalid"
        assert t.candidate({}) == "none"

    def test_key_digest(self) -> None:
        """The bearer token becomes sha256(salt + token)[:12]; other schemes name no tenant."""
        t = TenantLabels(header=None, salt=b"s4lt", max_tenants=5)
        digest = hashlib.sha256(b"s4lt" + KEY.encode()).hexdigest()[:12]
        assert t.candidate({"Authorization": f"Bearer {KEY}"}) == digest
        assert t.candidate({"authorization": f"bearer  {KEY} "}) == digest
        assert t.candidate({"Authorization": "Basic dXNlcjpwdw=="}) == "none"
        assert KEY not in t.candidate({"Authorization": f"Bearer {KEY}"})

    def test_header_wins_over_key(self) -> None:
        """With both configured, a request's header names it."""
        t = TenantLabels(header="x-tenant", salt=b"s", max_tenants=5)
        assert t.candidate({"x-tenant": "acme", "Authorization": f"Bearer {KEY}"}) == "acme"

    def test_bounded_and_registered_on_success_only(self) -> None:
        """At most max_tenants names, registered by successful requests; the rest `other`."""
        t = TenantLabels(header="x-tenant", salt=None, max_tenants=2)
        assert t.label("a", ok=False) == "other"  # a failure does not register a name
        assert t.label("a", ok=True) == "a"
        assert t.label("a", ok=False) == "a"  # known now: failures book under it too
        assert t.label("b", ok=True) == "b"
        assert t.label("c", ok=True) == "other"
        assert t.label("none", ok=True) == "none"
        assert t.label("invalid", ok=False) == "invalid"
        assert t.known == {"a", "b"}

    def test_salt_required(self) -> None:
        """Keys as tenants without a salt is a one-line error naming the flag."""
        with pytest.raises(ValueError, match=r"^--tenant-from-api-key: .*LLM_ENERGY_TENANT_SALT"):
            build_tenants(header=None, from_api_key=True, salt=None, max_tenants=5)
        assert build_tenants(header=None, from_api_key=False, salt=None, max_tenants=5) is None

    def test_salt_from_the_environment_only(self) -> None:
        """The salt is a credential: read from LLM_ENERGY_TENANT_SALT, hidden in reprs."""
        creds = Credentials.from_env({"LLM_ENERGY_TENANT_SALT": "pepper"})
        assert creds.tenant_salt is not None
        assert creds.tenant_salt.get_secret_value() == "pepper"
        assert "pepper" not in repr(creds)


class TestFlags:
    """The proxy's flags as the CLI reads them."""

    def test_inject_usage_on_by_default_and_off_by_flag(self) -> None:
        """--inject-usage is the default; --no-inject-usage turns it off."""
        assert load_settings(run_flags()).inject_usage is True
        assert load_settings(run_flags("--no-inject-usage")).inject_usage is False
        assert load_settings(run_flags("--inject-usage")).inject_usage is True

    def test_tenant_flags(self) -> None:
        """--tenant-header, --tenant-from-api-key and --max-tenants reach the settings."""
        s = load_settings(
            run_flags(
                "--tenant-header", "x-tenant-id", "--tenant-from-api-key", "--max-tenants", "7"
            )
        )
        assert (s.tenant_header, s.tenant_from_api_key, s.max_tenants) == ("x-tenant-id", True, 7)

    def test_bad_tenant_header_names_the_flag(self) -> None:
        """A header name with spaces is refused in one line naming --tenant-header."""
        with pytest.raises(SettingsError, match=r"^--tenant-header"):
            load_settings(run_flags("--tenant-header", "x tenant"))
