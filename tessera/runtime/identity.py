"""A process's workload identity at start-up: log in, obtain the certificate, and make
the channels and servers that use it.

Every service and agent does the same three things, so they live here once::

    workload = await Workload.start(settings, vault=vault)   # vault: an existing login
    server = GrpcServer(..., identity=workload.certificate)
    planner = workload.channel(settings.planner_address, peer=PLANNER)

Without an AppRole file (``TESSERA_VAULT_APPROLE_FILE``) there is no identity: start-up
fails unless ``TESSERA_INSECURE_PLAINTEXT=1`` asks for plaintext (local debugging only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from tessera.identity.names import WorkloadName
from tessera.identity.nats_tls import client_context, inbox_prefix, server_hostname
from tessera.identity.source import CertificateSource
from tessera.runtime.config import CommonSettings
from tessera.runtime.grpc_client import channel
from tessera.runtime.startup import until_ready
from tessera.vault.client import VaultClient
from tessera.vault.errors import VaultUnavailable

__all__ = ["Workload"]

log = structlog.get_logger(__name__)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, VaultUnavailable)


@dataclass
class Workload:
    certificate: CertificateSource | None
    """This process's certificate; None only in plaintext debugging mode."""
    _owned_vault: VaultClient | None = None

    @classmethod
    async def start(
        cls,
        settings: CommonSettings,
        *,
        vault: VaultClient | None = None,
        identity: str | None = None,
        what: str = "service",
    ) -> Workload:
        """Obtain the certificate of ``identity`` (default: the Vault login's own)."""
        owned = None
        if vault is None and settings.vault_approle_file is not None:
            approle_file = settings.vault_approle_file
            vault = owned = await until_ready(
                lambda: VaultClient.from_approle_file(settings.vault_addr, approle_file),
                what="vault login",
                within_s=settings.startup_timeout_s,
                retry_if=_transient,
            )
        if vault is None:
            if not settings.insecure_plaintext:
                raise RuntimeError(
                    f"this {what} has no workload identity: set TESSERA_VAULT_APPROLE_FILE "
                    "(plaintext is only for local debugging, with TESSERA_INSECURE_PLAINTEXT=1)"
                )
            log.warning("workload_identity_disabled", insecure_plaintext=True)
            return cls(None)
        try:
            certificate = await until_ready(
                lambda: CertificateSource.start(
                    vault,
                    identity=identity,
                    trust_domain=settings.trust_domain,
                    ttl_s=settings.cert_ttl_s,
                ),
                what="workload certificate",
                within_s=settings.startup_timeout_s,
                retry_if=_transient,
            )
        except BaseException:
            if owned is not None:
                await owned.close()
            raise
        return cls(certificate, owned)

    def nats_options(self, settings: CommonSettings) -> dict[str, Any]:
        """Keyword arguments for :func:`tessera.runtime.bus.connect`: TLS with this
        identity's certificate when the mesh's NATS requires it (``TESSERA_NATS_TLS``),
        and the identity's inbox prefix (the only inboxes its permissions let it read)."""
        if not settings.nats_tls:
            return {}
        if self.certificate is None:
            raise RuntimeError("NATS requires TLS but this process has no workload identity")
        return {
            "tls": client_context(self.certificate),
            "tls_hostname": server_hostname(self.certificate.name.trust_domain),
            "inbox_prefix": inbox_prefix(self.certificate.name.identity),
        }

    @property
    def vault(self) -> VaultClient | None:
        """The Vault login this workload made for itself (None when it was handed one, or
        in plaintext mode); other start-up steps may reuse it instead of logging in twice."""
        return self._owned_vault

    async def issue_for(self, identity: str) -> CertificateSource:
        """A renewed certificate for another identity this one issues for (vault/pki.yaml
        ``issue_for``), e.g. the gateway control plane for Envoy."""
        if self.certificate is None or self._owned_vault is None:
            raise RuntimeError("issue_for needs a workload identity with its own Vault login")
        return await CertificateSource.start(
            self._owned_vault,
            identity=identity,
            trust_domain=self.certificate.name.trust_domain,
            ttl_s=self.certificate.ttl_s,
        )

    def peer(self, kind: str, name: str) -> WorkloadName:
        domain = self.certificate.name.trust_domain if self.certificate else "tessera.local"
        return WorkloadName(kind, name, domain)

    def channel(self, target: str, *, peer: WorkloadName, **options: Any) -> grpc.aio.Channel:
        """A channel to ``peer`` at ``target``: mTLS with this identity (plaintext when
        there is none, i.e. in debugging mode)."""
        if self.certificate is None:
            return channel(target, **options)
        return channel(target, identity=self.certificate, peer=peer, **options)

    async def close(self) -> None:
        if self.certificate is not None:
            await self.certificate.close()
        if self._owned_vault is not None:
            await self._owned_vault.close()
