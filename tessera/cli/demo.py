"""`tessera demo`: the reference workflows end to end through the gateway, with a human
(this command) deciding the gates, and a readable timeline of each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.rule import Rule

from tessera.cli import sessions
from tessera.cli.front_door import gateway_address
from tessera.cli.login import ensure_login
from tessera.cli.timeline import line
from tessera.cli.workflows import WS, Gateway, _run_async, err, out
from tessera.client import MeshClient
from tessera.launcher import mesh as launcher
from tessera.v1 import events_pb2

REQUESTER = "requester"
APPROVERS = {
    "support": "finance",
    "loan": "compliance",
    "procurement": "finance",
    "risk": "finance",
}
"""Who decides a template's gates (policy/policies/50_workflows.cedar; never the requester:
nobody decides a gate of their own workflow)."""


@dataclass(frozen=True)
class Scenario:
    title: str
    goal: str
    inputs: dict[str, Any]
    expect: int
    decisions: dict[str, bool] = field(default_factory=dict)
    """Gate kind (approval, loop, review, tool) → approve?"""


GATE_KINDS = {
    events_pb2.GATE_KIND_APPROVAL_STEP: "approval",
    events_pb2.GATE_KIND_OUTPUT_APPROVAL: "approval",
    events_pb2.GATE_KIND_LOW_CONFIDENCE: "review",
    events_pb2.GATE_KIND_LOOP_ESCALATION: "loop",
    events_pb2.GATE_KIND_TOOL_APPROVAL: "tool",
}

SCENARIOS = (
    Scenario(
        "Customer support: a refund request is triaged to billing",
        "a customer wants a refund for a double charge",
        {
            "ticket": {
                "id": "T-100",
                "customer_id": "C-42",
                "text": "I was charged twice, please refund the invoice",
            }
        },
        WS.WORKFLOW_STATE_SUCCEEDED,
    ),
    Scenario(
        "Customer support: a refund above 1,000 waits for a human",
        "support",
        {
            "ticket": {
                "id": "T-102",
                "customer_id": "C-44",
                "text": "please refund 1500 for the duplicate annual plan",
            }
        },
        WS.WORKFLOW_STATE_SUCCEEDED,
        {"tool": True},
    ),
    Scenario(
        "Customer support: a ticket two agents would bounce forever",
        "support",
        {
            "ticket": {
                "id": "T-101",
                "customer_id": "C-43",
                "text": "ping-pong refund for my account",
            }
        },
        WS.WORKFLOW_STATE_COMPENSATED,
        {"loop": False},
    ),
    Scenario(
        "Loan application: missing tax id, then an AML flag for a human",
        "loan",
        {"application": {"applicant": "ACME Trading Ltd", "amount": 250000, "country": "XX"}},
        WS.WORKFLOW_STATE_SUCCEEDED,
        {"approval": True},
    ),
    Scenario(
        "Procurement: an offer above max_budget is refused and renegotiated",
        "procurement",
        {"item": "laptop", "quantity": 100, "max_budget": 10000},
        WS.WORKFLOW_STATE_SUCCEEDED,
    ),
    Scenario(
        "Risk assessment: three scorers in parallel, one too slow",
        "risk",
        {"customer": {"id": "C-42", "income": 55000, "transactions": [120, 7000, 30]}},
        WS.WORKFLOW_STATE_SUCCEEDED,
    ),
)


async def _play(client: MeshClient, approvers: dict[str, MeshClient], scenario: Scenario) -> bool:
    out.print(Rule(scenario.title, align="left"))
    workflow = await client.start(scenario.goal, **scenario.inputs)
    template = workflow.plan.template
    out.print(
        f"  [bold]{workflow.name}[/] ({scenario.goal}) started by {workflow.started_by}",
        highlight=False,
    )
    async for event in client.watch(workflow.name):
        style, text = line(event)
        # Markup off: summaries and reasons are agents' and people's text, printed as written.
        out.print(f"  {text}", style=style or None, highlight=False, markup=False)
        if event.HasField("gate_opened"):
            gate = event.gate_opened.gate_id
            approve = scenario.decisions.get(GATE_KINDS.get(event.gate_opened.kind, ""), True)
            verb = "approves" if approve else "rejects"
            who = APPROVERS.get(template, "finance")
            out.print(f"  [bold]{who} {verb} {gate}[/]", highlight=False)
            await approvers[who].decide(
                f"{workflow.name}/gates/{gate}", approve=approve, comment="reviewed in tessera demo"
            )
    final = await client.get(workflow.name)
    ok = final.state == scenario.expect
    verdict = "[green]as expected[/]" if ok else "[red]NOT as expected[/]"
    out.print(f"  result: {WS.Name(final.state).removeprefix('WORKFLOW_STATE_')} {verdict}\n")
    return ok


def demo(
    gateway: Gateway = None,
    only: Annotated[
        str | None, typer.Option(help="Run only scenarios whose goal or title contains this text.")
    ] = None,
) -> None:
    """Run the reference workflows through the gateway and print their timelines."""
    chosen = [s for s in SCENARIOS if not only or only.lower() in (s.goal + s.title).lower()]

    if not chosen:
        err.print(f"[bold red]error:[/] no scenario matches {only!r}")
        raise typer.Exit(2)
    address = gateway_address(gateway)
    data_dir = launcher.default_data_dir()
    try:
        tokens = {u: ensure_login(data_dir, u).token for u in {REQUESTER, *APPROVERS.values()}}
    except sessions.SessionMissing as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    out.print(
        f"logged in: {REQUESTER} starts the workflows; "
        f"{', '.join(sorted(set(APPROVERS.values())))} decide their gates\n",
        highlight=False,
    )

    async def work() -> list[bool]:
        clients = {u: MeshClient(address, token=t) for u, t in tokens.items()}
        try:
            approvers = {u: clients[u] for u in set(APPROVERS.values())}
            return [await _play(clients[REQUESTER], approvers, s) for s in chosen]
        finally:
            for c in clients.values():
                await c.close()

    results = _run_async(work)
    passed = sum(results)
    out.print(f"[bold]{passed}/{len(results)} workflows ended as expected[/]")
    if passed != len(results):
        err.print("[bold red]demo failed[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(demo)
