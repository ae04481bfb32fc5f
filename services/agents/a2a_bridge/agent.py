"""The A2A bridge agent: one capability per A2A agent the declaration file names.

For each task it calls the governed tool ``a2a.<name>`` through the tool proxy with the
task's token (the proxy makes the A2A exchange from its own identity, under the call's
deadline, and audits it) and answers with the agent's output. Everything else is the
SDK's and the coordinator's, as for any agent: the contract's timeout, the budget, and
the output checked against the contract's ``output_schema`` before the next task runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from tessera.a2a_agents import BRIDGE_AGENT, A2AAgent, A2AAgentsSettings, load
from tessera.agent import Agent, TaskContext, TaskResult, Usage
from tessera.agent._contract import Handler

__all__ = ["GOVERNANCE_MARGIN_S", "build", "main"]

GOVERNANCE_MARGIN_S = 1.0
"""The capability's timeout is the exchange's plus this: the governed hops (token, policy,
audit) fit in it, so a hanging agent ends as the tool's DEADLINE_EXCEEDED, recorded by
the proxy with the remote task id, rather than as the bridge's own timeout."""


def _handler(decl: A2AAgent) -> Handler:
    reads = decl.capability.reads
    writes = decl.capability.writes

    async def handle(ctx: TaskContext) -> TaskResult:
        arguments: dict[str, object] = {"input": ctx.input}
        blackboard = {key: ctx.blackboard[key] for key in reads if key in ctx.blackboard}
        if blackboard:
            arguments["blackboard"] = blackboard
        # The SDK's default idempotency key (<workflow>/<task>/<tool>/1) is stable across
        # attempts: a retried task replays a completed exchange instead of repeating it.
        output = await ctx.call_tool(decl.tool, arguments)
        return TaskResult(
            output=output,
            writes={key: output[key] for key in writes if key in output},
            summary=f"answered by A2A agent {decl.name!r}",
            usage=Usage(tool_calls=1),
        )

    handle.__doc__ = decl.capability.description or f"Served by the A2A agent {decl.name!r}."
    return handle


def build(declared: Sequence[A2AAgent], *, version: str = "1.0.0") -> Agent:
    """The bridge agent offering every declared capability (ValueError if one is invalid
    as a contract)."""
    agent = Agent(BRIDGE_AGENT, version=version)
    for decl in declared:
        cap = decl.capability
        agent.capability(
            cap.name,
            version=cap.version,
            side_effect=decl.side_effect,
            description=cap.description,
            reads=cap.reads,
            writes=cap.writes,
            tools=[decl.tool],
            timeout_s=decl.timeout_s + GOVERNANCE_MARGIN_S,
            max_concurrency=cap.max_concurrency,
            output_schema=cap.output_schema,
        )(_handler(decl))
    return agent


def main() -> None:
    """Entry point: the declarations from ``TESSERA_A2A_AGENTS_FILE``, then serve."""
    declared = load(A2AAgentsSettings().a2a_agents_file)
    if not declared:
        raise SystemExit("TESSERA_A2A_AGENTS_FILE declares no A2A agent: nothing to serve")
    build(declared).run()
