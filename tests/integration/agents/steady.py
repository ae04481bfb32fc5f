"""rolling.step: a short unit of work, for replacing replicas while workflows flow."""

from __future__ import annotations

import asyncio

from tessera.agent import Agent, TaskContext, TaskResult

agent = Agent("steady", version="1.0.0")


@agent.capability(
    "rolling.step",
    version="1.0.0",
    side_effect="idempotent_write",
    reads=["steps"],
    writes=["steps"],
    timeout_s=10,
)
async def step(ctx: TaskContext) -> TaskResult:
    """Take a moment (so some tasks are in flight when a replica is told to stop)."""
    await asyncio.sleep(0.2)
    steps = list(ctx.blackboard.get("steps") or [])
    return TaskResult(
        output={"instance": agent.instance_id},
        writes={"steps": [*steps, ctx.task_id]},
    )


if __name__ == "__main__":
    agent.run()
