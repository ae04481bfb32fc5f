"""Values describing Vault tokens and tool secrets.

Anything that holds a token or a secret value redacts it from ``repr``/``str``, so these
objects can be logged, put in exceptions and shown in tracebacks safely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["IssuedCertificate", "TaskToken", "TokenInfo", "ToolSecret"]


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A workload certificate from the mesh CA; the private key never appears in ``repr``.

    ``ca_chain`` is the issuing CA chain (PEM each), what peers are verified against;
    ``expiration`` is the certificate's notAfter as a Unix time.
    """

    certificate: str
    private_key: str = field(repr=False)
    ca_chain: tuple[str, ...]
    serial: str
    expiration: int


@dataclass(frozen=True, slots=True)
class TaskToken:
    """A per-task child token created through the ``tessera-task`` token role.

    ``token`` is the bearer secret handed to the agent; it never appears in ``repr``.
    ``accessor`` identifies the token for lookup and revocation without granting its use.
    """

    token: str = field(repr=False)
    accessor: str
    policies: tuple[str, ...]
    expires_at: datetime
    num_uses: int
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What Vault says about a token (the token itself is deliberately not kept).

    ``num_uses`` is the number of uses left (0 means unlimited); ``ttl_s`` the seconds left
    when Vault answered; ``expire_time`` is None for tokens that never expire (root).
    """

    accessor: str
    policies: tuple[str, ...]
    meta: Mapping[str, str]
    ttl_s: int
    num_uses: int
    expire_time: datetime | None
    renewable: bool
    role: str | None
    orphan: bool

    @classmethod
    def from_lookup(cls, data: Mapping[str, Any]) -> TokenInfo:
        """Build from the ``data`` of ``auth/token/lookup`` or ``lookup-self``."""
        expire = data.get("expire_time")
        return cls(
            accessor=str(data.get("accessor", "")),
            policies=tuple(sorted(data.get("policies") or ())),
            meta=dict(data.get("meta") or {}),
            ttl_s=int(data.get("ttl") or 0),
            num_uses=int(data.get("num_uses") or 0),
            expire_time=datetime.fromisoformat(expire) if expire else None,
            renewable=bool(data.get("renewable", False)),
            role=data.get("role") or None,
            orphan=bool(data.get("orphan", False)),
        )


@dataclass(frozen=True, slots=True)
class ToolSecret:
    """One version of a tool's secret. ``repr`` lists the keys, never the values."""

    tool: str
    version: int
    data: Mapping[str, Any] = field(repr=False)
    created_time: datetime | None = None

    def __repr__(self) -> str:
        return f"ToolSecret(tool={self.tool!r}, version={self.version}, keys={sorted(self.data)!r})"

    __str__ = __repr__


def expires_in(seconds: int) -> datetime:
    """UTC wall-clock time ``seconds`` from now."""
    return datetime.now(UTC) + timedelta(seconds=seconds)
