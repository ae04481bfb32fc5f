"""Envoy's workload identity, delivered by this control plane.

Envoy has no Vault login: the control plane issues the ``gateway`` identity's certificate
(vault/pki.yaml grants it that role) and renews it. It reaches Envoy two ways:

- as SDS secrets on the ADS stream, for Envoy's mTLS connections to the services;
- as files in ``cert_dir`` (0600, replaced atomically), which Envoy's bootstrap watches
  (``path_config_source`` with ``watched_directory``), for the ADS connection itself,
  which cannot bring its own certificate.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tessera.identity.source import CertificateSource

__all__ = ["CA_FILE", "CERT_SECRET_FILE", "VALIDATION_SECRET_FILE", "write_files"]

CERT_FILE = "gateway.crt"
KEY_FILE = "gateway.key"
CA_FILE = "mesh-ca.crt"
CERT_SECRET_FILE = "xds-certificate.yaml"
VALIDATION_SECRET_FILE = "xds-ca.yaml"
_TLS_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)  # Envoy's directory watch fires on the move


def write_files(source: CertificateSource, cert_dir: Path) -> None:
    """Envoy's current certificate, key and CA, and the two SDS files naming them."""
    cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    current = source.current
    _replace(cert_dir / KEY_FILE, current.private_key)
    _replace(cert_dir / CERT_FILE, current.certificate)
    _replace(cert_dir / CA_FILE, "\n".join(current.ca_chain))
    _replace(
        cert_dir / CERT_SECRET_FILE,
        yaml.safe_dump(
            {
                "resources": [
                    {
                        "@type": _TLS_SECRET,
                        "name": "xds-certificate",
                        "tls_certificate": {
                            "certificate_chain": {"filename": str(cert_dir / CERT_FILE)},
                            "private_key": {"filename": str(cert_dir / KEY_FILE)},
                        },
                    }
                ]
            }
        ),
    )
    _replace(
        cert_dir / VALIDATION_SECRET_FILE,
        yaml.safe_dump(
            {
                "resources": [
                    {
                        "@type": _TLS_SECRET,
                        "name": "xds-ca",
                        "validation_context": {"trusted_ca": {"filename": str(cert_dir / CA_FILE)}},
                    }
                ]
            }
        ),
    )
