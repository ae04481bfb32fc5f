"""A workload's own certificate: issued from the mesh CA at start, renewed at two thirds
of its life, for as long as the process runs.

Servers read the current certificate at every TLS handshake (see
:func:`tessera.identity.credentials.server_credentials`); client channels subscribe and are
rebuilt on renewal (:class:`tessera.identity.channel.RotatingChannel`). A renewal that
fails is retried with capped backoff until the certificate expires; the old one keeps
serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from tessera.identity.names import WorkloadName
from tessera.vault import _retry
from tessera.vault.client import VaultClient
from tessera.vault.errors import VaultError, VaultUnavailable
from tessera.vault.tokens import IssuedCertificate

__all__ = ["DEFAULT_CERT_TTL_S", "PKI_MOUNT", "CertificateSource"]

log = structlog.get_logger(__name__)

DEFAULT_CERT_TTL_S = 3600
PKI_MOUNT = "mesh-pki"
_RENEW_AT = 2 / 3
_MIN_RENEW_DELAY_S = 0.5


class CertificateSource:
    """The current certificate of one workload identity; safe to share between tasks.

    Create with :meth:`start`; :meth:`close` stops renewal. ``repr`` never shows a key.
    """

    def __init__(
        self,
        vault: VaultClient,
        name: WorkloadName,
        *,
        ttl_s: int = DEFAULT_CERT_TTL_S,
        mount: str = PKI_MOUNT,
    ) -> None:
        self.name = name
        self._vault = vault
        self._ttl_s = ttl_s
        self._mount = mount
        self._current: IssuedCertificate | None = None
        self._issued_at = 0.0
        self.generation = 0
        """Bumped at every renewal; consumers compare it to notice a new certificate."""
        self._listeners: list[Callable[[], None]] = []
        self._renewer: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        vault: VaultClient,
        *,
        identity: str | None = None,
        trust_domain: str,
        ttl_s: int = DEFAULT_CERT_TTL_S,
        mount: str = PKI_MOUNT,
    ) -> CertificateSource:
        """Issue the first certificate (``identity`` defaults to the Vault identity's) and
        keep it renewed."""
        name = WorkloadName.of(identity or vault.identity, trust_domain)
        source = cls(vault, name, ttl_s=ttl_s, mount=mount)
        await source._issue()
        source._renewer = asyncio.create_task(source._renew(), name=f"cert-renewal:{name}")
        return source

    def __repr__(self) -> str:
        return f"CertificateSource({self.name}, generation={self.generation})"

    @property
    def ttl_s(self) -> int:
        return self._ttl_s

    @property
    def current(self) -> IssuedCertificate:
        if self._current is None:
            raise RuntimeError(f"{self.name}: no certificate issued yet")
        return self._current

    @property
    def ca_pem(self) -> bytes:
        """The mesh CA chain peers are verified against."""
        return "\n".join(self.current.ca_chain).encode()

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every renewal; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    async def _issue(self) -> None:
        issued = await self._vault.issue_certificate(
            mount=self._mount,
            role=self.name.identity,
            common_name=self.name.dns_name,
            uri_sans=[self.name.spiffe_id],
            ttl_s=self._ttl_s,
        )
        self._current, self._issued_at = issued, time.time()
        self.generation += 1
        log.info(
            "workload_certificate_issued",
            identity=str(self.name),
            serial=issued.serial,
            expires_in_s=round(issued.expiration - self._issued_at),
        )
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # one consumer's failure must not stop the renewals
                log.exception("workload_certificate_listener_failed", identity=str(self.name))

    def _renew_delay(self) -> float:
        lifetime = self.current.expiration - self._issued_at
        due = self._issued_at + lifetime * _RENEW_AT
        return max(_MIN_RENEW_DELAY_S, due - time.time())

    async def _renew(self) -> None:
        failures = 0
        while True:
            if failures:
                delay = 0.1 + _retry.backoff_s(failures, base_s=0.2, cap_s=5.0)
            else:
                delay = self._renew_delay()
            await asyncio.sleep(delay)
            try:
                await self._issue()
                failures = 0
            except (VaultError, VaultUnavailable) as exc:
                failures += 1
                log.warning(
                    "workload_certificate_renewal_failed",
                    identity=str(self.name),
                    error=type(exc).__name__,
                    failures=failures,
                    expires_in_s=round(self.current.expiration - time.time()),
                )
