"""The service side of Vault: an AppRole-authenticated, self-renewing async client.

hvac is synchronous; every call runs in a worker thread (``asyncio.to_thread``) so the event
loop never blocks on Vault. Connection errors and 5xx answers are retried a bounded number of
times with jittered backoff, then raised as :class:`~tessera.vault.errors.VaultUnavailable`
(callers fail closed).

Typical use::

    vault = await VaultClient.from_approle_file(addr, secrets_dir / "coordinator.approle.json")
    try:
        task_token = await vault.create_task_token(
            tools=["billing.issue_refund"], ttl_s=300, num_uses=4,
            meta={"workflow": wf_id, "task": task_id, "agent": "billing"},
        )
    finally:
        await vault.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters
import structlog

from tessera.vault import _retry
from tessera.vault.errors import (
    InvalidToken,
    ToolSecretNotFound,
    VaultError,
    VaultPermissionDenied,
    VaultUnavailable,
)
from tessera.vault.naming import (
    APPROLE_MOUNT,
    TASK_TOKEN_ROLE,
    TOOL_SECRETS_MOUNT,
    tool_policy_name,
    tool_slug,
)
from tessera.vault.tokens import (
    IssuedCertificate,
    TaskToken,
    TokenInfo,
    ToolSecret,
    expires_in,
)

__all__ = ["VaultClient"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

_RENEW_AT = 2 / 3
"""Renew (or log in again) when this fraction of the token's TTL has elapsed."""
_MIN_REFRESH_DELAY_S = 0.2
_MAX_FAILURE_DELAY_S = 5.0
# Vault and OpenBao tokens are printable ASCII without separators; anything else is refused
# before it reaches an HTTP header (and before it could end up in an error message).
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._\-]{1,1024}$")
_ACCESSOR_RE = re.compile(r"^[A-Za-z0-9._\-]{1,256}$")


class _SourceAddressAdapter(requests.adapters.HTTPAdapter):
    """Connections that leave from one local IP (``source_address``)."""

    def __init__(self, source_address: str) -> None:
        self._source = (source_address, 0)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = self._source
        super().init_poolmanager(*args, **kwargs)


def _read_approle_file(path: Path) -> tuple[str, str]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        role_id, secret_id = content["role_id"], content["secret_id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VaultError(f"cannot read AppRole credentials from {path}") from exc
    if not isinstance(role_id, str) or not isinstance(secret_id, str):
        raise VaultError(f"invalid AppRole credentials in {path}")
    return role_id, secret_id


def _errors_text(exc: hvac.exceptions.VaultError) -> str:
    errors = exc.errors if isinstance(exc.errors, list) else [exc.errors]
    return "; ".join(str(e).strip() for e in errors if e)


def _is_bad_token(exc: hvac.exceptions.VaultError) -> bool:
    """Vault says "bad token" about a token named in the request, not about the caller."""
    return "bad token" in _errors_text(exc)


def _check_token(token: str) -> None:
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise InvalidToken("malformed token")


class VaultClient:
    """An AppRole identity's connection to Vault, kept logged in until :meth:`close`.

    Create with :meth:`from_approle_file`. A background task renews the token at ~2/3 of
    its TTL and logs in again (re-reading the credentials file, so a rotated secret_id is
    picked up) when renewal is refused, the token expired or its max TTL is near. The
    token is not revoked on close: task tokens are its children and must outlive a replica.

    Safe to share between tasks. ``repr`` never shows a token or secret_id.
    """

    def __init__(
        self,
        addr: str,
        approle_path: Path,
        *,
        mount: str = APPROLE_MOUNT,
        timeout_s: float = 5.0,
        attempts: int = 3,
        source_address: str = "",
    ) -> None:
        """Prefer :meth:`from_approle_file`, which also logs in and starts renewal.

        ``source_address``: the local IP every request to Vault leaves from ("" lets the OS
        choose). The tool proxy sets it, because task tokens are bound to its addresses.
        """
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self._addr = addr.rstrip("/")
        self._approle_path = approle_path
        self._mount = mount
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._session = requests.Session()
        if source_address:
            for prefix in ("http://", "https://"):
                self._session.mount(prefix, _SourceAddressAdapter(source_address))
        self._hvac = hvac.Client(url=self._addr, timeout=timeout_s, session=self._session)
        self._login_lock = asyncio.Lock()
        self._generation = 0
        self._accessor = ""
        self._policies: tuple[str, ...] = ()
        self._login_ttl_s = 0
        self._expires_mono = 0.0
        self._renewable = False
        self._maintainer: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def from_approle_file(
        cls,
        addr: str,
        path: Path | str,
        *,
        mount: str = APPROLE_MOUNT,
        timeout_s: float = 5.0,
        attempts: int = 3,
        source_address: str = "",
    ) -> Self:
        """Log in with the ``{"role_id", "secret_id"}`` JSON file at ``path``.

        Raises:
            VaultUnavailable: Vault unreachable after ``attempts`` tries.
            VaultPermissionDenied: the credentials were refused.
            VaultError: the file is missing or malformed.
        """
        client = cls(
            addr,
            Path(path),
            mount=mount,
            timeout_s=timeout_s,
            attempts=attempts,
            source_address=source_address,
        )
        try:
            await client._login()
        except BaseException:
            await client.close()
            raise
        client._maintainer = asyncio.create_task(
            client._maintain(), name=f"vault-token:{client.identity}"
        )
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop renewing and release connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
            self._maintainer = None
        self._session.close()

    @property
    def identity(self) -> str:
        """The identity name, derived from the credentials file name."""
        return self._approle_path.name.removesuffix(".approle.json")

    @property
    def accessor(self) -> str:
        """Accessor of the current token (changes after each login)."""
        return self._accessor

    @property
    def policies(self) -> tuple[str, ...]:
        """Policies of the current token."""
        return self._policies

    def __repr__(self) -> str:
        return (
            f"VaultClient(addr={self._addr!r}, identity={self.identity!r}, "
            f"policies={list(self._policies)!r})"
        )

    __str__ = __repr__

    # -- operations -----------------------------------------------------------------------

    async def lookup_self(self) -> TokenInfo:
        """What Vault says about this client's own token."""
        try:
            resp = await self._call_own("lookup_self", lambda c: c.auth.token.lookup_self())
        except hvac.exceptions.Forbidden as exc:
            raise VaultPermissionDenied("lookup-self refused") from exc
        return TokenInfo.from_lookup(resp["data"])

    async def create_task_token(
        self,
        *,
        tools: Sequence[str],
        ttl_s: int,
        num_uses: int,
        meta: Mapping[str, str],
    ) -> TaskToken:
        """Create a child token that may read exactly the secrets of ``tools``.

        Created through the ``tessera-task`` token role: not renewable, capped by the role's
        explicit max TTL (``expires_at`` reflects the TTL Vault actually granted), refused
        for any policy outside the role's allowed tool policies.

        Raises:
            ValueError: empty ``tools``, an invalid tool name, ``ttl_s`` or ``num_uses`` < 1,
                or a non-string ``meta`` value.
            VaultPermissionDenied: this identity may not use the role, or the role refused
                one of the tools (e.g. a tool missing from ``vault/tools.yaml``).
            VaultUnavailable: Vault unreachable.
        """
        if isinstance(tools, str) or not tools:
            raise ValueError("tools must be a non-empty sequence of tool names")
        if ttl_s < 1 or num_uses < 1:
            raise ValueError("ttl_s and num_uses must be >= 1 (task tokens are bounded)")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("meta keys and values must be strings")
        policies = sorted({tool_policy_name(tool) for tool in tools})
        meta_copy = dict(meta)
        try:
            resp = await self._call_own(
                "create_task_token",
                lambda c: c.auth.token.create(
                    role_name=TASK_TOKEN_ROLE,
                    policies=policies,
                    meta=meta_copy,
                    ttl=f"{ttl_s}s",
                    num_uses=num_uses,
                    no_default_policy=True,
                    renewable=False,
                ),
            )
        except hvac.exceptions.Forbidden as exc:
            raise VaultPermissionDenied(f"{self.identity!r} may not create task tokens") from exc
        except hvac.exceptions.InvalidRequest as exc:
            raise VaultPermissionDenied(
                f"token role refused the task token: {_errors_text(exc)}"
            ) from exc
        auth = resp["auth"]
        token = TaskToken(
            token=auth["client_token"],
            accessor=auth["accessor"],
            policies=tuple(sorted(auth.get("policies") or ())),
            expires_at=expires_in(int(auth["lease_duration"])),
            num_uses=int(auth.get("num_uses") or num_uses),
            meta=dict(auth.get("metadata") or meta_copy),
        )
        log.debug(
            "vault_task_token_created",
            policies=list(token.policies),
            ttl_s=int(auth["lease_duration"]),
            num_uses=token.num_uses,
            **{f"meta_{k}": v for k, v in meta_copy.items()},
        )
        return token

    async def revoke_accessor(self, accessor: str) -> None:
        """Revoke the token (and its children) behind ``accessor`` at once.

        Idempotent: an accessor that is already revoked or expired is not an error.

        Raises:
            VaultPermissionDenied: this identity may not revoke tokens.
            VaultUnavailable: Vault unreachable (the token is NOT known to be revoked).
        """
        if not isinstance(accessor, str) or not _ACCESSOR_RE.fullmatch(accessor):
            raise ValueError("malformed accessor")
        try:
            await self._call_own(
                "revoke_accessor", lambda c: c.auth.token.revoke_accessor(accessor)
            )
        except hvac.exceptions.Forbidden as exc:
            raise VaultPermissionDenied(f"{self.identity!r} may not revoke tokens") from exc
        except hvac.exceptions.InvalidRequest as exc:
            text = _errors_text(exc)
            # "token not found": the accessor is known but its token already expired or
            # was revoked (a race with its TTL or with another revocation).
            if "invalid accessor" not in text and "token not found" not in text:
                raise VaultError(f"revoke refused: {text}") from exc
            log.debug("vault_accessor_already_gone")
            return
        log.debug("vault_token_revoked")

    async def issue_certificate(
        self, *, mount: str, role: str, common_name: str, uri_sans: Sequence[str], ttl_s: int
    ) -> IssuedCertificate:
        """A fresh key pair and certificate from PKI role ``role`` (see tessera.vault.pki).

        Raises:
            VaultPermissionDenied: this identity may not issue from ``role``, or asked for a
                name the role does not allow.
            VaultUnavailable: Vault unreachable.
        """
        data = {
            "common_name": common_name,
            "uri_sans": ",".join(uri_sans),
            "ttl": f"{int(ttl_s)}s",
            "format": "pem",
            "private_key_format": "pkcs8",
            "exclude_cn_from_sans": False,
        }
        try:
            resp = await self._call_own(
                f"pki_issue:{role}", lambda c: c.write_data(f"{mount}/issue/{role}", data=data)
            )
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
            raise VaultPermissionDenied(
                f"{self.identity!r} may not issue {common_name!r} from {mount}/{role}: "
                f"{_errors_text(exc)}"
            ) from exc
        issued = resp["data"]
        chain = issued.get("ca_chain") or [issued["issuing_ca"]]
        return IssuedCertificate(
            certificate=issued["certificate"],
            private_key=issued["private_key"],
            ca_chain=tuple(chain),
            serial=issued["serial_number"],
            expiration=int(issued["expiration"]),
        )

    async def lookup_token(self, token: str) -> TokenInfo:
        """Look another token up (policies, meta, TTL left, uses left) without using it.

        Raises:
            InvalidToken: the token is malformed, unknown, expired, revoked or used up.
            VaultPermissionDenied: this identity may not look tokens up.
            VaultUnavailable: Vault unreachable.
        """
        _check_token(token)
        try:
            resp = await self._call_own("lookup_token", lambda c: c.auth.token.lookup(token))
        except hvac.exceptions.Forbidden as exc:
            if _is_bad_token(exc):
                raise InvalidToken("token is invalid, expired, revoked or used up") from None
            raise VaultPermissionDenied(f"{self.identity!r} may not look tokens up") from exc
        return TokenInfo.from_lookup(resp["data"])

    async def read_tool_secret(self, tool: str, *, token: str) -> ToolSecret:
        """Read ``tool``'s current secret WITH THE CALLER'S ``token`` (consumes one use).

        This client's own token is not used: Vault itself decides whether the task was
        scoped to this tool.

        Raises:
            ValueError: invalid tool name.
            InvalidToken: the token is malformed.
            VaultPermissionDenied: the token does not grant this tool (or is expired,
                revoked or used up: Vault does not say which).
            ToolSecretNotFound: the token grants the tool but no secret exists.
            VaultUnavailable: Vault unreachable.
        """
        slug = tool_slug(tool)
        _check_token(token)
        adapter = hvac.adapters.JSONAdapter(
            base_uri=self._addr, token=token, timeout=self._timeout_s, session=self._session
        )
        url = f"/v1/{TOOL_SECRETS_MOUNT}/data/{slug}"
        try:
            resp = await _retry.call_async(
                "read_tool_secret", lambda: adapter.get(url), attempts=self._attempts
            )
        except hvac.exceptions.Forbidden as exc:
            raise VaultPermissionDenied(f"token may not read the secret of {tool!r}") from exc
        except hvac.exceptions.InvalidPath as exc:
            raise ToolSecretNotFound(f"no secret stored for {tool!r}") from exc
        data = resp["data"]
        metadata = data.get("metadata") or {}
        created = metadata.get("created_time")
        return ToolSecret(
            tool=tool,
            version=int(metadata.get("version") or 0),
            data=dict(data.get("data") or {}),
            created_time=datetime.fromisoformat(created) if created else None,
        )

    # -- token lifecycle ------------------------------------------------------------------

    async def _call_own(self, what: str, fn: Callable[[hvac.Client], T]) -> T:
        """Run ``fn`` with this client's token; on a 403 caused by our own token having
        died (expired, revoked), log in once more and retry once."""
        hv = self._hvac
        seen = self._generation
        try:
            return await _retry.call_async(what, lambda: fn(hv), attempts=self._attempts)
        except hvac.exceptions.Forbidden as exc:
            if _is_bad_token(exc) or await self._own_token_alive():
                raise
        log.info("vault_token_lost", identity=self.identity, operation=what)
        await self._relogin(seen)
        return await _retry.call_async(what, lambda: fn(hv), attempts=self._attempts)

    async def _own_token_alive(self) -> bool:
        try:
            await _retry.call_async(
                "lookup_self", self._hvac.auth.token.lookup_self, attempts=self._attempts
            )
        except hvac.exceptions.Forbidden:
            return False
        return True

    async def _login(self) -> None:
        path, mount, hv = self._approle_path, self._mount, self._hvac

        def login() -> dict[str, Any]:
            role_id, secret_id = _read_approle_file(path)
            result: dict[str, Any] = hv.auth.approle.login(
                role_id=role_id, secret_id=secret_id, use_token=False, mount_point=mount
            )
            return result

        try:
            resp = await _retry.call_async("approle_login", login, attempts=self._attempts)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise VaultPermissionDenied(
                f"AppRole login refused for {self.identity!r}: {_errors_text(exc)}"
            ) from exc
        auth = resp["auth"]
        ttl = int(auth["lease_duration"])
        hv.token = auth["client_token"]
        self._accessor = auth["accessor"]
        self._policies = tuple(sorted(auth.get("policies") or ()))
        self._login_ttl_s = ttl
        self._expires_mono = time.monotonic() + ttl
        self._renewable = bool(auth.get("renewable"))
        self._generation += 1
        log.info(
            "vault_logged_in", identity=self.identity, policies=list(self._policies), ttl_s=ttl
        )

    async def _relogin(self, seen_generation: int | None = None) -> None:
        async with self._login_lock:
            if seen_generation is not None and seen_generation != self._generation:
                return  # another task already logged in again
            await self._login()

    async def _refresh(self) -> None:
        """Renew the token; log in again if that is refused or hits the max TTL."""
        if self._renewable and time.monotonic() < self._expires_mono:
            seen = self._generation
            try:
                resp = await _retry.call_async(
                    "renew_self", self._hvac.auth.token.renew_self, attempts=self._attempts
                )
            except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
                log.info(
                    "vault_token_renew_refused", identity=self.identity, error=type(exc).__name__
                )
            else:
                lease = int(resp["auth"]["lease_duration"])
                if seen == self._generation and lease + 1 >= self._login_ttl_s:
                    self._expires_mono = time.monotonic() + lease
                    log.debug("vault_token_renewed", identity=self.identity, ttl_s=lease)
                    return
                # Capped by the max TTL: switch to a fresh token while the old one (and the
                # task tokens created under it) still has a third of its TTL to live.
                log.info("vault_token_max_ttl_near", identity=self.identity, ttl_s=lease)
        await self._relogin()

    async def _maintain(self) -> None:
        failures = 0
        while True:
            if failures:
                delay = min(
                    _MAX_FAILURE_DELAY_S,
                    _MIN_REFRESH_DELAY_S + _retry.backoff_s(failures, base_s=0.5, cap_s=5.0),
                )
            else:
                remaining = self._expires_mono - time.monotonic()
                delay = max(_MIN_REFRESH_DELAY_S, remaining * _RENEW_AT)
            await asyncio.sleep(delay)
            try:
                await self._refresh()
                failures = 0
            except (VaultError, VaultUnavailable, hvac.exceptions.VaultError) as exc:
                failures += 1
                log.warning(
                    "vault_token_refresh_failed",
                    identity=self.identity,
                    error=type(exc).__name__,
                    failures=failures,
                )
