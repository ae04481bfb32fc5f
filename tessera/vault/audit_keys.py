"""Vault's part of the audit trail: one Transit signing key per writer identity, and the
key of the HMACs that stand in for secret-bearing arguments.

* Transit mount ``transit/``, keys ``audit-<identity>`` (ed25519, not exportable) for every
  identity in :data:`AUDIT_WRITERS`. Each identity's policy may ``update``
  ``transit/sign/audit-<itself>`` and nothing else of Transit, so Vault refuses a writer
  that tries to sign with another writer's key. Public keys (every version) are readable
  by the operator, for ``tessera audit verify`` and ``export``.
* KV v2 mount ``tessera-audit/``, secret ``hmac-key``: 32 random bytes (base64), written
  once by the bootstrap (never overwritten) and read at start by the writers whose
  policy allows it (the tool proxy). Digests therefore compare across replicas and
  restarts. Reading it once and computing HMACs locally costs nothing per call; Transit's
  ``hmac`` endpoint would cost a Vault round trip per secret-bearing argument on the
  governed call's critical path, and make every tool call depend on Vault twice.

Rotation (:func:`rotate_signing_keys`) adds a key version; checkpoints name the version
that signed them and the old versions stay readable, so older checkpoints still verify.
The HMAC key is not rotated (digests would stop comparing with older records).

Every call has a timeout (the hvac client's) and bounded retries (:mod:`._retry`). Nothing
here logs or raises a signature input, a key or the HMAC key.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import structlog

from tessera.audit.signing import KEY_PREFIX, PublicKeys, Signature, key_name_for
from tessera.vault import _retry
from tessera.vault.client import VaultClient
from tessera.vault.errors import VaultConfigError, VaultError, VaultPermissionDenied

__all__ = [
    "AUDIT_KV_MOUNT",
    "AUDIT_WRITERS",
    "HMAC_KEY_PATH",
    "KEY_TYPE",
    "TRANSIT_MOUNT",
    "TransitSigner",
    "ensure_audit_keys",
    "ensure_signing_key",
    "read_hmac_key",
    "read_public_keys",
    "read_public_keys_sync",
    "rotate_signing_keys",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

TRANSIT_MOUNT = "transit"
AUDIT_KV_MOUNT = "tessera-audit"
HMAC_KEY_PATH = "hmac-key"
KEY_TYPE = "ed25519"
AUDIT_WRITERS: tuple[str, ...] = (
    "coordinator",
    "policy",
    "tool-proxy",
    "registry",
    "audit-reader",
    "console",
    "creds-rotation",
)
"""Identities that write an audit chain (``creds-rotation``: `tessera creds rotate`, which
signs with the operator's root token)."""

_KV_READY_TIMEOUT_S = 15.0
_HTTP_TIMEOUT_S = 10


def _data(resp: Any) -> Mapping[str, Any]:
    if isinstance(resp, Mapping):
        inner = resp.get("data")
        return inner if isinstance(inner, Mapping) else resp
    raise VaultError("unexpected response shape from vault")


# -- bootstrap (sync: called from tessera.vault.bootstrap.apply) ---------------------------


def ensure_audit_keys(client: hvac.Client, writers: Iterable[str] = AUDIT_WRITERS) -> None:
    """Enable Transit and the audit KV mount when missing, create each writer's signing
    key and the HMAC key when missing. Idempotent; never replaces an existing key.

    Raises:
        VaultConfigError: a mount or key exists with the wrong type.
    """
    mounts = _data(_retry.call_sync("list_mounts", client.sys.list_mounted_secrets_engines))
    _ensure_mount(client, mounts, TRANSIT_MOUNT, "transit", {})
    created_kv = _ensure_mount(client, mounts, AUDIT_KV_MOUNT, "kv", {"version": "2"})
    if created_kv:
        _wait_kv_ready(client)
    for writer in writers:
        ensure_signing_key(client, key_name_for(writer))
    _ensure_hmac_key(client)


def _ensure_mount(
    client: hvac.Client,
    mounts: Mapping[str, Any],
    path: str,
    kind: str,
    options: Mapping[str, str],
) -> bool:
    existing = mounts.get(f"{path}/")
    if existing is not None:
        version = str((existing.get("options") or {}).get("version", "1"))
        if existing.get("type") != kind or (options.get("version", version) != version):
            raise VaultConfigError(
                f"mount {path}/ exists with type {existing.get('type')!r} "
                f"(version {version!r}); the audit trail needs {kind!r} {dict(options)}"
            )
        return False
    _retry.call_sync(
        f"enable_{path}",
        lambda: client.sys.enable_secrets_engine(
            kind,
            path=path,
            options=dict(options) or None,
            description="Tessera audit: checkpoint signing keys and the HMAC key",
        ),
    )
    log.info("vault_mount_enabled", mount=path, type=kind)
    return True


def _wait_kv_ready(client: hvac.Client) -> None:
    # A freshly enabled KV v2 mount refuses requests until its upgrade finishes.
    deadline = time.monotonic() + _KV_READY_TIMEOUT_S
    while True:
        try:
            client.secrets.kv.v2.read_configuration(mount_point=AUDIT_KV_MOUNT)
            return
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath, *_retry.RETRYABLE):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def ensure_signing_key(client: hvac.Client, name: str) -> None:
    transit = client.secrets.transit
    try:
        key = _retry.call_sync(
            f"read_key:{name}", partial(transit.read_key, name=name, mount_point=TRANSIT_MOUNT)
        )
    except hvac.exceptions.InvalidPath:
        key = None
    if key is not None:
        kind = _data(key).get("type")
        if kind != KEY_TYPE:
            raise VaultConfigError(f"transit key {name} exists with type {kind!r}, not {KEY_TYPE}")
        return
    _retry.call_sync(
        f"create_key:{name}",
        partial(
            transit.create_key,
            name=name,
            key_type=KEY_TYPE,
            exportable=False,
            mount_point=TRANSIT_MOUNT,
        ),
    )
    log.info("vault_audit_signing_key_created", key=name)


def _ensure_hmac_key(client: hvac.Client) -> None:
    kv = client.secrets.kv.v2
    try:
        _retry.call_sync(
            "read_hmac_key_metadata",
            partial(kv.read_secret_metadata, path=HMAC_KEY_PATH, mount_point=AUDIT_KV_MOUNT),
        )
        return
    except hvac.exceptions.InvalidPath:
        pass
    try:
        # cas=0: write only if it still does not exist (two bootstraps racing keep one).
        _retry.call_sync(
            "seed_hmac_key",
            partial(
                kv.create_or_update_secret,
                path=HMAC_KEY_PATH,
                secret={"key": base64.b64encode(secrets.token_bytes(32)).decode()},
                cas=0,
                mount_point=AUDIT_KV_MOUNT,
            ),
        )
    except hvac.exceptions.InvalidRequest:
        return  # written by a concurrent bootstrap
    log.info("vault_audit_hmac_key_seeded")


def rotate_signing_keys(
    client: hvac.Client, writers: Iterable[str] = AUDIT_WRITERS
) -> dict[str, int]:
    """Add a version to each writer's signing key; key name -> the new latest version.
    Writers sign with the latest version from their next checkpoint on; no restart."""
    rotated: dict[str, int] = {}
    transit = client.secrets.transit
    for writer in writers:
        name = key_name_for(writer)
        _retry.call_sync(
            f"rotate_key:{name}",
            partial(transit.rotate_key, name=name, mount_point=TRANSIT_MOUNT),
        )
        key = _retry.call_sync(
            f"read_key:{name}", partial(transit.read_key, name=name, mount_point=TRANSIT_MOUNT)
        )
        rotated[name] = int(_data(key).get("latest_version") or 0)
        log.info("vault_audit_signing_key_rotated", key=name, version=rotated[name])
    return rotated


# -- public keys -------------------------------------------------------------------------


def read_public_keys_sync(client: hvac.Client) -> PublicKeys:
    """Every version of every ``audit-*`` Transit key's public key.

    Raises:
        VaultPermissionDenied: this token may not list or read the keys.
        VaultUnavailable: Vault unreachable.
    """
    transit = client.secrets.transit
    try:
        listed = _retry.call_sync(
            "list_transit_keys", partial(transit.list_keys, mount_point=TRANSIT_MOUNT)
        )
    except hvac.exceptions.InvalidPath:
        return PublicKeys()
    except hvac.exceptions.Forbidden as exc:
        raise VaultPermissionDenied("may not list the audit signing keys") from exc
    names = [n for n in _data(listed).get("keys") or () if str(n).startswith(KEY_PREFIX)]
    keys: dict[str, dict[int, bytes]] = {}
    algorithms: dict[str, str] = {}
    for name in names:
        try:
            resp = _retry.call_sync(
                f"read_key:{name}",
                partial(transit.read_key, name=name, mount_point=TRANSIT_MOUNT),
            )
        except hvac.exceptions.Forbidden as exc:
            raise VaultPermissionDenied(f"may not read the public keys of {name}") from exc
        data = _data(resp)
        algorithms[name] = str(data.get("type"))
        versions: dict[int, bytes] = {}
        for version, info in (data.get("keys") or {}).items():
            public = info.get("public_key") if isinstance(info, Mapping) else None
            if public:
                versions[int(version)] = base64.b64decode(public)
        keys[name] = versions
    return PublicKeys(keys, algorithms)


async def read_public_keys(addr: str, token: str, *, timeout_s: float = 5.0) -> PublicKeys:
    """:func:`read_public_keys_sync` off the event loop, with its own short-lived client."""

    def read() -> PublicKeys:
        client = hvac.Client(url=addr, token=token, timeout=timeout_s)
        try:
            return read_public_keys_sync(client)
        finally:
            client.adapter.close()

    return await asyncio.to_thread(read)


async def read_public_keys_as(vault: VaultClient) -> PublicKeys:
    """:func:`read_public_keys_sync` with a service's own Vault login (its policy must
    allow listing and reading ``transit/keys/audit-*``)."""
    return await vault._call_own("read audit public keys", read_public_keys_sync)


# -- signing -------------------------------------------------------------------------------

_Call = Callable[[str, Callable[[hvac.Client], Any]], Awaitable[Any]]


class TransitSigner:
    """Signs checkpoint payloads with Transit key ``key_name`` (a
    :class:`tessera.audit.Signer`). Vault refuses (``VaultPermissionDenied``) when the
    identity's policy does not allow that key."""

    def __init__(self, call: _Call, key_name: str, *, close: Callable[[], None] | None = None):
        self._call = call
        self._key_name = key_name
        self._close = close

    @classmethod
    def for_client(cls, vault: VaultClient, *, identity: str | None = None) -> TransitSigner:
        """Sign as the AppRole identity ``vault`` is logged in as (its own key)."""
        key = key_name_for(identity or vault.identity)
        # The client's own-token call: retried, and re-logged-in on a lost token.
        return cls(vault._call_own, key)

    @classmethod
    def with_token(
        cls, addr: str, token: str, identity: str, *, timeout_s: float = 5.0, attempts: int = 3
    ) -> TransitSigner:
        """Sign with a plain token (the operator's, for `tessera creds rotate`)."""
        client = hvac.Client(url=addr, token=token, timeout=timeout_s)

        async def call(what: str, fn: Callable[[hvac.Client], Any]) -> Any:
            return await _retry.call_async(what, lambda: fn(client), attempts=attempts)

        return cls(call, key_name_for(identity), close=client.adapter.close)

    @property
    def key_name(self) -> str:
        return self._key_name

    def close(self) -> None:
        if self._close is not None:
            self._close()

    async def sign(self, payload: bytes) -> Signature:
        name = self._key_name
        encoded = base64.b64encode(payload).decode()
        try:
            resp = await self._call(
                f"transit_sign:{name}",
                lambda c: c.secrets.transit.sign_data(
                    name=name, hash_input=encoded, mount_point=TRANSIT_MOUNT
                ),
            )
        except hvac.exceptions.Forbidden as exc:
            raise VaultPermissionDenied(f"may not sign with {name}") from exc
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath) as exc:
            raise VaultError(f"transit refused to sign with {name}") from exc
        return _parse_signature(name, str(_data(resp).get("signature", "")))


def _parse_signature(key_name: str, value: str) -> Signature:
    """``vault:v<version>:<base64>`` (OpenBao and Vault answer the same)."""
    parts = value.split(":")
    if len(parts) != 3 or not parts[1].startswith("v") or not parts[1][1:].isdigit():
        raise VaultError("unexpected signature format from transit")
    return Signature(
        key_name=key_name,
        key_version=int(parts[1][1:]),
        algorithm=KEY_TYPE,
        signature=base64.b64decode(parts[2]),
    )


# -- the HMAC key ------------------------------------------------------------------------


async def read_hmac_key(vault: VaultClient) -> bytes:
    """The audit HMAC key (raw bytes) as ``vault``'s identity may read it.

    Raises:
        VaultPermissionDenied: this identity may not read it.
        VaultConfigError: it does not exist (run the bootstrap) or is malformed.
        VaultUnavailable: Vault unreachable.
    """
    try:
        resp = await vault._call_own(
            "read_audit_hmac_key",
            lambda c: c.secrets.kv.v2.read_secret_version(
                path=HMAC_KEY_PATH, mount_point=AUDIT_KV_MOUNT, raise_on_deleted_version=True
            ),
        )
    except hvac.exceptions.Forbidden as exc:
        raise VaultPermissionDenied(f"{vault.identity!r} may not read the audit HMAC key") from exc
    except hvac.exceptions.InvalidPath as exc:
        raise VaultConfigError("no audit HMAC key in Vault: run `tessera vault bootstrap`") from exc
    try:
        key = base64.b64decode(resp["data"]["data"]["key"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise VaultConfigError("the audit HMAC key in Vault is malformed") from exc
    if len(key) < 16:
        raise VaultConfigError("the audit HMAC key in Vault is too short")
    return key
