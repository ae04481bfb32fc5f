"""gRPC credentials from a :class:`~tessera.identity.source.CertificateSource`."""

from __future__ import annotations

import grpc

from tessera.identity.source import CertificateSource

__all__ = ["channel_credentials", "server_credentials"]


def _server_config(source: CertificateSource) -> grpc.ServerCertificateConfiguration:
    cert = source.current
    return grpc.ssl_server_certificate_configuration(
        [(cert.private_key.encode(), cert.certificate.encode())],
        root_certificates=source.ca_pem,
    )


def server_credentials(source: CertificateSource) -> grpc.ServerCredentials:
    """mTLS server credentials that require a client certificate from the mesh CA and pick
    up a renewed certificate at the next handshake, without a restart."""
    served = source.generation

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake; None keeps the configuration it has.
        nonlocal served
        if source.generation == served:
            return None
        served = source.generation
        return _server_config(source)

    return grpc.dynamic_ssl_server_credentials(
        _server_config(source), fetch, require_client_authentication=True
    )


def channel_credentials(source: CertificateSource) -> grpc.ChannelCredentials:
    """The client side: present our certificate, trust only the mesh CA."""
    cert = source.current
    return grpc.ssl_channel_credentials(
        root_certificates=source.ca_pem,
        private_key=cert.private_key.encode(),
        certificate_chain=cert.certificate.encode(),
    )
