"""Settings shared by every Tessera process.

Every process builds exactly one settings object in its ``__main__`` and passes it down;
no other module reads the environment.

Two kinds of fields live here:

* :class:`CommonSettings` fields describe the shared infrastructure (NATS, Vault, logging,
  tracing). They are read from FIXED environment variables (``TESSERA_NATS_URL`` …)
  whatever ``env_prefix`` a subclass sets, so one environment configures every service.
* :class:`ServiceSettings` fields describe one gRPC server. They follow the subclass's
  ``env_prefix``: a planner declares ``env_prefix="TESSERA_PLANNER_"`` and then reads
  ``TESSERA_PLANNER_LISTEN``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["MIB", "STARTUP_TIMEOUT_S", "CommonSettings", "ServiceSettings"]

MIB = 1024 * 1024
STARTUP_TIMEOUT_S = 30.0
"""Default of ``startup_timeout_s``: how long start-up waits out a dependency."""


def _fixed(env: str) -> AliasChoices:
    # A validation alias bypasses env_prefix; the field name stays usable as a kwarg.
    return AliasChoices(env)


class CommonSettings(BaseSettings):
    """Infrastructure settings shared by every process, read from fixed env var names."""

    model_config = SettingsConfigDict(
        env_prefix="TESSERA_",
        extra="ignore",
        populate_by_name=True,
    )

    nats_url: str = Field(
        default="nats://127.0.0.1:4222", validation_alias=_fixed("TESSERA_NATS_URL")
    )
    """NATS server URL (comma-separated for a cluster)."""
    nats_tls: bool = Field(default=False, validation_alias=_fixed("TESSERA_NATS_TLS"))
    """NATS requires TLS and maps each client's workload certificate to its identity's
    permissions (`tessera up` sets it; see tessera.runtime.nats_permissions)."""
    namespace: str = Field(default="tessera", validation_alias=_fixed("TESSERA_NAMESPACE"))
    """Prefix of every NATS stream, bucket and subject name (tests isolate with it)."""
    jetstream_replicas: int = Field(
        default=1, ge=1, le=5, validation_alias=_fixed("TESSERA_JETSTREAM_REPLICAS")
    )
    """Replicas of the streams and KV buckets a service creates (3 on a 3-node cluster)."""
    registry_address: str = Field(
        default="127.0.0.1:50058", validation_alias=_fixed("TESSERA_REGISTRY_ADDRESS")
    )
    """The registry service (RegistryService), where agents register over gRPC."""
    vault_addr: str = Field(
        default="http://127.0.0.1:8200", validation_alias=_fixed("TESSERA_VAULT_ADDR")
    )
    vault_approle_file: Path | None = Field(
        default=None, validation_alias=_fixed("TESSERA_VAULT_APPROLE_FILE")
    )
    """JSON file holding this service's AppRole role_id/secret_id."""
    log_level: str = Field(default="info", validation_alias=_fixed("TESSERA_LOG_LEVEL"))
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        default="none", validation_alias=_fixed("TESSERA_OTEL_EXPORTER")
    )
    otel_endpoint: str | None = Field(
        default=None, validation_alias=_fixed("TESSERA_OTEL_ENDPOINT")
    )
    """OTLP gRPC endpoint; ``None`` means the exporter's default / OTEL_* env vars."""
    trust_domain: str = Field(
        default="tessera.local", validation_alias=_fixed("TESSERA_TRUST_DOMAIN")
    )
    """SPIFFE trust domain of the mesh's workload identities (see vault/pki.yaml)."""
    cert_ttl_s: int = Field(
        default=3600, ge=5, le=86_400, validation_alias=_fixed("TESSERA_CERT_TTL_S")
    )
    """Lifetime of this process's workload certificate; renewed at two thirds of it."""
    insecure_plaintext: bool = Field(
        default=False, validation_alias=_fixed("TESSERA_INSECURE_PLAINTEXT")
    )
    """Serve and call gRPC without TLS or caller checks. Local debugging only: every
    connection is then unauthenticated and every caller allowed. Logged loudly."""
    startup_timeout_s: float = Field(
        default=STARTUP_TIMEOUT_S, gt=0, validation_alias=_fixed("TESSERA_STARTUP_TIMEOUT_S")
    )
    """How long start-up waits for a dependency that is not ready yet (NATS reachable,
    JetStream streams placed and led, Vault answering) before the process gives up; see
    :mod:`tessera.runtime.startup`."""


class ServiceSettings(CommonSettings):
    """Settings of one gRPC server. Subclasses set ``env_prefix="TESSERA_<SERVICE>_"``."""

    listen: str = "127.0.0.1:0"
    """host:port to bind; port 0 picks a free port (see ``GrpcServer.start``)."""
    max_message_bytes: int = Field(default=4 * MIB, gt=0)
    default_deadline_s: float = Field(default=10.0, gt=0)
    """Deadline applied to calls that arrive without one."""
    max_deadline_s: float = Field(default=300.0, gt=0)
    """Cap applied to calls whose deadline is longer than this."""
    shutdown_grace_s: float = Field(default=5.0, ge=0)
