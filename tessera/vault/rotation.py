"""Rotate credentials while traffic flows: AppRole secret_ids and tool secrets (KV v2).

Every rotation has two phases, so that nothing a running service depends on disappears:

1. **issue** — AppRole: a new secret_id is generated, proved by a test login (whose token is
   revoked at once), written to ``<secrets_dir>/<identity>.approle.json`` atomically (temp
   file + rename, mode 0600) and read back with the same parser :class:`VaultClient` uses.
   Tool: a new KV v2 version with a fresh random ``api_key`` (other fields kept), written
   with check-and-set on the version just read, then read back.
2. **retire**, after ``grace_s`` — AppRole: the secret_ids that existed before phase 1 are
   destroyed by accessor. Tool: every older, not yet destroyed version is destroyed.

Why the grace period is enough (see vault/README.md, "Rotation"): a token obtained with a
secret_id outlives it (Vault keeps it valid and renewable until its own max TTL), and
:class:`VaultClient` re-reads the credentials file at every login. Once the file is
replaced, the old secret_id is needed only by a login that read the file just before the
rename: ``grace_s`` must cover one login's retries (a few seconds). For tools, the tool proxy
serves a secret from memory for ``secret_cache_ttl_s`` (30 s) and reads the *current*
version otherwise; destroying older versions never fails a call, and waiting ≥ that TTL
means every replica has switched to the new key before the old one is gone from Vault.

:func:`rotate` runs phase 1 for every target, waits ``grace_s`` once, then phase 2 for
every target; each step is audited (``AUDIT_KIND_CREDENTIAL_ROTATED``) when an
:class:`~tessera.audit.AuditWriter` is given. Never a secret_id, an accessor, a token or a
secret value in a log line or an audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import hvac
import hvac.exceptions
import structlog

from tessera.runtime.errors import Unavailable
from tessera.runtime.private_files import write_private
from tessera.v1 import audit_pb2
from tessera.vault.bootstrap import _call, _new_secret_id, _prepare_secrets_dir
from tessera.vault.client import _read_approle_file
from tessera.vault.errors import VaultError
from tessera.vault.naming import (
    APPROLE_MOUNT,
    TOOL_SECRETS_MOUNT,
    is_valid_identity_name,
    tool_slug,
)

__all__ = [
    "DEFAULT_GRACE_S",
    "AuditSink",
    "Rotation",
    "Target",
    "audit_writer",
    "credentials_lock",
    "discover_targets",
    "rotate",
    "rotate_sync",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_GRACE_S = 35.0
"""Default wait between issuing and retiring: above the tool proxy's 30 s secret cache and
far above one AppRole login's retry window (VaultClient: 3 attempts x 5 s)."""

_HTTP_TIMEOUT_S = 10
_CAS_ATTEMPTS = 5
AUDIT_WRITER = "creds-rotation"
AUDIT_ACTOR = "tessera-creds"

Kind = Literal["approle", "tool"]


@dataclass(frozen=True, order=True)
class Target:
    """What to rotate: ``Target("approle", "tool-proxy")`` or ``Target("tool", "kb.search")``."""

    kind: Kind
    name: str

    def __post_init__(self) -> None:
        if self.kind == "approle":
            if not is_valid_identity_name(self.name):
                raise ValueError(f"invalid identity name {self.name!r}")
        elif self.kind == "tool":
            tool_slug(self.name)  # validates
        else:
            raise ValueError(f"unknown rotation kind {self.kind!r}")

    @property
    def resource(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class Rotation:
    """The outcome of one target's rotation (no secret material)."""

    target: Target
    new_version: int = 0
    """Tool: the new KV version. AppRole: 0 (secret_ids have no version)."""
    previous: int = 0
    """How many secret_ids / live KV versions existed before (to be retired)."""
    retired: int = 0
    """How many of them phase 2 destroyed (some may already have been gone)."""
    issued_at: float = 0.0
    retired_at: float = 0.0
    error: str = ""
    _old: tuple[str, ...] = field(default=(), repr=False)
    """AppRole: accessors to destroy; tool: versions to destroy (as strings)."""

    @property
    def ok(self) -> bool:
        return not self.error


class AuditSink(Protocol):
    async def append(
        self,
        kind: audit_pb2.AuditKind.ValueType,
        *,
        workflow_id: str = ...,
        task_id: str = ...,
        outcome: str = ...,
        resource: str = ...,
        decision_id: str = ...,
        details: Mapping[str, Any] | None = ...,
    ) -> Any: ...


# -- Vault helpers ------------------------------------------------------------------------


def _keys(resp: Any) -> list[str]:
    data = resp.get("data") if isinstance(resp, Mapping) else None
    keys = (data or {}).get("keys") if isinstance(data, Mapping) else None
    return [str(k) for k in keys or ()]


def _list(client: hvac.Client, path: str) -> list[str]:
    try:
        return _keys(_call(f"list:{path}", partial(client.adapter.list, f"/v1/{path}")))
    except hvac.exceptions.InvalidPath:
        return []


def discover_targets(
    client: hvac.Client, secrets_dir: Path, *, kinds: Sequence[Kind] = ("approle", "tool")
) -> list[Target]:
    """Every AppRole role whose credentials file is in ``secrets_dir`` and every secret in
    the ``tool-secrets/`` mount.

    Roles without a file here are left alone: their secret_ids are distributed by someone
    else, and retiring them would lock those deployments out at their next login.
    """
    targets: list[Target] = []
    if "approle" in kinds:
        for role in sorted(_list(client, f"auth/{APPROLE_MOUNT}/role")):
            role = role.rstrip("/")
            if (secrets_dir / f"{role}.approle.json").is_file() and is_valid_identity_name(role):
                targets.append(Target("approle", role))
            else:
                log.info("rotation_role_skipped", identity=role, reason="no credentials file")
    if "tool" in kinds:
        for slug in sorted(_list(client, f"{TOOL_SECRETS_MOUNT}/metadata")):
            if slug.endswith("/"):
                continue
            targets.append(Target("tool", slug.replace("-", ".")))
    return targets


@contextlib.contextmanager
def credentials_lock(secrets_dir: Path) -> Iterator[None]:
    """One writer of a credentials directory at a time (rotation, `tessera vault bootstrap`);
    a second one waits. Creates the directory (0700) when missing, refuses a readable one."""
    _prepare_secrets_dir(secrets_dir)
    fd = os.open(secrets_dir / ".rotation.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- AppRole ------------------------------------------------------------------------------


def _issue_approle(client: hvac.Client, addr: str, rot: Rotation, secrets_dir: Path) -> None:
    identity = rot.target.name
    path = secrets_dir / f"{identity}.approle.json"
    old = tuple(_list(client, f"auth/{APPROLE_MOUNT}/role/{identity}/secret-id"))
    role_id, secret_id, accessor = _new_secret_id(client, identity, issued_by="tessera-rotation")
    try:
        _probe_login(client, addr, role_id, secret_id, identity)
        write_private(path, json.dumps({"role_id": role_id, "secret_id": secret_id}))
        if _read_approle_file(path) != (role_id, secret_id):
            raise VaultError(f"{path} does not hold the new credentials after the rename")
    except BaseException:
        # The new secret_id never reached (a readable) file: do not leave it valid.
        with contextlib.suppress(Exception):
            _destroy_accessor(client, identity, accessor)
        raise
    rot._old = tuple(a for a in old if a != accessor)
    rot.previous = len(rot._old)


def _probe_login(
    client: hvac.Client, addr: str, role_id: str, secret_id: str, identity: str
) -> None:
    """Log in with the new secret_id exactly as a service would, then revoke that token
    (by accessor with the operator's token: identity policies do not grant revoke-self)."""
    probe = hvac.Client(url=addr, timeout=_HTTP_TIMEOUT_S)
    try:
        try:
            resp = _call(
                f"probe_login:{identity}",
                lambda: probe.auth.approle.login(
                    role_id=role_id,
                    secret_id=secret_id,
                    use_token=False,
                    mount_point=APPROLE_MOUNT,
                ),
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise VaultError(f"the new secret_id of {identity!r} cannot log in") from exc
    finally:
        probe.adapter.close()
    accessor = resp["auth"]["accessor"]
    try:
        _call(
            f"probe_revoke:{identity}",
            lambda: client.auth.token.revoke_accessor(accessor),
        )
    except (hvac.exceptions.VaultError, VaultError) as exc:
        # Harmless (a token of that identity's own policy, expiring at its TTL), but say so.
        log.warning("rotation_probe_token_not_revoked", identity=identity, error=type(exc).__name__)


def _destroy_accessor(client: hvac.Client, identity: str, accessor: str) -> bool:
    try:
        _call(
            f"destroy_secret_id:{identity}",
            lambda: client.auth.approle.destroy_secret_id_accessor(
                role_name=identity, secret_id_accessor=accessor, mount_point=APPROLE_MOUNT
            ),
        )
    except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
        return False  # already gone (expired, or destroyed by someone else)
    return True


def _retire_approle(client: hvac.Client, rot: Rotation) -> None:
    rot.retired = sum(_destroy_accessor(client, rot.target.name, a) for a in rot._old)


# -- tool secrets -------------------------------------------------------------------------


def _live_versions(metadata: Mapping[str, Any]) -> list[int]:
    versions = metadata.get("versions") or {}
    return sorted(int(v) for v, info in versions.items() if not (info or {}).get("destroyed"))


def _issue_tool(client: hvac.Client, rot: Rotation) -> None:
    kv = client.secrets.kv.v2
    tool = rot.target.name
    slug = tool_slug(tool)
    for _attempt in range(_CAS_ATTEMPTS):
        try:
            metadata = _call(
                f"read_metadata:{tool}",
                partial(kv.read_secret_metadata, path=slug, mount_point=TOOL_SECRETS_MOUNT),
            )["data"]
        except hvac.exceptions.InvalidPath:
            raise VaultError(f"no secret is stored for tool {tool!r}") from None
        current = int(metadata.get("current_version") or 0)
        data: dict[str, Any] = {}
        with contextlib.suppress(hvac.exceptions.InvalidPath):
            read = _call(
                f"read_secret:{tool}",
                partial(
                    kv.read_secret_version,
                    path=slug,
                    mount_point=TOOL_SECRETS_MOUNT,
                    raise_on_deleted_version=False,
                ),
            )
            data = dict((read.get("data") or {}).get("data") or {})
        data["api_key"] = secrets.token_urlsafe(32)
        try:
            written = _call(
                f"write_secret:{tool}",
                partial(
                    kv.create_or_update_secret,
                    path=slug,
                    secret=data,
                    cas=current,
                    mount_point=TOOL_SECRETS_MOUNT,
                ),
            )
        except hvac.exceptions.InvalidRequest:
            log.info("rotation_tool_secret_cas_retry", tool=tool)
            continue  # someone wrote a version meanwhile: re-read and try again
        new_version = int(written["data"]["version"])
        rot.new_version = new_version
        rot._old = tuple(str(v) for v in _live_versions(metadata) if v < new_version)
        rot.previous = len(rot._old)
        return
    raise VaultError(f"tool secret {tool!r} kept changing during rotation")


def _retire_tool(client: hvac.Client, rot: Rotation) -> None:
    if not rot._old:
        return
    kv = client.secrets.kv.v2
    slug = tool_slug(rot.target.name)
    _call(
        f"destroy_versions:{rot.target.name}",
        partial(
            kv.destroy_secret_versions,
            path=slug,
            versions=[int(v) for v in rot._old],
            mount_point=TOOL_SECRETS_MOUNT,
        ),
    )
    rot.retired = len(rot._old)


# -- orchestration ------------------------------------------------------------------------


async def _audit(audit: AuditSink | None, rot: Rotation, phase: str, grace_s: float) -> None:
    if audit is None:
        return
    details: dict[str, Any] = {"kind": rot.target.kind, "name": rot.target.name, "phase": phase}
    if rot.target.kind == "tool":
        details["new_version"] = rot.new_version
    details["previous"] = rot.previous
    if phase == "retired":
        details["retired"] = rot.retired
    else:
        details["grace_s"] = grace_s
    if rot.error:
        details["error"] = rot.error
    try:
        await audit.append(
            audit_pb2.AUDIT_KIND_CREDENTIAL_ROTATED,
            outcome="failed" if rot.error else phase,
            resource=rot.target.resource,
            details=details,
        )
    except Unavailable as exc:
        log.warning("rotation_audit_failed", resource=rot.target.resource, error=str(exc))


async def rotate(
    addr: str,
    token: str,
    secrets_dir: Path,
    targets: Sequence[Target] | None = None,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    audit: AuditSink | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Rotation]:
    """Rotate ``targets`` (``None``: :func:`discover_targets`, i.e. everything); see the
    module docstring for the two phases. Never raises for one target's failure: check each
    :attr:`Rotation.error`. A target that failed to issue is not retired (its old
    credentials stay valid).

    ``token`` must be allowed to list/generate/destroy secret_ids, read role_ids, log in
    through AppRole, and read/write/destroy ``tool-secrets/`` (the local root token, or the
    rotation policy in vault/README.md).
    """
    if grace_s < 0:
        raise ValueError("grace_s must be >= 0")
    say = progress or (lambda _msg: None)
    client = hvac.Client(url=addr, token=token, timeout=_HTTP_TIMEOUT_S)
    with credentials_lock(secrets_dir):
        try:
            if targets is None:
                targets = await asyncio.to_thread(discover_targets, client, secrets_dir)
            rotations = [Rotation(target) for target in targets]
            for rot in rotations:
                try:
                    if rot.target.kind == "approle":
                        await asyncio.to_thread(_issue_approle, client, addr, rot, secrets_dir)
                        say(f"{rot.target.resource}: new secret_id in place")
                    else:
                        await asyncio.to_thread(_issue_tool, client, rot)
                        say(f"{rot.target.resource}: version {rot.new_version} written")
                except (VaultError, hvac.exceptions.VaultError, OSError) as exc:
                    rot.error = f"issue failed: {type(exc).__name__}: {exc}"
                    say(f"{rot.target.resource}: {rot.error}")
                rot.issued_at = time.time()
                log.info(
                    "credential_issued",
                    resource=rot.target.resource,
                    ok=rot.ok,
                    version=rot.new_version,
                )
                await _audit(audit, rot, "issued", grace_s)
            live = [rot for rot in rotations if rot.ok]
            if live and any(rot._old for rot in live) and grace_s > 0:
                say(f"waiting {grace_s:g}s before retiring the old credentials")
                await asyncio.sleep(grace_s)
            for rot in live:
                try:
                    if rot.target.kind == "approle":
                        await asyncio.to_thread(_retire_approle, client, rot)
                    else:
                        await asyncio.to_thread(_retire_tool, client, rot)
                except (VaultError, hvac.exceptions.VaultError) as exc:
                    rot.error = f"retire failed: {type(exc).__name__}: {exc}"
                rot.retired_at = time.time()
                say(
                    f"{rot.target.resource}: {rot.retired} old retired"
                    + (f" ({rot.error})" if rot.error else "")
                )
                log.info("credential_retired", resource=rot.target.resource, retired=rot.retired)
                await _audit(audit, rot, "retired", grace_s)
        finally:
            client.adapter.close()
    return rotations


def rotate_sync(
    addr: str, token: str, secrets_dir: Path, targets: Sequence[Target] | None = None, **kw: Any
) -> list[Rotation]:
    """:func:`rotate` for synchronous callers (runs its own event loop)."""
    return asyncio.run(rotate(addr, token, secrets_dir, targets, **kw))


@contextlib.asynccontextmanager
async def audit_writer(
    nats_url: str,
    namespace: str,
    *,
    connect_timeout_s: float = 2.0,
    nats_options: Mapping[str, Any] | None = None,
) -> AsyncIterator[AuditSink | None]:
    """An :class:`~tessera.audit.AuditWriter` on chain ``creds-rotation``, or ``None`` (with a
    warning) when NATS or the audit stream cannot be reached: auditing rotation is best
    effort, the rotation itself must not depend on it."""
    from nats.aio.client import Client

    from tessera.audit import AuditWriter
    from tessera.runtime.bus import Topology

    async def quiet(_exc: Exception) -> None:
        return None  # the one warning below says it; no reconnect traceback per attempt

    nc = Client()
    try:
        await asyncio.wait_for(
            nc.connect(
                nats_url,
                name="tessera-creds",
                connect_timeout=max(1, int(connect_timeout_s)),
                max_reconnect_attempts=0,
                allow_reconnect=False,
                error_cb=quiet,
                **dict(nats_options or {}),  # TLS as the operator where NATS requires it
            ),
            connect_timeout_s,
        )
    except Exception as exc:
        log.warning("rotation_audit_unavailable", reason=type(exc).__name__)
        with contextlib.suppress(Exception):
            await nc.close()
        yield None
        return
    try:
        writer = AuditWriter(
            nc.jetstream(), Topology(namespace), writer=AUDIT_WRITER, actor=AUDIT_ACTOR
        )
        sink: AuditSink | None = writer
        try:
            await writer.start()
        except Unavailable as exc:
            log.warning("rotation_audit_unavailable", reason=str(exc))
            sink = None
        yield sink
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
