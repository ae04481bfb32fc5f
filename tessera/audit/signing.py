"""Checkpoint signatures: what a writer signs, who may sign which chain, and how a
signature is checked without Vault.

A checkpoint signs ``checkpoint_payload(chain, sequence, hash)``: the writer name of the
chain, a position in it and that record's hash. Because each record's hash covers the
previous one's, one valid signature vouches for the whole prefix up to ``sequence``.

Key names are ``audit-<identity>`` (:func:`key_name_for`). A chain belongs to the identity
whose name it carries: ``policy`` and ``policy-1a2b`` are chains of identity ``policy``
(:func:`key_owns_chain`), so a checkpoint of chain ``policy-1a2b`` signed with
``audit-tool-proxy`` is forged even though the signature itself is valid.

Public keys (:class:`PublicKeys`) come from Vault's Transit ``keys/<name>`` (every version)
or from an export file; checking needs no Vault.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "CHECKPOINT_DOMAIN",
    "KEY_PREFIX",
    "PublicKeys",
    "Signature",
    "Signer",
    "checkpoint_payload",
    "key_name_for",
    "key_owns_chain",
]

CHECKPOINT_DOMAIN = b"tessera-audit-checkpoint/v1"
KEY_PREFIX = "audit-"
ED25519 = "ed25519"


def checkpoint_payload(chain: str, sequence: int, record_hash: bytes) -> bytes:
    """The exact bytes a checkpoint signs (see ``AuditCheckpoint.signature``)."""
    return b"\n".join(
        (CHECKPOINT_DOMAIN, chain.encode(), str(int(sequence)).encode(), record_hash.hex().encode())
    )


def key_name_for(identity: str) -> str:
    """The Transit key identity ``identity`` signs its chains with."""
    return KEY_PREFIX + identity


def key_owns_chain(key_name: str, chain: str) -> bool:
    """Whether ``key_name`` (``audit-<identity>``) may sign chain ``chain``: the chain is the
    identity's name itself or that name followed by ``-<instance>``."""
    if not key_name.startswith(KEY_PREFIX):
        return False
    identity = key_name.removeprefix(KEY_PREFIX)
    return bool(identity) and (chain == identity or chain.startswith(identity + "-"))


@dataclass(frozen=True)
class Signature:
    """A signature as a checkpoint stores it."""

    key_name: str
    key_version: int
    algorithm: str
    signature: bytes = field(repr=False)


class Signer(Protocol):
    """Signs checkpoint payloads with one key (e.g. Vault Transit, see
    :class:`tessera.vault.audit_keys.TransitSigner`)."""

    @property
    def key_name(self) -> str: ...

    async def sign(self, payload: bytes) -> Signature:
        """Raise on any failure (the checkpoint is then tried again later)."""
        ...


@dataclass(frozen=True)
class PublicKeys:
    """Public keys by key name and version: ``{"audit-policy": {1: b"...", 2: b"..."}}``
    (raw 32-byte ed25519 keys), with each key's algorithm."""

    keys: Mapping[str, Mapping[int, bytes]] = field(default_factory=dict)
    algorithms: Mapping[str, str] = field(default_factory=dict)

    def check(
        self, checkpoint_key: str, version: int, algorithm: str, payload: bytes, signature: bytes
    ) -> str | None:
        """``None`` when ``signature`` is ``checkpoint_key`` v``version``'s signature of
        ``payload``; otherwise why not (for a report)."""
        versions = self.keys.get(checkpoint_key)
        if versions is None:
            return f"signed with unknown key {checkpoint_key!r}"
        public = versions.get(version)
        if public is None:
            return f"signed with unknown version {version} of {checkpoint_key!r}"
        expected = self.algorithms.get(checkpoint_key, ED25519)
        if algorithm != expected:
            return f"algorithm {algorithm!r} but {checkpoint_key!r} is {expected!r}"
        if expected != ED25519:
            return f"cannot check {expected!r} signatures"
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, payload)
        except (InvalidSignature, ValueError):
            return f"signature does not verify with {checkpoint_key!r} v{version}"
        return None

    def merged(self, other: PublicKeys) -> PublicKeys:
        keys = {name: dict(versions) for name, versions in self.keys.items()}
        for name, versions in other.keys.items():
            keys.setdefault(name, {}).update(versions)
        return PublicKeys(keys, {**self.algorithms, **other.algorithms})

    def to_json(self) -> dict[str, Any]:
        return {
            name: {
                "algorithm": self.algorithms.get(name, ED25519),
                "versions": {
                    str(v): base64.b64encode(k).decode() for v, k in sorted(versions.items())
                },
            }
            for name, versions in sorted(self.keys.items())
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PublicKeys:
        """Parse :meth:`to_json`'s output. Raises ValueError when it is malformed."""
        keys: dict[str, dict[int, bytes]] = {}
        algorithms: dict[str, str] = {}
        try:
            for name, entry in data.items():
                algorithms[str(name)] = str(entry.get("algorithm", ED25519))
                keys[str(name)] = {
                    int(v): base64.b64decode(k, validate=True) for v, k in entry["versions"].items()
                }
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed public keys: {exc}") from exc
        return cls(keys, algorithms)
