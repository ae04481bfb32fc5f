"""The Tessera agent SDK: a domain agent in about thirty lines.

```python
from tessera.agent import Agent, TaskContext, TaskResult, Handoff, Usage

agent = Agent("billing", version="1.0.0")

@agent.capability("support.billing", version="1.0.0", side_effect="read_only",
                  reads=["ticket"], writes=["billing_notes"], handoffs=["support.account"])
async def billing(ctx: TaskContext) -> TaskResult:
    text = ctx.blackboard["ticket"]["text"]
    return TaskResult(writes={"billing_notes": f"checked: {text}"}, usage=Usage(tokens=10))

if __name__ == "__main__":
    agent.run()
```

See ``services/agents/README.md`` for running agents and the execution guarantees.
"""

from tessera.agent._agent import AGENT_SERVICE_NAME, TASK_TOKEN_METADATA, Agent
from tessera.agent._contract import DEFAULT_MAX_CONCURRENCY, Capability, build_contract
from tessera.agent._settings import AgentSettings
from tessera.agent._types import Handoff, TaskContext, TaskResult, Usage

__all__ = [
    "AGENT_SERVICE_NAME",
    "DEFAULT_MAX_CONCURRENCY",
    "TASK_TOKEN_METADATA",
    "Agent",
    "AgentSettings",
    "Capability",
    "Handoff",
    "TaskContext",
    "TaskResult",
    "Usage",
    "build_contract",
]
