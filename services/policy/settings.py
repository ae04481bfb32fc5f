"""Policy service settings (env ``TESSERA_POLICY_*``; shared ones ``TESSERA_*``)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tessera.runtime.config import ServiceSettings


def _default_instance_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "local"
    return f"policy-{host}"


class PolicySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="TESSERA_POLICY_", extra="ignore", populate_by_name=True
    )

    listen: str = "127.0.0.1:50054"
    policy_dir: Path = Path("policy")
    """Directory holding ``schema.cedarschema`` and ``policies/*.cedar``."""
    poll_interval_s: float = Field(default=1.0, gt=0)
    lease_renew_s: float = Field(default=1.0, gt=0)
    """How often the distributed set's lease is renewed (tessera/policy/distribution.py);
    decision points following it refuse once they have seen no renewal for their bound."""
    """How often the policy files' mtimes are compared for hot reload."""
    instance_id: str = Field(default_factory=_default_instance_id, pattern=r"^[A-Za-z0-9_-]+$")
    """Names this instance's audit chain. Keep it stable across restarts so the chain
    continues; give each replica its own (replicas sharing one are safe, but contend)."""
    decision_audit: Literal["sync", "async"] = "async"
    """``async`` (default): the record is deferred on the audit writer (written with the
    chain's next record, within 50 ms, many per stored record); Check answers UNAVAILABLE
    while the backlog is full or deferred records wait after a failed write (see
    services/policy/service.py for what this trades away and why the tool proxy's awaited
    ``allow`` record makes it safe). ``sync``: Check answers only after its decision record
    is acked (a Check after the audit stream broke is refused)."""
    decision_audit_queue: int = Field(default=1024, gt=0)
    """``async`` only: decisions answered but not yet stored, at most."""
    audit_timeout_s: float = Field(default=2.0, gt=0)
    """How long one audit publish may wait for its ack before the decision fails closed."""
