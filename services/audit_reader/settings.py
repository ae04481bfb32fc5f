"""Audit reader settings (env ``TESSERA_AUDIT_READER_*``; shared ones ``TESSERA_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import ServiceSettings


class AuditReaderSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TESSERA_AUDIT_READER_", extra="ignore", populate_by_name=True
    )

    listen: str = "127.0.0.1:50063"
    instance_id: str = Field(default="audit-reader", pattern=r"^[A-Za-z0-9_-]+$")
    """Names this instance's audit chain (its refusals; keep it stable across restarts)."""
    read_timeout_s: float = Field(default=20.0, gt=0)
    """How long reading and verifying the audit stream may take for one request."""
    keys_ttl_s: float = Field(default=30.0, gt=0)
    """How long the signing keys' public halves are reused before Vault is asked again
    (a rotated key verifies within this)."""
    policy_freshness_s: float = Field(default=5.0, gt=0)
    """Reads are decided with the distributed policy set; a set not confirmed current for
    this long refuses them (UNAVAILABLE ``POLICY_STALE``)."""
    human_subject_claim: str = "preferred_username"
    human_groups_claim: str = "groups"
