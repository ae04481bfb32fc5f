"""Registry service settings (env ``TESSERA_REGISTRY_*``; shared ones ``TESSERA_*``)."""

from __future__ import annotations

import re
import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import ServiceSettings


def _default_instance_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "local"
    return f"registry-{host}"


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TESSERA_REGISTRY_", extra="ignore", populate_by_name=True
    )

    listen: str = "127.0.0.1:50058"
    instance_id: str = Field(default_factory=_default_instance_id, pattern=r"^[A-Za-z0-9_-]+$")
    """Names this instance's audit chain (keep it stable across restarts)."""
    audit_timeout_s: float = Field(default=2.0, gt=0)
    """How long one audit publish may wait for its ack."""
    write_timeout_s: float = Field(default=2.0, gt=0)
    """How long one registry write may wait for NATS before Register answers UNAVAILABLE
    (the agent retries at its next heartbeat)."""
    policy_freshness_s: float = Field(default=5.0, gt=0)
    """The registry decides freezes with the policy set the policy service distributes
    (tessera/policy/distribution.py); a set it cannot confirm current for this long
    refuses them (UNAVAILABLE ``POLICY_STALE``; fail closed)."""
    human_subject_claim: str = "preferred_username"
    """Claim of a person's identity token that names them (as Envoy's jwt_authn passes it
    on); must match the gateway's ``TESSERA_GATEWAY_JWT_SUBJECT_CLAIM``."""
    human_groups_claim: str = "groups"
    """Claim that lists their groups (policies' ``principal in Group::"..."``)."""
