"""`tessera agents`: the live registry, and the kill switch for one agent.

``tessera agents`` lists the registered replicas; ``freeze`` takes an agent out of
service (its entries leave the registry, its registrations and tool calls are refused,
its running attempts' task tokens are revoked) until ``unfreeze``; ``frozen`` lists the
freezes in force. Freezing is an operator's action, decided by policy
(policy/policies/60_agents.cedar): by default the CLI calls the registry service as the
operator identity of the mesh `tessera up` recorded; with ``--as USER`` it goes through
the gateway as that logged-in person (`tessera login`), who must be in ``operators``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tessera.cli._local import nats_options, nats_url, service_address, service_channel

if TYPE_CHECKING:  # the CLI imports gRPC only for the commands that use it
    from tessera.v1.registry_pb2_grpc import RegistryServiceStub

__all__ = ["app"]

app = typer.Typer(
    help="The agents in the live registry, and freezing one (the kill switch).",
    invoke_without_command=True,
    no_args_is_help=False,
)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")


@app.callback()
def agents(ctx: typer.Context) -> None:
    """List the agents registered in the live registry, with their capabilities."""
    if ctx.invoked_subcommand is not None:
        return
    from tessera.registry import Registry
    from tessera.runtime.bus import Topology, connect
    from tessera.runtime.config import CommonSettings

    settings = CommonSettings()
    url = nats_url(settings.nats_url)

    async def main() -> None:
        nc = await connect(url, name="cli", initial_timeout_s=5, **nats_options())
        try:
            registry = Registry(nc.jetstream(), Topology(settings.namespace))
            table = Table(title="agents", title_justify="left")
            for column in ("agent", "instance", "endpoint", "capabilities"):
                table.add_column(column)
            for agent in sorted(await registry.agents(), key=lambda a: a.name):
                caps = ", ".join(f"{c.name}@{c.version}" for c in agent.capabilities)
                table.add_row(agent.name, agent.instance_id, agent.endpoint, caps)
            out.print(table)
        finally:
            await nc.close()

    asyncio.run(main())


As = Annotated[
    str | None,
    typer.Option(
        "--as",
        envvar="TESSERA_USER",
        show_default=False,
        help="Act as this logged-in person, through the gateway (default: the operator "
        "identity, directly).",
    ),
]


def _call(work: Callable[[RegistryServiceStub], Awaitable[T]], user: str | None = None) -> T:
    """Run ``work(stub)`` against the registry service, as the operator or (``user``) as
    that person through the gateway; a refusal is printed as its status and reason
    (exit 1), an unreachable registry exits 2."""
    import grpc

    from tessera.runtime.config import CommonSettings
    from tessera.runtime.errors import error_details
    from tessera.runtime.logging import configure_logging
    from tessera.v1 import registry_pb2_grpc

    configure_logging("cli", "warning", stream=sys.stderr)

    async def main() -> T:
        if user is not None:
            from tessera.cli.front_door import gateway_address, person_token
            from tessera.client import MeshClient

            async with MeshClient(gateway_address(None), token=person_token(user)) as client:
                return await work(client.registry)
        address = service_address(
            "registry", "TESSERA_REGISTRY_ADDRESS", CommonSettings().registry_address
        )
        async with service_channel(address, "registry") as chan:
            return await work(registry_pb2_grpc.RegistryServiceStub(chan))

    try:
        return asyncio.run(main())
    except grpc.aio.AioRpcError as exc:
        details = error_details(exc)
        reason = f" ({details.reason})" if details.reason else ""
        err.print(f"[bold red]error:[/] {details.code.name}{reason}: {details.message}")
        code = 2 if details.code == grpc.StatusCode.UNAVAILABLE else 1
        raise typer.Exit(code) from None


@app.command()
def freeze(
    name: Annotated[str, typer.Argument(help="The agent, e.g. billing.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (audited).")] = "",
    user: As = None,
) -> None:
    """Freeze an agent until `tessera agents unfreeze`: its replicas leave the registry,
    it may not register, its running attempts' task tokens are revoked and every tool
    call it makes is refused by policy. Work goes to other agents with the capability."""
    from tessera.v1 import registry_pb2

    async def work(stub: RegistryServiceStub) -> registry_pb2.FreezeAgentResponse:
        request = registry_pb2.FreezeAgentRequest(name=name, reason=reason)
        return await stub.FreezeAgent(request, timeout=10)

    response = _call(work, user)
    frozen = response.frozen
    out.print(
        f"[bold]{frozen.name}[/] frozen by {frozen.frozen_by} at "
        f"{frozen.freeze_time.ToDatetime():%Y-%m-%d %H:%M:%S}Z"
        f"{f' ({frozen.reason})' if frozen.reason else ''}; "
        f"{response.replicas_removed} replica(s) removed from the registry",
        highlight=False,
    )


@app.command()
def unfreeze(
    name: Annotated[str, typer.Argument(help="The agent, e.g. billing.")], user: As = None
) -> None:
    """Lift an agent's freeze: its replicas register again at their next heartbeat."""
    from tessera.v1 import registry_pb2

    async def work(stub: RegistryServiceStub) -> registry_pb2.UnfreezeAgentResponse:
        request = registry_pb2.UnfreezeAgentRequest(name=name)
        return await stub.UnfreezeAgent(request, timeout=10)

    response = _call(work, user)
    said = "unfrozen" if response.was_frozen else "was not frozen"
    out.print(f"[bold]{name}[/] {said}", highlight=False)


@app.command()
def frozen(user: As = None) -> None:
    """List the agents frozen now."""
    from tessera.v1 import registry_pb2

    async def work(stub: RegistryServiceStub) -> registry_pb2.ListFrozenAgentsResponse:
        request = registry_pb2.ListFrozenAgentsRequest()
        return await stub.ListFrozenAgents(request, timeout=10)

    table = Table(title="frozen agents", title_justify="left")
    for column in ("agent", "frozen by", "since", "reason"):
        table.add_column(column)
    for record in _call(work, user).agents:
        since = f"{record.freeze_time.ToDatetime():%Y-%m-%d %H:%M:%S}Z"
        table.add_row(record.name, record.frozen_by, since, record.reason)
    out.print(table)
