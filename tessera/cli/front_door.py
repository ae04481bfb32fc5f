"""Reaching the mesh as a person: the gateway's address and the logged-in user's token,
for every command that goes through the front door (``tessera run``, ``approve``,
``cancel``, ``demo``, ``agents freeze --as``)."""

from __future__ import annotations

import os

import typer
from rich.console import Console

from tessera.cli import sessions
from tessera.client import TOKEN_ENV
from tessera.launcher import mesh as launcher
from tessera.launcher import state as mesh_state

__all__ = ["gateway_address", "person_token"]

err = Console(stderr=True)


def gateway_address(explicit: str | None) -> str:
    """``explicit``, else the gateway of the running local mesh (exit 3 without one)."""
    if explicit:
        return explicit
    recorded = mesh_state.read(launcher.default_data_dir())
    if recorded is None:
        err.print(
            "[bold red]error:[/] no running mesh found: run `tessera up`, or pass "
            "--gateway host:port"
        )
        raise typer.Exit(3)
    return recorded.gateway


def person_token(user: str | None) -> str:
    """``TESSERA_TOKEN`` when no user is named, else ``user``'s (or the last) login's
    token (exit 1 when there is none)."""
    if os.environ.get(TOKEN_ENV) and user is None:
        return os.environ[TOKEN_ENV]
    try:
        return sessions.load(launcher.default_data_dir(), user).token
    except sessions.SessionMissing as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
