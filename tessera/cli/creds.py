"""`tessera creds rotate [approle <id> | tool <tool> | signing [<writer>] | nats | humans | all]`:
rotate credentials while the mesh keeps serving (procedure and guarantees: vault/README.md,
"Rotation"). ``signing`` adds a version to the audit checkpoint signing keys
(``transit/keys/audit-<writer>``); writers sign with it from their next checkpoint, and
checkpoints signed with older versions still verify. ``nats`` (local mesh only) issues the
NATS servers' certificate again and has them reload it (clients' NATS credentials are their
workload certificates, which renew themselves). ``humans`` rotates the key that signs
people's identity tokens (OpenBao's identity OIDC key): tokens are signed with the new key
at once, tokens already issued keep verifying until they expire (the key's
``verification_ttl``), and the gateway control plane pushes the new key set to Envoy.

Same Vault target as `tessera vault bootstrap`: the local mesh (state.json + root token) or
``--addr`` with ``VAULT_TOKEN``. Each step is audited (``credential_rotated``) on the
namespace's audit stream when NATS is reachable (``TESSERA_NATS_URL`` or the local mesh,
``TESSERA_NAMESPACE``); otherwise a warning, and the rotation goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from tessera.cli.vault import Addr, DataDir, SecretsDir, fail, quiet_logs, resolve_target
from tessera.launcher.mesh import default_data_dir
from tessera.runtime.errors import Unavailable


@dataclass(frozen=True)
class SigningTarget:
    """An audit writer's checkpoint signing key (``transit/keys/audit-<name>``)."""

    name: str
    kind: str = "signing"

    @property
    def resource(self) -> str:
        return f"signing/audit-{self.name}"


@dataclass
class SigningRotation:
    """The outcome of one signing key's rotation (a new key version, no secret)."""

    target: SigningTarget
    new_version: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class NatsTarget:
    """The NATS servers' own certificate (identity ``nats``)."""

    name: str = "nats"
    kind: str = "nats"

    @property
    def resource(self) -> str:
        return "certificate/nats"


@dataclass
class NatsRotation:
    """The outcome of the NATS server certificate's rotation (servers reloaded)."""

    target: NatsTarget
    reloaded: tuple[str, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class HumansTarget:
    """The key that signs people's identity tokens (``identity/oidc/key/<name>``)."""

    name: str
    kind: str = "humans"

    @property
    def resource(self) -> str:
        return f"identity/oidc/key/{self.name}"


@dataclass
class HumansRotation:
    """The outcome of the identity token key's rotation (how many keys now verify)."""

    target: HumansTarget
    published_keys: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


if TYPE_CHECKING:
    from tessera.vault.rotation import AuditSink, Rotation

    Outcome = Rotation | SigningRotation | NatsRotation | HumansRotation

app = typer.Typer(
    name="creds",
    help="Rotate AppRole secret_ids, tool secrets and audit signing keys with no downtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console()
err = Console(stderr=True)

EXIT_PARTIAL = 1
KINDS = ("approle", "tool", "signing", "nats", "humans", "all")


@app.callback()
def _group() -> None:
    """Rotate AppRole secret_ids, tool secrets and audit signing keys with no downtime."""


async def _run(
    addr: str,
    token: str,
    secrets_dir: Path,
    what: str,
    name: str | None,
    grace_s: float,
    audit: bool,
    data_dir: Path | None = None,
) -> list[Outcome]:
    """``data_dir``: the local mesh (``--data-dir``) whose audit stream records the
    rotation and whose NATS servers ``nats`` rotates; None for a remote Vault."""
    from tessera.audit import AuditWriter
    from tessera.cli._local import nats_options, nats_url
    from tessera.runtime.config import CommonSettings
    from tessera.vault.audit_keys import TransitSigner
    from tessera.vault.rotation import AUDIT_WRITER, Target, audit_writer, rotate

    targets = None
    if what not in ("all", "signing", "nats", "humans"):
        targets = [Target("approle" if what == "approle" else "tool", name or "")]

    def progress(msg: str) -> None:
        out.print(msg, highlight=False, soft_wrap=True)

    async def run(writer: AuditSink | None) -> list[Outcome]:
        rotations: list[Outcome] = []
        if what in ("nats", "all") and data_dir is not None:
            # First: a reload is instant, and an expiring server certificate is the one
            # credential whose lapse stops every new NATS connection.
            rotations.append(await _rotate_nats(data_dir, addr, writer, progress))
        if what not in ("signing", "nats", "humans"):
            rotations += await rotate(
                addr, token, secrets_dir, targets, grace_s=grace_s, audit=writer, progress=progress
            )
        if what in ("signing", "all"):
            rotations += await _rotate_signing(addr, token, name, writer, progress)
        if what in ("humans", "all"):
            # `all` skips a Vault with no people configured (no identity token key).
            rotation = await _rotate_humans(addr, token, writer, progress, required=what != "all")
            rotations += [rotation] if rotation is not None else []
        return rotations

    settings = CommonSettings()
    if not audit:
        return await run(None)
    async with audit_writer(
        nats_url(settings.nats_url, data_dir),
        settings.namespace,
        nats_options=nats_options(data_dir),
    ) as writer:
        if writer is None:
            err.print(
                "[yellow]warning:[/] audit stream unreachable: rotating without audit records",
                highlight=False,
            )
        signer = None
        if isinstance(writer, AuditWriter):
            # This chain's checkpoints are signed with the operator's token (key
            # audit-creds-rotation), like every other writer's with its own key.
            signer = TransitSigner.with_token(addr, token, AUDIT_WRITER)
            writer.attach_signer(signer)
        try:
            return await run(writer)
        finally:
            if isinstance(writer, AuditWriter):
                try:
                    await writer.close()  # the final checkpoint
                except Unavailable as exc:
                    err.print(f"[yellow]warning:[/] audit records unwritten: {exc}")
            if signer is not None:
                signer.close()


async def _rotate_signing(
    addr: str,
    token: str,
    name: str | None,
    audit: AuditSink | None,
    progress: Callable[[str], None],
) -> list[SigningRotation]:
    """Add a version to the audit signing keys (``name``: one writer identity's only)."""
    import hvac

    from tessera.v1 import audit_pb2
    from tessera.vault.audit_keys import AUDIT_WRITERS, rotate_signing_keys

    writers = (name,) if name else AUDIT_WRITERS
    results: list[SigningRotation] = []
    for writer in writers:
        rot = SigningRotation(SigningTarget(writer))
        client = hvac.Client(url=addr, token=token, timeout=10)
        try:
            versions = await asyncio.to_thread(rotate_signing_keys, client, (writer,))
            rot.new_version = next(iter(versions.values()))
            progress(f"signing/audit-{writer}: now version {rot.new_version}")
        except Exception as exc:  # one key failing does not stop the others
            rot.error = f"{type(exc).__name__}: {exc}"
        finally:
            client.adapter.close()
        results.append(rot)
        if audit is not None:
            try:
                await audit.append(
                    audit_pb2.AUDIT_KIND_CREDENTIAL_ROTATED,
                    outcome="failed" if rot.error else "rotated",
                    resource=f"signing/audit-{writer}",
                    details={"kind": "signing", "name": writer, "new_version": rot.new_version},
                )
            except Unavailable as exc:
                err.print(f"[yellow]warning:[/] rotation not audited: {exc}", highlight=False)
    return results


async def _rotate_nats(
    data_dir: Path, addr: str, audit: AuditSink | None, progress: Callable[[str], None]
) -> NatsRotation:
    """A fresh certificate for the local mesh's NATS servers, reloaded in place."""
    from tessera.launcher.nats_security import rotate_server_certificate
    from tessera.v1 import audit_pb2

    rot = NatsRotation(NatsTarget())
    try:
        rot.reloaded = tuple(await asyncio.to_thread(rotate_server_certificate, data_dir, addr))
        progress(f"certificate/nats: reissued, reloaded by {', '.join(rot.reloaded)}")
    except Exception as exc:  # the old certificate stays in place and valid
        rot.error = f"{type(exc).__name__}: {exc}"
    if audit is not None:
        try:
            await audit.append(
                audit_pb2.AUDIT_KIND_CREDENTIAL_ROTATED,
                outcome="failed" if rot.error else "rotated",
                resource=rot.target.resource,
                details={"kind": "nats", "name": "nats", "servers": len(rot.reloaded)},
            )
        except Unavailable as exc:
            err.print(f"[yellow]warning:[/] rotation not audited: {exc}", highlight=False)
    return rot


async def _rotate_humans(
    addr: str,
    token: str,
    audit: AuditSink | None,
    progress: Callable[[str], None],
    *,
    required: bool,
) -> HumansRotation | None:
    """Rotate the identity token signing key; None when it does not exist and is not
    ``required``."""
    import hvac
    import hvac.exceptions

    from tessera.v1 import audit_pb2
    from tessera.vault.humans import SIGNING_KEY

    rot = HumansRotation(HumansTarget(SIGNING_KEY))
    client = hvac.Client(url=addr, token=token, timeout=10)
    try:
        exists = await asyncio.to_thread(client.read, f"identity/oidc/key/{SIGNING_KEY}")
        if exists is None and not required:
            return None
        # The key's own verification_ttl (the token TTL, set by `tessera vault bootstrap`)
        # keeps the previous key published until every token it signed has expired.
        await asyncio.to_thread(client.write, f"identity/oidc/key/{SIGNING_KEY}/rotate")
        keys = await asyncio.to_thread(client.read, "identity/oidc/.well-known/keys")
        rot.published_keys = len((keys or {}).get("keys") or [])
        progress(f"{rot.target.resource}: rotated, {rot.published_keys} keys published")
    except (hvac.exceptions.VaultError, OSError) as exc:
        rot.error = f"{type(exc).__name__}: {exc}"
    finally:
        client.adapter.close()
    if audit is not None:
        try:
            await audit.append(
                audit_pb2.AUDIT_KIND_CREDENTIAL_ROTATED,
                outcome="failed" if rot.error else "rotated",
                resource=rot.target.resource,
                details={"kind": "humans", "name": SIGNING_KEY, "keys": rot.published_keys},
            )
        except Unavailable as exc:
            err.print(f"[yellow]warning:[/] rotation not audited: {exc}", highlight=False)
    return rot


@app.command("rotate")
def rotate_cmd(
    what: Annotated[
        str,
        typer.Argument(help="approle | tool | signing | nats | humans | all", show_default=False),
    ],
    name: Annotated[
        str | None,
        typer.Argument(
            help="The identity (approle), tool name (tool) or audit writer (signing).",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDir = None,
    addr: Addr = None,
    secrets_dir: SecretsDir = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            min=0,
            help=(
                "Seconds between putting the new credentials in place and destroying the old "
                "ones (keep >= the tool proxy's secret cache TTL, 30 s by default)."
            ),
        ),
    ] = 35.0,
    audit: Annotated[
        bool, typer.Option("--audit/--no-audit", help="Write credential_rotated records.")
    ] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log to stderr.")] = False,
) -> None:
    """Issue new credentials, wait --grace, then destroy the old ones.

    Exits 0 when every target rotated, 1 when any failed (the others still rotated; a
    target that failed keeps its old credentials valid), 3 when no local mesh is running
    and no --addr was given.
    """
    quiet_logs(verbose)
    what = what.lower()
    if what not in KINDS:
        raise fail(f"expected one of {', '.join(KINDS)}, got {what!r}", 2)
    if what == "all" and name:
        raise fail("`all` takes no name", 2)
    if what in ("nats", "humans") and name:
        raise fail(f"`{what}` takes no name", 2)
    if what not in ("all", "signing", "nats", "humans") and not name:
        raise fail(
            f"`{what}` needs a name (e.g. `tessera creds rotate {what} "
            f"{'tool-proxy' if what == 'approle' else 'kb.search'}`)",
            2,
        )
    if what == "signing" and name:
        from tessera.vault.audit_keys import AUDIT_WRITERS

        if name not in AUDIT_WRITERS:
            writers = ", ".join(AUDIT_WRITERS)
            raise fail(f"no audit signing key for {name!r} (writers: {writers})", 2)
    target = resolve_target(data_dir, addr, secrets_dir)
    mesh_dir = (data_dir or default_data_dir()).resolve() if target.local else None
    if what == "nats" and not target.local:
        raise fail(
            "`nats` rotates the local mesh's NATS servers (`tessera up`); a deployment's "
            "NATS certificate comes from its own issuer (deploy/README.md)",
            2,
        )
    if what == "approle" and not (target.secrets_dir / f"{name}.approle.json").is_file():
        raise fail(
            f"{target.secrets_dir / f'{name}.approle.json'} does not exist: rotation replaces "
            "the credentials file services read, so it only rotates identities whose file "
            "lives here (see --secrets-dir)",
            2,
        )
    try:
        results = asyncio.run(
            _run(
                target.addr,
                target.token,
                target.secrets_dir,
                what,
                name,
                grace,
                audit,
                mesh_dir,
            )
        )
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    except Exception as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from None
    rotations = results
    failed = [r for r in rotations if not r.ok]
    out.print(
        f"rotated {len(rotations) - len(failed)}/{len(rotations)} "
        f"({sum(r.target.kind == 'approle' for r in rotations)} AppRole, "
        f"{sum(r.target.kind == 'tool' for r in rotations)} tool secrets, "
        f"{sum(r.target.kind == 'signing' for r in rotations)} signing keys, "
        f"{sum(r.target.kind == 'nats' for r in rotations)} NATS server certificate, "
        f"{sum(r.target.kind == 'humans' for r in rotations)} identity token key)",
        highlight=False,
    )
    for rot in failed:
        err.print(f"[red]failed[/] {rot.target.resource}: {rot.error}", highlight=False)
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


if __name__ == "__main__":
    app()
