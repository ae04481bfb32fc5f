"""Tool proxy settings (env ``TESSERA_TOOL_PROXY_*``; shared ones ``TESSERA_*``)."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import ServiceSettings
from tessera.vault.naming import LOCAL_PROXY_SOURCE


def _default_replica_id() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "local"


class ToolProxySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TESSERA_TOOL_PROXY_", extra="ignore", populate_by_name=True
    )

    replica_id: str = Field(default_factory=_default_replica_id, pattern=r"^[A-Za-z0-9_-]+$")
    """Names this replica's audit chain (``tool-proxy-<replica_id>``); default: the host
    name (a pod's name). Keep it stable across restarts so a restarted replica continues
    its chain; give each live replica its own (two sharing one are safe, but contend)."""

    policy_address: str = Field(
        default="127.0.0.1:50054", validation_alias=AliasChoices("TESSERA_POLICY_ADDRESS")
    )
    """Where the policy service serves PolicyService."""
    policy_timeout_s: float = Field(default=2.0, gt=0)
    """Upper bound of one policy Check (the call's remaining time bounds it further)."""
    policy_mode: Literal["remote", "embedded", "distributed"] = "distributed"
    """``distributed`` (the default, DESIGN.md "Policy decision points") is described last.
    ``remote``: every decision is a ``Check`` RPC to the policy service (which writes its
    own decision record). ``embedded``: the proxy loads ``policy_dir`` itself (validated
    and hot-reloaded exactly like the policy service, refusing to start on an invalid set,
    keeping the last good set on a refused reload) and decides in-process; the decision id,
    determining policies and policy set version ride on the proxy's own awaited audit
    record (``allow`` or the refusal), so there is no separate decision record.
    ``distributed``: decides in-process, like ``embedded``, with the set the policy
    service distributes (tessera/policy/distribution.py): a reload reaches the proxy
    within a second, and a set it cannot confirm current for ``policy_freshness_s``
    refuses every call (UNAVAILABLE, ``POLICY_STALE``)."""
    policy_freshness_s: float = Field(default=5.0, gt=0)
    """``distributed`` only: how long the proxy decides without a lease renewal naming
    the set it holds (the policy service renews every second)."""
    policy_dir: Path = Path("policy")
    """``embedded`` only: directory holding ``schema.cedarschema`` and
    ``policies/*.cedar``."""
    policy_poll_interval_s: float = Field(default=1.0, gt=0)
    """``embedded`` only: how often the policy files are compared for hot reload."""

    vault_source_address: str = "auto"
    """The local IP the proxy's requests to Vault leave from; task tokens are bound to the
    proxy's addresses (``bound_cidrs`` in vault/tools.yaml), so only the proxy can use
    them. ``auto``: 127.0.0.2 when Vault is on loopback (the local mesh), else the OS's
    choice (a cluster binds tokens to the proxy pods' CIDR); ``""``: the OS's choice."""

    token_cache_ttl_s: float = Field(default=1.0, gt=0, le=1.0)
    """How long a token lookup is trusted (never more than 1 s; revocation events evict
    at once)."""
    token_cache_size: int = Field(default=10_000, gt=0)
    secret_cache_ttl_s: float = Field(default=30.0, ge=0)
    """How long a tool secret read through a task token is reused for other valid tokens
    scoped to that tool; 0 reads Vault on every call. Bounds how late a rotated tool
    secret is picked up."""
    vault_timeout_s: float = Field(default=2.0, gt=0)
    vault_attempts: int = Field(default=2, ge=1)

    agent_rate_per_s: float = Field(default=50.0, gt=0)
    agent_burst: int = Field(default=100, gt=0)
    tool_rate_per_s: float = Field(default=200.0, gt=0)
    tool_burst: int = Field(default=400, gt=0)

    max_argument_bytes: int = Field(default=64 * 1024, gt=0)
    """Largest serialized arguments accepted (RESOURCE_EXHAUSTED beyond)."""
    max_argument_depth: int = Field(default=8, gt=0)
    max_string_length: int = Field(default=8192, gt=0)
    max_result_bytes: int = Field(default=1024 * 1024, gt=0)
    mcp_max_message_bytes: int = Field(default=256 * 1024, gt=0)
    """Largest MCP JSON-RPC message people's clients may POST to ``/mcp`` (a JSON-RPC
    error beyond; Envoy refuses bodies above its own ``max_request_bytes`` with 413)."""

    backend_timeout_s: float = Field(default=10.0, gt=0)
    """Default deadline of one backend call (a tool may declare a shorter one)."""
    idempotency_lease_s: float = Field(default=60.0, gt=0)
    """Lease of a `started` idempotency record that does not carry its own (records written
    before leases followed the call's backend deadline). Each call now holds its record for
    its backend deadline plus 1 s; after that its executor is presumed dead and a retry
    takes the record over, but only after the tool said the effect did not happen (its
    ``lookup``; one that did is replayed, one the tool cannot tell is refused)."""
    idempotency_finish_within_s: float = Field(default=30.0, gt=0)
    """How long the proxy keeps trying to record the outcome (``done``) of an effect that
    ran, through faults of the idempotency bucket (a bucket electing a leader answers
    nothing), with capped exponential backoff and jitter, whether or not the caller is
    still waiting. After that the call answers UNAVAILABLE
    ``IDEMPOTENCY_OUTCOME_UNRECORDED`` and the record stays ``started``: a retry after its
    lease asks the tool whether the effect happened. Shutdown waits for these attempts."""

    audit_hmac_key: SecretStr | None = None
    """Override of the key of the HMACs of secret-bearing arguments in audit records.
    Unset (the default): the key the Vault bootstrap stored (``tessera-audit/hmac-key``),
    the same for every replica and restart, so digests compare."""
    mcp_servers: Path | None = None
    """JSON or YAML file describing the MCP servers whose tools are exposed."""
    a2a_agents_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("TESSERA_A2A_AGENTS_FILE", "a2a_agents_file")
    )
    """The A2A agent declarations (``tessera/a2a_agents.py``): each agent becomes the tool
    ``a2a.<name>``. Shared with the A2A bridge agent and the launcher; unset: none."""
    mcp_timeout_s: float = Field(default=15.0, gt=0)
    """Bound on connecting to one MCP server and listing its tools at start-up."""
    default_budget_remaining_cents: int = Field(default=10**12, ge=0)
    """``context.budget_remaining`` (cents) when the workflow caps no cost, or for a
    token issued without the budget ledger (no ``reservation`` in its meta) that carries
    no ``budget_remaining`` either."""
    metrics_port: int = 0

    @field_validator("a2a_agents_file", mode="before")
    @classmethod
    def _no_file(cls, value: object) -> object:
        return None if value in ("", None) else value

    def resolved_vault_source_address(self) -> str:
        """``vault_source_address`` with ``auto`` resolved against ``vault_addr``."""
        if self.vault_source_address != "auto":
            return self.vault_source_address
        host = urlsplit(self.vault_addr).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        return LOCAL_PROXY_SOURCE if loopback else ""
