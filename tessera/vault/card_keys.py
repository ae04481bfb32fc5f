"""The A2A face's card signing key: Transit key ``agent-cards`` (ed25519, not exportable).

The coordinator signs each template's agent card with it (JWS, ``alg: EdDSA``) and
publishes its public keys as a JSON Web Key Set; its Vault policy may sign with this key
and read its public half, nothing else of it. A rotation adds a version: cards are
re-signed with the latest one, and the key set keeps every version, so a card signed
before the rotation still checks.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import hvac
import hvac.exceptions

from tessera.audit.signing import Signature
from tessera.vault.audit_keys import TRANSIT_MOUNT, TransitSigner, ensure_signing_key
from tessera.vault.client import VaultClient
from tessera.vault.errors import VaultConfigError, VaultPermissionDenied

__all__ = ["CARD_KEY", "CardKeys", "ensure_card_key", "key_id"]

CARD_KEY = "agent-cards"


def ensure_card_key(client: hvac.Client) -> None:
    """Create the card signing key when missing (bootstrap; Transit already enabled)."""
    ensure_signing_key(client, CARD_KEY)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class CardKeys:
    """Signs with, and reads the public keys of, :data:`CARD_KEY` as ``vault``'s identity."""

    def __init__(self, vault: VaultClient) -> None:
        self._vault = vault
        self._signer = TransitSigner(vault._call_own, CARD_KEY)

    async def sign(self, payload: bytes) -> Signature:
        """Ed25519 over ``payload`` itself (Transit does not prehash ed25519)."""
        return await self._signer.sign(payload)

    async def jwks(self) -> dict[str, Any]:
        """Every version's public key as a JWK Set (``kid`` = ``agent-cards-v<N>``).

        Raises:
            VaultPermissionDenied: this identity may not read the key.
            VaultConfigError: the key does not exist (run the bootstrap).
        """
        try:
            resp = await self._vault._call_own(
                "read_card_key",
                lambda c: c.secrets.transit.read_key(name=CARD_KEY, mount_point=TRANSIT_MOUNT),
            )
        except hvac.exceptions.Forbidden as exc:
            raise VaultPermissionDenied(f"may not read the public keys of {CARD_KEY}") from exc
        except hvac.exceptions.InvalidPath as exc:
            raise VaultConfigError(f"no {CARD_KEY} key in Vault: run the bootstrap") from exc
        data = resp.get("data", resp) if isinstance(resp, Mapping) else {}
        keys = []
        for version, info in sorted((data.get("keys") or {}).items(), key=lambda kv: int(kv[0])):
            public = info.get("public_key") if isinstance(info, Mapping) else None
            if public:
                keys.append(
                    {
                        "kty": "OKP",
                        "crv": "Ed25519",
                        "alg": "EdDSA",
                        "use": "sig",
                        "kid": key_id(int(version)),
                        "x": _b64url(base64.b64decode(public)),
                    }
                )
        return {"keys": keys}


def key_id(version: int) -> str:
    """The ``kid`` of version ``version`` of the card key."""
    return f"{CARD_KEY}-v{version}"
