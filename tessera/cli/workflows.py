"""`tessera run|watch|approve|reject|cancel|workflows|export`: using a running mesh.

Every command goes through the gateway as a logged-in person (`tessera login`; `--as`
picks one of several logins, `TESSERA_TOKEN` overrides them all)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from tessera.cli.front_door import gateway_address, person_token
from tessera.cli.timeline import line
from tessera.client import MeshClient
from tessera.runtime.errors import error_details
from tessera.v1 import coordinator_pb2

out = Console()
err = Console(stderr=True)
T = TypeVar("T")
WS = coordinator_pb2.WorkflowState

Gateway = Annotated[
    str | None,
    typer.Option(
        "--gateway",
        envvar="TESSERA_GATEWAY",
        show_default=False,
        help="host:port of the gateway (default: the one `tessera up` started).",
    ),
]


As = Annotated[
    str | None,
    typer.Option(
        "--as",
        envvar="TESSERA_USER",
        show_default=False,
        help="Act as this logged-in user (default: the last `tessera login`).",
    ),
]


def _run(
    gateway: str | None, work: Callable[[MeshClient], Awaitable[T]], user: str | None = None
) -> T:
    address = gateway_address(gateway)
    token = person_token(user)

    async def main() -> T:
        async with MeshClient(address, token=token) as client:
            return await work(client)

    return _run_async(main)


def _run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main``; a refused call is printed (status, field and precondition
    violations) and exits 1."""

    async def wrapped() -> T:
        return await main()

    try:
        return asyncio.run(wrapped())
    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        err.print(f"[bold red]error:[/] {exc.code().name}: {exc.details()}", highlight=False)
        for field, description in details.field_violations:
            err.print(f"  {field}: {description}", highlight=False)
        for _, subject, description in details.precondition_violations:
            err.print(f"  {subject}: {description}", highlight=False)
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            err.print("  your login may have expired: run `tessera login <user>`")
        raise typer.Exit(1) from None


def _inputs(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r}: use key=value (value may be JSON)")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


async def follow(client: MeshClient, name: str) -> coordinator_pb2.Workflow:
    async for event in client.watch(name):
        style, text = line(event)
        # Markup off: summaries and reasons are agents' and people's text, printed as written.
        out.print(f"  {text}", style=style or None, highlight=False, markup=False)
        if event.HasField("gate_opened"):
            out.print(
                f"  [dim]decide with: tessera approve {name.split('/')[-1]} "
                f"{event.gate_opened.gate_id}[/]"
            )
            workflow = await client.get(name)
            if workflow.state == WS.WORKFLOW_STATE_WAITING_APPROVAL:
                return workflow
    return await client.get(name)


def run(
    goal: Annotated[
        str,
        typer.Argument(
            help="A template name (support, loan, procurement, risk) or a free-text goal."
        ),
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input", "-i", help="key=value; the value may be JSON, e.g. -i quantity=100"
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the timeline until it ends or parks.")] = True,
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key: the same key returns the same workflow.")
    ] = None,
    gateway: Gateway = None,
    who: As = None,
) -> None:
    """Start a workflow (in your name) and follow its timeline."""
    values = _inputs(inputs or [])

    async def work(client: MeshClient) -> None:
        workflow = await client.start(goal, request_id=request_id, **values)
        out.print(f"[bold]{workflow.name}[/] started", highlight=False)
        if wait:
            final = await follow(client, workflow.name)
            out.print(f"state: {WS.Name(final.state).removeprefix('WORKFLOW_STATE_')}")

    _run(gateway, work, who)


def watch(
    workflow: Annotated[str, typer.Argument(help="Workflow id or workflows/{id}.")],
    gateway: Gateway = None,
    who: As = None,
) -> None:
    """Follow a workflow's live timeline (from its first event)."""
    name = workflow if workflow.startswith("workflows/") else f"workflows/{workflow}"
    _run(gateway, lambda client: follow(client, name), who)


def _decide(
    workflow: str, gate: str, approve: bool, comment: str, gateway: str | None, who: str | None
) -> None:
    wf_id = workflow.removeprefix("workflows/")

    async def work(client: MeshClient) -> None:
        decided = await client.decide(
            f"workflows/{wf_id}/gates/{gate}", approve=approve, comment=comment
        )
        verdict = "approved" if approve else "rejected"
        out.print(f"{decided.name} {verdict} by {decided.decided_by}", highlight=False)

    _run(gateway, work, who)


def approve(
    workflow: str,
    gate: str,
    comment: Annotated[str, typer.Option()] = "",
    gateway: Gateway = None,
    who: As = None,
) -> None:
    """Approve a pending gate in your name; the workflow resumes where it parked."""
    _decide(workflow, gate, True, comment, gateway, who)


def reject(
    workflow: str,
    gate: str,
    comment: Annotated[str, typer.Option()] = "",
    gateway: Gateway = None,
    who: As = None,
) -> None:
    """Reject a pending gate in your name; the workflow is cancelled."""
    _decide(workflow, gate, False, comment, gateway, who)


def cancel(
    workflow: Annotated[str, typer.Argument(help="Workflow id or workflows/{id}.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit trail).")] = "",
    gateway: Gateway = None,
    who: As = None,
) -> None:
    """The kill switch: cancel a workflow now. Its task tokens are revoked at once (a
    running tool call loop is refused at its next call); its compensations run."""
    name = workflow if workflow.startswith("workflows/") else f"workflows/{workflow}"

    async def work(client: MeshClient) -> None:
        cancelled = await client.cancel(name, reason=reason)
        state = WS.Name(cancelled.state).removeprefix("WORKFLOW_STATE_").lower()
        out.print(f"{cancelled.name} cancelling ({state})", highlight=False)

    _run(gateway, work, who)


def workflows(
    state: Annotated[
        str | None,
        typer.Option(
            help="Only this state: running, waiting_approval, succeeded, failed, cancelled"
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="Most rows to show.")] = 50,
    gateway: Gateway = None,
    who: As = None,
) -> None:
    """List workflows, newest first."""
    wanted = 0
    if state:
        try:
            wanted = WS.Value("WORKFLOW_STATE_" + state.upper())
        except ValueError:
            raise typer.BadParameter(f"unknown state {state!r}") from None

    async def work(client: MeshClient) -> None:
        page = await client.list(state=wanted, page_size=limit)
        table = Table(title="workflows", title_justify="left")
        for column in ("name", "template", "state", "tasks", "gates pending", "created"):
            table.add_column(column)
        for wf in page.workflows:
            pending = sum(g.state == coordinator_pb2.GATE_STATE_PENDING for g in wf.gates)
            table.add_row(
                wf.name,
                wf.plan.template,
                WS.Name(wf.state).removeprefix("WORKFLOW_STATE_").lower(),
                str(len(wf.tasks)),
                str(pending),
                wf.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            )
        out.print(table)

    _run(gateway, work, who)


def export(
    workflow: Annotated[str, typer.Argument(help="Workflow id or workflows/{id}.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to this file (default: standard output)."),
    ] = None,
    gateway: Gateway = None,
    who: As = None,
) -> None:
    """Write a workflow's whole history, one JSON event per line (keep it before the
    workflow's retention removes it: TESSERA_COORDINATOR_RETENTION_S, 7 days)."""
    name = workflow if workflow.startswith("workflows/") else f"workflows/{workflow}"

    async def work(client: MeshClient) -> int:
        lines = [
            json_format.MessageToJson(event, indent=None) async for event in client.watch(name)
        ]
        text = "".join(f"{line}\n" for line in lines)
        if output is None:
            sys.stdout.write(text)
        else:
            output.write_text(text)
        return len(lines)

    count = _run(gateway, work, who)
    err.print(f"{count} events of {name}", highlight=False)


def register(app: typer.Typer) -> None:
    for command in (run, watch, approve, reject, cancel, workflows, export):
        app.command()(command)
