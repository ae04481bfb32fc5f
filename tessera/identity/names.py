"""How a workload identity is named in certificates.

One identity name (the AppRole name of vault/identities.yaml: ``coordinator``,
``agent-billing``) maps to one SPIFFE ID and one DNS name:

- ``spiffe://<trust domain>/<kind>/<name>``: what servers authorize a caller by (the URI
  SAN; gRPC exposes it as the peer's ``peer_spiffe_id``);
- ``<name>.<kind>.<trust domain>``: what clients verify a server by (grpcio's hostname
  check reads DNS SANs only, never URI SANs).

``kind`` is ``agent`` for agents (their name without the ``agent-`` prefix) and
``service`` for everything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_TRUST_DOMAIN", "WorkloadName"]

DEFAULT_TRUST_DOMAIN = "tessera.local"
AGENT_PREFIX = "agent-"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_SPIFFE = re.compile(r"^spiffe://([a-z0-9.-]+)/(agent|service)/([a-z][a-z0-9-]*)$")


@dataclass(frozen=True, order=True)
class WorkloadName:
    """A workload's identity: ``kind`` (agent or service) and ``name`` in a trust domain."""

    kind: str
    name: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def __post_init__(self) -> None:
        if self.kind not in ("agent", "service"):
            raise ValueError(f"identity kind must be agent or service, not {self.kind!r}")
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"invalid identity name {self.name!r}: lower-case kebab-case")

    @classmethod
    def of(cls, identity: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> WorkloadName:
        """``agent-billing`` -> agent/billing; ``coordinator`` -> service/coordinator."""
        if identity.startswith(AGENT_PREFIX):
            return cls("agent", identity.removeprefix(AGENT_PREFIX), trust_domain)
        return cls("service", identity, trust_domain)

    @classmethod
    def from_spiffe_id(cls, uri: str) -> WorkloadName | None:
        """Parse a peer's SPIFFE ID; None when it is not one of ours."""
        match = _SPIFFE.fullmatch(uri)
        if match is None:
            return None
        try:
            return cls(match.group(2), match.group(3), match.group(1))
        except ValueError:
            return None

    @property
    def identity(self) -> str:
        """The AppRole / PKI role name this identity logs in and issues with."""
        return AGENT_PREFIX + self.name if self.kind == "agent" else self.name

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind}/{self.name}"

    @property
    def dns_name(self) -> str:
        return f"{self.name}.{self.kind}.{self.trust_domain}"

    def __str__(self) -> str:
        return self.spiffe_id
