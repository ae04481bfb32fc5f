"""People as code: ``vault/humans.yaml`` applied to OpenBao's identity store, and login.

Each user becomes a userpass login, an identity entity (with the alias that ties the login
to it) and a member of internal groups; one signing key and one role issue their identity
tokens: JWTs with ``preferred_username`` and ``groups`` claims that Envoy verifies at the
front door (``jwt_authn``, against the issuer's JWKS). This is OpenBao's OIDC identity
token API, standard HTTP only, so HashiCorp Vault works the same.

:func:`login` trades a user's password for an identity token and revokes the short Vault
token it used, so the only credential the user keeps is the JWT (which OpenBao signed and
cannot be used against OpenBao). Nothing here logs a password or a token.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tessera.runtime.private_files import write_private
from tessera.vault import _retry
from tessera.vault.errors import VaultConfigError, VaultError
from tessera.vault.naming import is_valid_identity_name

__all__ = [
    "HUMAN_POLICY",
    "HUMAN_ROLE",
    "USERPASS_MOUNT",
    "HumansSpec",
    "apply_humans",
    "issuer_of",
    "jwks_url_of",
    "load_humans",
    "login",
    "password_file",
]

log = structlog.get_logger(__name__)

USERPASS_MOUNT = "userpass"
HUMAN_ROLE = "human"
HUMAN_POLICY = "human-identity-token"
SIGNING_KEY = "tessera-humans"
_TEMPLATE = (
    '{"preferred_username": {{identity.entity.name}}, "groups": {{identity.entity.groups.names}}}'
)
# A login's own Vault token only fetches one identity token, then is revoked.
_LOGIN_TOKEN_TTL = "2m"
_HTTP_TIMEOUT_S = 10


class _Token(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audience: str = Field(min_length=1, max_length=128)
    ttl: str = "1h"
    key_rotation: str = "24h"


class _User(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    groups: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_valid_identity_name(value):
            raise ValueError(f"{value!r} is not a valid user name (lowercase, digits, '-')")
        return value


class HumansSpec(BaseModel):
    """``vault/humans.yaml``."""

    model_config = ConfigDict(extra="forbid")
    token: _Token
    groups: dict[str, str]
    users: list[_User]

    def members(self, group: str) -> list[str]:
        return [u.name for u in self.users if group in u.groups]


def load_humans(vault_dir: Path) -> HumansSpec | None:
    """The spec, or None when the directory has no ``humans.yaml`` (no human identity).

    Raises:
        VaultConfigError: the file is invalid or a user names an undeclared group.
    """
    path = vault_dir / "humans.yaml"
    if not path.is_file():
        return None
    try:
        spec = HumansSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise VaultConfigError(f"invalid {path}: {exc}") from exc
    for user in spec.users:
        unknown = sorted(set(user.groups) - set(spec.groups))
        if unknown:
            raise VaultConfigError(f"{path}: user {user.name!r} is in undeclared groups {unknown}")
    names = [u.name for u in spec.users]
    if len(names) != len(set(names)):
        raise VaultConfigError(f"{path}: a user is listed twice")
    return spec


def issuer_of(vault_addr: str) -> str:
    """The ``iss`` of identity tokens from the OpenBao at ``vault_addr``."""
    return vault_addr.rstrip("/") + "/v1/identity/oidc"


def jwks_url_of(vault_addr: str) -> str:
    """Where that issuer publishes its public keys (no token needed)."""
    return issuer_of(vault_addr) + "/.well-known/keys"


def password_file(secrets_dir: Path, user: str) -> Path:
    return secrets_dir / "humans" / f"{user}.password"


@dataclass(frozen=True)
class _Ids:
    accessor: str
    entities: dict[str, str]


def apply_humans(
    client: hvac.Client,
    spec: HumansSpec,
    *,
    vault_addr: str,
    secrets_dir: Path,
) -> None:
    """Bring OpenBao's identity store in line with ``spec`` (idempotent). A user keeps
    the password of its file when it has one; a new user gets a random one."""
    _call("identity token issuer", lambda: client.write("identity/oidc/config", issuer=vault_addr))
    _call(
        "identity token key",
        lambda: client.write(
            f"identity/oidc/key/{SIGNING_KEY}",
            algorithm="RS256",
            rotation_period=spec.token.key_rotation,
            verification_ttl=spec.token.ttl,
            allowed_client_ids=spec.token.audience,
        ),
    )
    _call(
        "identity token role",
        lambda: client.write(
            f"identity/oidc/role/{HUMAN_ROLE}",
            key=SIGNING_KEY,
            ttl=spec.token.ttl,
            client_id=spec.token.audience,
            template=_TEMPLATE,
        ),
    )
    policy = f'path "identity/oidc/token/{HUMAN_ROLE}" {{\n  capabilities = ["read"]\n}}\n'
    _call("human policy", lambda: client.sys.create_or_update_policy(HUMAN_POLICY, policy))
    ids = _Ids(accessor=_ensure_userpass(client), entities={})
    for user in spec.users:
        path = password_file(secrets_dir, user.name)
        password = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
        if not password:
            password = secrets.token_urlsafe(18)
            write_private(path, password)
        _call(
            f"user {user.name}",
            lambda u=user.name, p=password: client.write(
                f"auth/{USERPASS_MOUNT}/users/{u}",
                password=p,
                token_policies=HUMAN_POLICY,
                token_ttl=_LOGIN_TOKEN_TTL,
                token_max_ttl=_LOGIN_TOKEN_TTL,
            ),
        )
        ids.entities[user.name] = _ensure_entity(client, user.name, ids.accessor)
    for group in spec.groups:
        members = [ids.entities[name] for name in spec.members(group)]
        _call(
            f"group {group}",
            lambda g=group, m=members: client.write(
                f"identity/group/name/{g}", type="internal", member_entity_ids=m
            ),
        )
    log.info("vault_humans_applied", users=len(spec.users), groups=len(spec.groups))


def _call(what: str, fn: Any) -> Any:
    try:
        return _retry.call_sync(what, fn)
    except hvac.exceptions.VaultError as exc:
        raise VaultError(f"vault refused {what}: {exc}") from exc


def _ensure_userpass(client: hvac.Client) -> str:
    methods = _call("list auth methods", client.sys.list_auth_methods)
    mounts = methods.get("data", methods)
    if f"{USERPASS_MOUNT}/" not in mounts:
        _call(
            "enable userpass",
            lambda: client.sys.enable_auth_method("userpass", path=USERPASS_MOUNT),
        )
        methods = _call("list auth methods", client.sys.list_auth_methods)
        mounts = methods.get("data", methods)
    mount = mounts[f"{USERPASS_MOUNT}/"]
    if mount.get("type") != "userpass":
        raise VaultConfigError(f"auth mount {USERPASS_MOUNT}/ exists with type {mount.get('type')}")
    return str(mount["accessor"])


def _ensure_entity(client: hvac.Client, name: str, accessor: str) -> str:
    _call(f"entity {name}", lambda: client.write(f"identity/entity/name/{name}"))
    entity = _call(f"entity {name}", lambda: client.read(f"identity/entity/name/{name}"))
    entity_id = str(entity["data"]["id"])
    aliases = entity["data"].get("aliases") or []
    if not any(a.get("mount_accessor") == accessor and a.get("name") == name for a in aliases):
        _call(
            f"alias {name}",
            lambda: client.write(
                "identity/entity-alias", name=name, canonical_id=entity_id, mount_accessor=accessor
            ),
        )
    return entity_id


def login(
    vault_addr: str, user: str, password: str, *, role: str = HUMAN_ROLE, timeout_s: float = 10.0
) -> str:
    """The identity token (a JWT) of ``user``, issued by ``role``.

    Raises:
        VaultError: wrong user or password (no detail: a login failure says nothing about
            which of the two was wrong), or the server refused.
        VaultUnavailable: OpenBao could not be reached (after bounded retries).
    """
    client = hvac.Client(url=vault_addr, timeout=timeout_s)
    try:
        try:
            auth = _retry.call_sync(
                "login",
                lambda: client.auth.userpass.login(
                    username=user, password=password, mount_point=USERPASS_MOUNT
                ),
            )
        except hvac.exceptions.InvalidRequest as exc:
            raise VaultError(f"login as {user!r} refused: wrong user name or password") from exc
        client.token = auth["auth"]["client_token"]
        try:
            issued = _call("identity token", lambda: client.read(f"identity/oidc/token/{role}"))
        finally:
            # The login's Vault token has done its one job; it must not outlive the call.
            try:
                client.auth.token.revoke_self()
            except (hvac.exceptions.VaultError, OSError):
                log.warning("login_token_not_revoked", user=user, expires_in=_LOGIN_TOKEN_TTL)
        return str(issued["data"]["token"])
    finally:
        client.adapter.close()
