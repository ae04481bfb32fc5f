"""`tessera audit tail` and `tessera audit verify`: read the hash-chained audit stream.

Connection settings come from the environment (``TESSERA_NATS_URL``, ``TESSERA_NAMESPACE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tessera.cli._local import nats_url
from tessera.runtime.errors import Unavailable

app = typer.Typer(
    name="audit",
    help="Read and verify the hash-chained audit trail.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console()
err = Console(stderr=True)

EXIT_TAMPERED = 1
EXIT_UNAVAILABLE = 2


def _quiet_logs() -> None:
    from tessera.runtime.logging import configure_logging

    configure_logging("cli", "warning", stream=sys.stderr)


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


async def _tail(follow: bool, n: int) -> None:
    from tessera.audit import kind_name, tail, to_timestamp_str
    from tessera.runtime.bus import Topology, connect
    from tessera.runtime.config import CommonSettings

    settings = CommonSettings()
    nc = await connect(nats_url(settings.nats_url), name="tessera-cli", initial_timeout_s=5.0)
    try:
        async for entry in tail(nc.jetstream(), Topology(settings.namespace), follow=follow, n=n):
            record = entry.record
            if record is None:
                out.print(
                    f"{'?':24} {entry.writer:20} [red]unreadable record[/] "
                    f"(stream seq {entry.stream_sequence})",
                    highlight=False,
                )
                continue
            out.print(
                f"{to_timestamp_str(record.time):24} {entry.writer:20} "
                f"{kind_name(record.kind):20} {record.outcome or '-':18} "
                f"{record.resource or '-':24} {record.workflow_id or '-'}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    finally:
        await nc.close()


@app.command("tail")
def tail_cmd(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records.")
    ] = False,
    n: Annotated[int, typer.Option("-n", min=0, help="How many past records to show.")] = 20,
) -> None:
    """Print the last records of every chain: time, writer, kind, outcome, resource, workflow."""
    _quiet_logs()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_tail(follow, n))
    except (Unavailable, TimeoutError, OSError) as exc:
        raise _fail(f"audit stream unreachable: {exc}", EXIT_UNAVAILABLE) from None


async def _verify() -> object:
    from tessera.audit import verify
    from tessera.runtime.bus import Topology, connect
    from tessera.runtime.config import CommonSettings

    settings = CommonSettings()
    nc = await connect(nats_url(settings.nats_url), name="tessera-cli", initial_timeout_s=5.0)
    try:
        return await verify(nc.jetstream(), Topology(settings.namespace))
    finally:
        await nc.close()


@app.command("verify")
def verify_cmd() -> None:
    """Verify every hash chain. Exit 0 when intact; 1 with a report of each modified,
    missing, reordered, duplicated, unlinked or deleted record; 2 when unreachable."""
    from tessera.audit import VerifyReport

    _quiet_logs()
    try:
        report = asyncio.run(_verify())
    except (Unavailable, TimeoutError, OSError) as exc:
        raise _fail(f"audit stream unreachable: {exc}", EXIT_UNAVAILABLE) from None
    assert isinstance(report, VerifyReport)
    table = Table(title="audit chains", title_justify="left")
    for column in ("writer", "records", "carried", "head", "status"):
        table.add_column(column)
    for chain in report.chains:
        status = "[green]intact[/]" if chain.ok else f"[red]{len(chain.issues)} issue(s)[/]"
        table.add_row(
            chain.writer,
            str(chain.records),
            str(chain.carried),
            str(chain.head_sequence),
            status,
        )
    out.print(table)
    if report.ok:
        out.print(
            f"[green]OK[/]: {report.records} records (carrying {report.carried} more) in "
            f"{len(report.chains)} chain(s) verify"
        )
        return
    issues = Table(title="integrity issues", title_justify="left")
    for column in ("kind", "writer", "chain seq", "stream seq", "detail"):
        issues.add_column(column)
    for issue in report.issues:
        issues.add_row(
            f"[red]{issue.kind}[/]",
            issue.writer or "-",
            str(issue.sequence or "-"),
            str(issue.stream_sequence or "-"),
            issue.detail,
        )
    out.print(issues)
    raise _fail(f"{len(report.issues)} integrity issue(s) found", EXIT_TAMPERED)
