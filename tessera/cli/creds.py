"""`tessera creds rotate [approle <identity> | tool <tool> | all]`: rotate credentials
while the mesh keeps serving (procedure and guarantees: vault/README.md, "Rotation").

Same Vault target as `tessera vault bootstrap`: the local mesh (state.json + root token) or
``--addr`` with ``VAULT_TOKEN``. Each step is audited (``credential_rotated``) on the
namespace's audit stream when NATS is reachable (``TESSERA_NATS_URL`` or the local mesh,
``TESSERA_NAMESPACE``); otherwise a warning, and the rotation goes on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from tessera.cli.vault import Addr, DataDir, SecretsDir, fail, quiet_logs, resolve_target

if TYPE_CHECKING:
    from tessera.vault.rotation import Rotation

app = typer.Typer(
    name="creds",
    help="Rotate AppRole secret_ids and tool secrets with no downtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console()
err = Console(stderr=True)

EXIT_PARTIAL = 1
KINDS = ("approle", "tool", "all")


@app.callback()
def _group() -> None:
    """Rotate AppRole secret_ids and tool secrets with no downtime."""


async def _run(
    addr: str,
    token: str,
    secrets_dir: Path,
    what: str,
    name: str | None,
    grace_s: float,
    audit: bool,
) -> list[Rotation]:
    from tessera.cli._local import nats_url
    from tessera.runtime.config import CommonSettings
    from tessera.vault.rotation import Target, audit_writer, rotate

    targets = None
    if what != "all":
        targets = [Target("approle" if what == "approle" else "tool", name or "")]

    def progress(msg: str) -> None:
        out.print(msg, highlight=False, soft_wrap=True)

    settings = CommonSettings()
    if not audit:
        return await rotate(addr, token, secrets_dir, targets, grace_s=grace_s, progress=progress)
    async with audit_writer(nats_url(settings.nats_url), settings.namespace) as writer:
        if writer is None:
            err.print(
                "[yellow]warning:[/] audit stream unreachable: rotating without audit records",
                highlight=False,
            )
        return await rotate(
            addr, token, secrets_dir, targets, grace_s=grace_s, audit=writer, progress=progress
        )


@app.command("rotate")
def rotate_cmd(
    what: Annotated[str, typer.Argument(help="approle | tool | all", show_default=False)],
    name: Annotated[
        str | None,
        typer.Argument(help="The identity (approle) or tool name (tool).", show_default=False),
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
    if what != "all" and not name:
        raise fail(
            f"`{what}` needs a name (e.g. `tessera creds rotate {what} "
            f"{'tool-proxy' if what == 'approle' else 'kb.search'}`)",
            2,
        )
    target = resolve_target(data_dir, addr, secrets_dir)
    if what == "approle" and not (target.secrets_dir / f"{name}.approle.json").is_file():
        raise fail(
            f"{target.secrets_dir / f'{name}.approle.json'} does not exist: rotation replaces "
            "the credentials file services read, so it only rotates identities whose file "
            "lives here (see --secrets-dir)",
            2,
        )
    try:
        results = asyncio.run(
            _run(target.addr, target.token, target.secrets_dir, what, name, grace, audit)
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
        f"{sum(r.target.kind == 'tool' for r in rotations)} tool secrets)",
        highlight=False,
    )
    for rot in failed:
        err.print(f"[red]failed[/] {rot.target.resource}: {rot.error}", highlight=False)
    if failed:
        raise typer.Exit(EXIT_PARTIAL)


if __name__ == "__main__":
    app()
