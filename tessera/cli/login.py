"""`tessera login|logout|whoami`: a person's identity token for the mesh's front door."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tessera.cli import sessions
from tessera.launcher import mesh as launcher
from tessera.launcher import state as mesh_state

out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="TESSERA_DATA_DIR", help="The mesh's data directory."),
]


def _vault_addr(data_dir: Path) -> str:
    recorded = mesh_state.read(data_dir)
    vault = (
        None
        if recorded is None
        else next((c for c in recorded.components if c.name == "openbao"), None)
    )
    if vault is None:
        err.print("[bold red]error:[/] no running mesh found: run `tessera up` first")
        raise typer.Exit(3)
    return vault.address


def ensure_login(data_dir: Path, user: str) -> sessions.Session:
    """``user``'s saved login if it is good for a few more minutes, else a new one with
    the local password file (the demo's way of having several people at hand)."""
    from tessera.vault.humans import login as vault_login
    from tessera.vault.humans import password_file

    try:
        session = sessions.load(data_dir, user)
        if session.expires_at - time.time() > 300:
            return session
    except sessions.SessionMissing:
        pass
    local = password_file(data_dir / "secrets", user)
    if not local.is_file():
        raise sessions.SessionMissing(f"{user} has no local password: run `tessera login {user}`")
    token = vault_login(_vault_addr(data_dir), user, local.read_text().strip())
    current = sessions.current_user(data_dir)
    session = sessions.save(data_dir, user, token)
    if current is not None and current != user:
        sessions.make_current(data_dir, current)  # the demo's logins leave yours current
    return session


def login(
    user: Annotated[str, typer.Argument(help="Your user name (vault/humans.yaml).")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Log in: trade your password for an identity token (kept 0600 on this machine).

    On a local mesh (`tessera up`) the password is read from the file the bootstrap
    wrote for you, unless you pass --password-stdin or are asked for it."""
    from tessera.vault.errors import VaultError
    from tessera.vault.humans import login as vault_login
    from tessera.vault.humans import password_file

    directory = data_dir or launcher.default_data_dir()
    addr = _vault_addr(directory)
    local = password_file(directory / "secrets", user)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif local.is_file():
        password = local.read_text().strip()
    else:
        password = typer.prompt(f"password for {user}", hide_input=True)
    try:
        token = vault_login(addr, user, password)
    except VaultError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    session = sessions.save(directory, user, token)
    minutes = max(0, round((session.expires_at - time.time()) / 60))
    groups = ", ".join(session.groups) or "no groups"
    out.print(f"logged in as [bold]{user}[/] ({groups}); valid for {minutes} min", highlight=False)


def logout(
    user: Annotated[str | None, typer.Argument(help="Default: the current user.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Forget a login on this machine."""
    who = sessions.remove(data_dir or launcher.default_data_dir(), user)
    out.print(f"logged out {who}" if who else "nobody was logged in", highlight=False)


def whoami(data_dir: DataDir = None) -> None:
    """Who commands act as, their groups, and until when."""
    try:
        session = sessions.load(data_dir or launcher.default_data_dir())
    except sessions.SessionMissing as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    left = round((session.expires_at - time.time()) / 60)
    out.print(
        f"{session.user} ({', '.join(session.groups) or 'no groups'}); {left} min left",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(login)
    app.command()(logout)
    app.command()(whoami)
