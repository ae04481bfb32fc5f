"""ConsoleService RPCs: the console's files, and people's sessions."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Any

import grpc
import structlog
from google.api import httpbody_pb2
from google.protobuf import timestamp_pb2

from services.console.assets import Assets
from services.console.sessions import FailedLogins, clear_cookie, session_cookie
from services.console.settings import ConsoleSettings
from tessera.audit import AuditWriter
from tessera.runtime.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from tessera.runtime.principal import principal_of
from tessera.v1 import audit_pb2, console_pb2, console_pb2_grpc
from tessera.vault.errors import VaultError, VaultUnavailable
from tessera.vault.humans import login
from tessera.vault.naming import is_valid_identity_name

log = structlog.get_logger(__name__)

MAX_PASSWORD_CHARS = 1024
MAX_PATH_CHARS = 256


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def token_claims(token: str) -> dict[str, Any]:
    """The payload of an identity token the issuer just signed for us (read, not
    verified: Envoy verifies it on every later request)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, binascii.Error, ValueError) as exc:
        raise Unavailable(
            "the issuer answered an unreadable token", reason="ISSUER_INVALID"
        ) from exc
    if not isinstance(claims, dict):
        raise Unavailable("the issuer answered an unreadable token", reason="ISSUER_INVALID")
    return claims


class ConsoleServicer(console_pb2_grpc.ConsoleServiceServicer):
    def __init__(
        self, settings: ConsoleSettings, assets: Assets, audit: AuditWriter | None = None
    ) -> None:
        self.settings = settings
        self.assets = assets
        self.audit = audit
        self.failed_logins = FailedLogins(
            settings.failed_logins_per_user, settings.failed_login_window_s
        )

    @property
    def issuer(self) -> str:
        return self.settings.issuer_addr or self.settings.vault_addr

    async def GetAsset(
        self, request: console_pb2.GetAssetRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        asset = None
        if len(request.path) <= MAX_PATH_CHARS:
            asset = self.assets.get(request.path)
        if asset is None:
            raise NotFound("no such page", reason="ASSET_NOT_FOUND")
        # Pages change with a release, never per person: revalidate, do not re-download.
        await context.send_initial_metadata((("cache-control", "no-cache"),))
        return httpbody_pb2.HttpBody(content_type=asset.content_type, data=asset.data)

    async def CreateSession(
        self, request: console_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> console_pb2.CreateSessionResponse:
        violations = []
        if not is_valid_identity_name(request.user):
            violations.append(("user", "a user name: lowercase letters, digits and '-'"))
        if not request.password:
            violations.append(("password", "required"))
        elif len(request.password) > MAX_PASSWORD_CHARS:
            violations.append(("password", f"at most {MAX_PASSWORD_CHARS} characters"))
        if violations:
            await self._refused("LOGIN_INVALID", request.user)
            raise InvalidArgument("the login is incomplete", field_violations=violations)
        wait = self.failed_logins.blocked(request.user)
        if wait > 0:
            await self._refused("LOGIN_THROTTLED", request.user)
            raise ResourceExhausted(
                "too many failed logins for this user; try again later",
                reason="LOGIN_THROTTLED",
                metadata={"retry_after_s": f"{wait:.0f}"},
            )
        timeout = min(self.settings.login_timeout_s, context.time_remaining() or 1e9)
        try:
            token = await asyncio.wait_for(
                asyncio.to_thread(
                    login,
                    self.issuer,
                    request.user,
                    request.password,
                    role=self.settings.login_role,
                    timeout_s=timeout,
                ),
                timeout,
            )
        except (VaultUnavailable, TimeoutError) as exc:
            log.warning("login_issuer_unavailable", user=request.user)
            raise Unavailable(
                "the identity issuer cannot be reached; try again", reason="ISSUER_UNAVAILABLE"
            ) from exc
        except VaultError as exc:
            self.failed_logins.failed(request.user)
            log.info("login_refused", user=request.user)
            await self._refused("LOGIN_REFUSED", request.user)
            raise Unauthenticated("wrong user name or password", reason="LOGIN_REFUSED") from exc
        self.failed_logins.succeeded(request.user)
        claims = token_claims(token)
        expire_time = float(claims.get("exp") or time.time())
        cookie = session_cookie(
            self.settings.cookie_name,
            token,
            expire_time=expire_time,
            secure=self.settings.cookie_secure,
        )
        await context.send_initial_metadata((("set-cookie", cookie), ("cache-control", "no-store")))
        log.info("login", user=request.user)
        groups = claims.get(self.settings.human_groups_claim) or []
        return console_pb2.CreateSessionResponse(
            session=console_pb2.Session(
                user=str(claims.get(self.settings.human_subject_claim) or request.user),
                groups=[g for g in groups if isinstance(g, str)],
                expire_time=_timestamp(expire_time),
            )
        )

    async def _refused(self, reason: str, user: str) -> None:
        """A refused login on the console's chain: which user name, never the password.
        The login is refused either way; a record that cannot be written is logged."""
        if self.audit is None:
            return
        shown = user if is_valid_identity_name(user) else "(not a user name)"
        try:
            await self.audit.append(
                audit_pb2.AUDIT_KIND_REQUEST_REJECTED,
                outcome=reason,
                resource="console/session",
                details={"user": shown, "reason": reason},
            )
        except Exception as exc:
            log.error("login_refusal_unaudited", reason=reason, error=repr(exc))

    async def GetSession(
        self, request: console_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> console_pb2.GetSessionResponse:
        principal = principal_of(
            context,
            subject_claim=self.settings.human_subject_claim,
            groups_claim=self.settings.human_groups_claim,
        )
        if principal.kind != "user":
            raise Unauthenticated("no session: log in", reason="NO_SESSION")
        await context.send_initial_metadata((("cache-control", "no-store"),))
        session = console_pb2.Session(user=principal.id, groups=sorted(principal.groups))
        if principal.expire_time:
            session.expire_time.CopyFrom(_timestamp(principal.expire_time))
        return console_pb2.GetSessionResponse(session=session)

    async def DeleteSession(
        self, request: console_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> console_pb2.DeleteSessionResponse:
        cookie = clear_cookie(self.settings.cookie_name, secure=self.settings.cookie_secure)
        await context.send_initial_metadata((("set-cookie", cookie), ("cache-control", "no-store")))
        return console_pb2.DeleteSessionResponse()
