"""`tessera up`, `tessera status`, `tessera down`: the embedded local mesh."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tessera.launcher import mesh
from tessera.launcher.binaries import BinaryNotFound
from tessera.launcher.health import Health
from tessera.launcher.ports import PortInUse
from tessera.launcher.processes import StopFailed
from tessera.launcher.topology import TopologyError
from tessera.launcher.topology import load as load_topology

out = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar=mesh.DATA_DIR_ENV,
        help="Where logs, PID files, state.json and local secrets live (default: ./.tessera).",
        show_default=False,
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")]

_HEALTH_STYLE = {
    Health.SERVING: "green",
    Health.NOT_SERVING: "yellow",
    Health.DOWN: "red",
}


def _configure_logging(verbose: bool) -> None:
    from tessera.runtime.logging import configure_logging

    configure_logging("cli", "info" if verbose else "warning", stream=sys.stderr)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _table(rows: list[tuple[str, str, str, Health]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("component")
    table.add_column("address")
    table.add_column("pid", justify="right")
    table.add_column("status")
    for name, address, pid, health in rows:
        style = _HEALTH_STYLE[health]
        table.add_row(name, address, pid, f"[{style}]{health.value}[/]")
    return table


def up(
    data_dir: DataDir = None,
    base_port: Annotated[
        int | None,
        typer.Option(
            "--base-port",
            envvar="TESSERA_BASE_PORT",
            min=1024,
            max=65000,
            help=(
                "Use fixed ports from here: nats +0, nats monitor +1, openbao +2/+3, "
                "gateway +4, gateway admin +5, services +10… (default: usual ports "
                "(8080, 4222, 8200…) when free, else free ones)"
            ),
            show_default=False,
        ),
    ] = None,
    topology: Annotated[
        Path | None,
        typer.Option(
            "--topology",
            envvar="TESSERA_TOPOLOGY",
            help="Services to start (default: deploy/local/topology.yaml).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="TESSERA_LOG_LEVEL for the services.")
    ] = "info",
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds allowed for everything to be SERVING.")
    ] = 60.0,
    nats_cluster: Annotated[
        int | None,
        typer.Option(
            "--nats-cluster",
            envvar="TESSERA_NATS_CLUSTER",
            min=3,
            max=5,
            help=(
                "Run NATS as a JetStream cluster of this many nodes (nats-n1…) instead of one "
                "server; streams and buckets get 3 replicas. Ports: 4222+i, 8222+i, 6222+i "
                "when free, or --base-port +100+3i…"
            ),
            show_default=False,
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Start NATS, OpenBao, every service and the Envoy gateway as local processes.

    Exits 0 once every component is healthy; exits non-zero, after stopping whatever it
    started, if anything fails (the failing component's log tail is shown).
    """
    _configure_logging(verbose)
    directory = data_dir or mesh.default_data_dir()
    try:
        spec = load_topology(topology) if topology else None
        with err.status("starting the mesh…"):
            state = mesh.up(
                directory,
                base_port=base_port,
                topology=spec,
                log_level=log_level,
                timeout=timeout,
                nats_cluster=nats_cluster or 0,
                report=lambda msg: err.print(msg, highlight=False),
            )
    except mesh.ComponentFailed as exc:
        if exc.log_tail:
            err.rule(f"last lines of {exc.log_path}")
            err.print(exc.log_tail, markup=False, highlight=False)
            err.rule()
        raise _fail(f"{exc.name} {exc.reason}; everything started has been stopped") from None
    except (mesh.MeshError, PortInUse, TopologyError, BinaryNotFound, StopFailed) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; everything started has been stopped", 130) from None
    rows = [(c.name, c.address, str(c.pid), Health.SERVING) for c in state.components]
    out.print(_table(rows, f"Tessera mesh up ({state.data_dir})"))
    out.print(f"gateway: [bold]{state.gateway}[/]  ·  stop with [bold]tessera down[/]")
    if any(c.name == "console" for c in state.components):
        out.print(
            f"console: [bold]http://{state.gateway}/console/[/]  ·  log in as a user of "
            "vault/humans.yaml with the password in "
            f"{Path(state.data_dir) / 'secrets' / 'humans'}/<user>.password",
            soft_wrap=True,
        )
    if state.vault_bootstrapped:
        out.print(
            "people log in first: [bold]tessera login requester[/] "
            "(users and groups: vault/humans.yaml)"
        )


def status(data_dir: DataDir = None) -> None:
    """Show each component's health: SERVING, NOT_SERVING or DOWN.

    Exits 0 when everything is SERVING, 1 otherwise, 3 when no mesh was started here.
    """
    directory = data_dir or mesh.default_data_dir()
    result = mesh.status(directory)
    if result is None:
        err.print(f"no mesh is running in {directory.resolve()}", highlight=False)
        raise typer.Exit(3)
    rows = [(s.name, s.address, str(s.pid), s.health) for s in result]
    out.print(_table(rows, f"Tessera mesh ({directory.resolve()})"))
    if any(s.health is not Health.SERVING for s in result):
        raise typer.Exit(1)


def down(data_dir: DataDir = None, verbose: Verbose = False) -> None:
    """Stop every process of the mesh in reverse start order (SIGTERM, then SIGKILL).

    Safe to repeat: with nothing running it says so and exits 0.
    """
    _configure_logging(verbose)
    directory = data_dir or mesh.default_data_dir()
    try:
        results = mesh.down(directory)
    except StopFailed as exc:
        raise _fail(str(exc)) from None
    if not results:
        out.print(f"nothing is running in {directory.resolve()}", highlight=False)
        return
    for name, result in results:
        out.print(f"{name}: {result.value}", highlight=False)


def restart(
    name: Annotated[str, typer.Argument(help="Component, as `tessera status` names it.")],
    data_dir: DataDir = None,
    kill: Annotated[
        bool, typer.Option("--kill", help="SIGKILL it first, as a crash would (no drain).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait until it serves.")] = 60.0,
) -> None:
    """Stop one component (SIGTERM, or SIGKILL with --kill) and start it again with the
    same command and settings; returns once it serves again.

    Exits 1 if it cannot be restarted on its own or does not come back.
    """
    from tessera.launcher.restart import NotRestartable
    from tessera.launcher.restart import restart as restart_component

    directory = data_dir or mesh.default_data_dir()
    try:
        done = restart_component(directory, name, kill=kill, timeout=timeout)
    except (NotRestartable, StopFailed) as exc:
        raise _fail(str(exc)) from None
    out.print(
        f"{done.name}: {done.stopped}, started again (pid {done.pid}), "
        f"serving after {done.seconds_to_ready:.2f}s",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add the mesh commands to ``app``."""
    app.command("up")(up)
    app.command("status")(status)
    app.command("down")(down)
    app.command("restart")(restart)
