"""Showback: the bounded ``tenant`` label of a request, from its headers.

A tenant is named by a header (``--tenant-header``), taken as given when it
is a short, plain token, or derived from the API key (``--tenant-from-api-key``):
the first 12 hex digits of SHA-256(salt + bearer token), so the label is
stable across restarts and replicas (same salt) but the key cannot be read
back from it. The raw key is hashed and dropped here; it is never returned,
stored or logged. The header wins where both are given.

Labels stay bounded: at most ``max_tenants`` distinct names, the rest
``other``; a name is registered only when its request succeeded (decided at
the end, so a flood of failing requests with made-up names cannot fill the
table); ``none`` (no tenant named), ``invalid`` (a malformed header) and
``other`` are always available and not counted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Final

__all__ = ["INVALID", "NONE", "OTHER", "TenantLabels", "build_tenants"]

NONE: Final = "none"
INVALID: Final = "invalid"
OTHER: Final = "other"
_RESERVED: Final = frozenset({NONE, INVALID, OTHER})
_VALID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_KEY_HEX_DIGITS: Final = 12


class TenantLabels:
    """Turns request headers into a candidate tenant, and a candidate into a label at the end."""

    __slots__ = ("_from_key", "_header", "_known", "_max", "_salt")

    def __init__(
        self,
        *,
        header: str | None,
        salt: bytes | None,
        max_tenants: int,
    ) -> None:
        """``salt`` given turns on keys as tenants; the caller checks it is set when asked."""
        self._header = header.lower() if header else None
        self._salt = salt
        self._from_key = salt is not None
        self._max = max(max_tenants, 1)
        self._known: set[str] = set()

    def candidate(self, headers: Mapping[str, str]) -> str:
        """The tenant a request names: the header if present, else its key's digest, else none."""
        if self._header is not None:
            value = _get(headers, self._header)
            if value is not None:
                value = value.strip()
                return value if _VALID.fullmatch(value) else INVALID
        if self._from_key:
            token = _bearer(_get(headers, "authorization"))
            if token:
                return self._digest(token)
        return NONE

    def label(self, candidate: str, *, ok: bool) -> str:
        """The label to book under, once the response is known; registers on success."""
        if candidate in _RESERVED or candidate in self._known:
            return candidate
        if ok and len(self._known) < self._max:
            self._known.add(candidate)
            return candidate
        return OTHER

    @property
    def known(self) -> frozenset[str]:
        """The names registered so far (without the reserved labels)."""
        return frozenset(self._known)

    def _digest(self, token: str) -> str:
        assert self._salt is not None
        return hashlib.sha256(self._salt + token.encode("utf-8")).hexdigest()[:_KEY_HEX_DIGITS]


def _get(headers: Mapping[str, str], name: str) -> str | None:
    """A header by lower-case name from any mapping (aiohttp's is case-insensitive already)."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, v in headers.items():
        if key.lower() == name:
            return v
    return None


def _bearer(value: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``; ``None`` for other schemes."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def build_tenants(
    *, header: str | None, from_api_key: bool, salt: str | None, max_tenants: int
) -> TenantLabels | None:
    """The labeller the settings ask for, or ``None`` when showback is off.

    Raises a one-line :class:`ValueError` naming the flag when keys are asked
    for without a salt: an unsalted or per-process salt would give labels that
    change across restarts and replicas.
    """
    if from_api_key and not salt:
        raise ValueError(
            "--tenant-from-api-key: set LLM_ENERGY_TENANT_SALT in the environment "
            "(the same secret on every replica, so labels agree)"
        )
    if header is None and not from_api_key:
        return None
    return TenantLabels(
        header=header,
        salt=salt.encode("utf-8") if from_api_key and salt else None,
        max_tenants=max_tenants,
    )
