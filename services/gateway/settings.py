"""Gateway control-plane settings (env ``TESSERA_GATEWAY_*``; shared ones ``TESSERA_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TESSERA_GATEWAY_", extra="ignore", populate_by_name=True
    )

    envoy_listen: str = "127.0.0.1:8080"
    """host:port of the Envoy listener this control plane configures."""
    access_log: str = "/dev/stdout"
    """Where Envoy writes its JSON access log."""
    routes_file: Path = Path("gateway/routes.yaml")
    """Edge policy: limits, timeouts, rate limits, transcoding."""
    descriptor_set: Path | None = None
    """FileDescriptorSet of the contracts (``buf build --as-file-descriptor-set``) for
    gRPC-JSON transcoding; unset disables HTTP/JSON."""
    coordinator_address: str = Field(
        default="", validation_alias=AliasChoices("TESSERA_COORDINATOR_ADDRESS")
    )
    planner_address: str = Field(
        default="", validation_alias=AliasChoices("TESSERA_PLANNER_ADDRESS")
    )
    tool_proxy_address: str = Field(
        default="", validation_alias=AliasChoices("TESSERA_TOOL_PROXY_ADDRESS")
    )
    console_address: str = Field(
        default="", validation_alias=AliasChoices("TESSERA_CONSOLE_ADDRESS")
    )
    policy_address: str = Field(default="", validation_alias=AliasChoices("TESSERA_POLICY_ADDRESS"))
    """Routed for ``GetPolicySet`` only (POLICY_PUBLIC_METHODS)."""
    audit_reader_address: str = Field(
        default="", validation_alias=AliasChoices("TESSERA_AUDIT_READER_ADDRESS")
    )
    """Public services: an empty address means the service is not routed."""
    cert_dir: Path | None = None
    """Where Envoy's certificate files for its ADS connection are written (its bootstrap
    watches them); unset: only SDS over ADS."""
    route_agents: bool = False
    """Also route ``AgentService`` to agent replicas (one EDS cluster per agent). Off: only
    the coordinator's public API is reachable from outside; agents take tasks from the
    coordinator alone."""
    jwt_issuer: str = ""
    """``iss`` of the identity tokens people present (``tessera up``: the local OpenBao's
    identity token issuer; production: your OIDC provider). Empty: nobody is
    authenticated at the front door, which only a plaintext debug mesh may do."""
    jwt_audiences: list[str] = Field(default_factory=lambda: ["tessera"])
    """Accepted ``aud`` values."""
    jwks_url: str = ""
    """Where the issuer publishes its public keys (default: ``<issuer>/.well-known/keys``,
    OpenBao's location; an OIDC provider's discovery document names its own)."""
    jwt_subject_claim: str = "preferred_username"
    """The claim that names the person (audit records, ``decided_by``, rate limits)."""
    jwt_clock_skew_s: int = Field(default=30, ge=1, le=300)
    """Leeway on ``exp`` and ``nbf`` for clocks that disagree a little (at least 1: Envoy
    reads 0 as unset and uses 60)."""
    jwks_refresh_s: float = Field(default=30.0, gt=0)
    """How often the keys are re-fetched (a rotated key reaches Envoy within this)."""
    debounce_s: float = Field(default=0.05, ge=0)
    """Registry changes closer together than this are sent to Envoy as one update."""
    default_deadline_s: float = Field(default=24 * 3600.0, gt=0)
    """ADS streams carry no deadline and live as long as Envoy does: the server deadline
    guard must not cut them (Envoy reconnects if it does, at a cost of a resync)."""
    max_deadline_s: float = Field(default=24 * 3600.0, gt=0)
