"""The TLS context a workload connects to NATS with: its workload certificate (NATS maps
it to the identity's user and permissions, see tessera.runtime.nats_permissions), the mesh
CA to verify the server, and a reload on every renewal so reconnects present a valid one;
and the inbox prefix it connects with (the only inboxes those permissions let it read).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from tessera.identity.names import WorkloadName
from tessera.identity.source import CertificateSource

__all__ = ["NATS_SERVER", "client_context", "context_from_pem", "inbox_prefix"]

NATS_SERVER = "nats"
"""The identity NATS servers hold (their certificate's DNS name is what clients verify)."""


def _load_chain(context: ssl.SSLContext, certificate: str, private_key: str) -> None:
    # ssl loads a key pair from files only: a private directory, gone right after.
    with tempfile.TemporaryDirectory(prefix="tessera-tls-") as directory:
        os.chmod(directory, 0o700)
        cert_file, key_file = Path(directory, "cert.pem"), Path(directory, "key.pem")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(private_key)
        cert_file.write_text(certificate)
        context.load_cert_chain(cert_file, key_file)


def context_from_pem(certificate: str, private_key: str, ca: str) -> ssl.SSLContext:
    """A client context presenting ``certificate`` and trusting only ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, certificate, private_key)
    return context


def client_context(source: CertificateSource) -> ssl.SSLContext:
    """A context that follows ``source``'s renewals (new handshakes use the new one)."""
    current = source.current
    context = context_from_pem(
        current.certificate, current.private_key, "\n".join(current.ca_chain)
    )

    def renewed() -> None:
        latest = source.current
        _load_chain(context, latest.certificate, latest.private_key)

    source.subscribe(renewed)
    return context


def server_hostname(trust_domain: str) -> str:
    """What a client checks the NATS server's certificate against."""
    return WorkloadName.of(NATS_SERVER, trust_domain).dns_name


def inbox_prefix(identity: str) -> str:
    """The inbox prefix ``identity`` connects with (nats-py's ``inbox_prefix``): its
    request replies and push deliveries arrive under it, and its NATS permissions let it
    subscribe to no other inbox, so no identity overhears another's answers."""
    return f"_INBOX.{WorkloadName.of(identity).identity}"  # a valid name is one token
