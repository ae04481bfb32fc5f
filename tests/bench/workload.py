"""The benchmarked workflow, defined once for both sides.

supervisor -> worker -> supervisor -> synthesizer, with trivial steps. The three step
functions below are pure and shared: the mesh agent and the LangGraph nodes both call
them, so the only difference between the two sides is the runtime around them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import duration_pb2

from tessera.agent import Agent, Handoff, TaskContext, TaskResult
from tessera.v1 import common_pb2, planner_pb2

# -- the shared trivial step functions ------------------------------------------------


def supervise(work: str | None) -> str:
    """First call: route to the worker; once the worker wrote `work`: finish."""
    return "finish" if work else "worker"


def do_work(goal: str) -> str:
    return f"done: {goal}"


def synthesize(work: str | None) -> dict[str, Any]:
    return {"answer": (work or "").upper()}


# -- mesh side: one agent offering the three capabilities ---------------------------

SUPERVISOR = "bench.supervisor"
WORKER = "bench.worker"
SYNTHESIZER = "bench.synthesizer"
STEP = "bench.step"
# Far above any concurrency of the sweep, so the SDK's per-capability limit never
# refuses an attempt (a refusal would be a retry with backoff, not a benchmark figure).
AGENT_CONCURRENCY = 4096

agent = Agent("bench", version="1.0.0")


@agent.capability(
    SUPERVISOR,
    version="1.0.0",
    side_effect="read_only",
    reads=["work"],
    handoffs=[WORKER],
    max_concurrency=AGENT_CONCURRENCY,
)
async def supervisor(ctx: TaskContext) -> TaskResult:
    """Hands off to the worker, then finishes once the worker wrote `work`."""
    if supervise(ctx.blackboard.get("work")) == "worker":
        return TaskResult(
            output={"route": "worker"},
            handoff=Handoff(WORKER, reason="needs work", input=dict(ctx.input)),
        )
    return TaskResult(output={"route": "finish"})


@agent.capability(
    WORKER,
    version="1.0.0",
    side_effect="read_only",
    writes=["work"],
    handoffs=[SUPERVISOR],
    max_concurrency=AGENT_CONCURRENCY,
)
async def worker(ctx: TaskContext) -> TaskResult:
    """Writes `work` and hands back to the supervisor. `hold_s` in the input makes it
    wait first (the resume measurement uses it to keep steps in flight)."""
    hold = float(ctx.input.get("hold_s") or 0)
    if hold:
        await asyncio.sleep(hold)
    return TaskResult(
        output={"ok": True},
        writes={"work": do_work(str(ctx.input.get("goal", "")))},
        handoff=Handoff(SUPERVISOR, reason="work written"),
    )


@agent.capability(
    SYNTHESIZER,
    version="1.0.0",
    side_effect="read_only",
    reads=["work"],
    max_concurrency=AGENT_CONCURRENCY,
)
async def synthesizer(ctx: TaskContext) -> TaskResult:
    """Turns the worker's result into the answer."""
    return TaskResult(output=synthesize(ctx.blackboard.get("work")))


@agent.capability(
    STEP,
    version="1.0.0",
    side_effect="read_only",
    writes=["blob", "count"],
    max_concurrency=AGENT_CONCURRENCY,
)
async def step(ctx: TaskContext) -> TaskResult:
    """One step of the long workflow: the first writes `blob` (``blob_bytes`` in its
    input), every step writes its own number to `count`. It reads nothing, so what a
    step costs the mesh beyond the hop is the coordinator's handling of a workflow that
    holds a large blackboard and many tasks."""
    size = int(ctx.input.get("blob_bytes") or 0)
    writes: dict[str, Any] = {"count": int(ctx.input.get("n") or 0)}
    if size:
        writes["blob"] = "x" * size
    return TaskResult(output={"ok": True}, writes=writes)


BUDGET = common_pb2.Budget(
    max_tokens=1000, max_cost_micros=1000, max_tool_calls=10, max_iterations=20
)


def _spec(task_id: str, capability: str, *deps: str, **inputs: Any) -> planner_pb2.TaskSpec:
    spec = planner_pb2.TaskSpec(
        id=task_id,
        capability=capability,
        version="^1.0",
        depends_on=list(deps),
        max_attempts=3,
        timeout=duration_pb2.Duration(seconds=30),
    )
    if inputs:
        spec.input.update(inputs)
    return spec


def supervisor_plan(*, hold_s: float = 0.0) -> planner_pb2.TaskGraph:
    """The explicit TaskGraph: `sup` (hands off to the worker, which hands back) and
    `synth` depending on the end of `sup`'s handoff chain: 4 agent executions."""
    inputs: dict[str, Any] = {"goal": "bench"}
    if hold_s:
        inputs["hold_s"] = hold_s
    return planner_pb2.TaskGraph(
        template="bench-supervisor",
        budget=BUDGET,
        tasks=[_spec("sup", SUPERVISOR, **inputs), _spec("synth", SYNTHESIZER, "sup")],
    )


LONG_STEPS = 40
LONG_WIDTH = 4
LONG_BLOB_BYTES = 256 * 1024


def long_plan(
    *, steps: int = LONG_STEPS, width: int = LONG_WIDTH, blob_bytes: int = LONG_BLOB_BYTES
) -> planner_pb2.TaskGraph:
    """``steps`` tasks in ``width`` chains (the planner caps a dependency chain at 10
    tasks), the first of which writes a ``blob_bytes`` blackboard value: the per-step cost
    of a large workflow, beside the 4-step one's."""
    tasks = []
    for i in range(steps):
        deps = [f"s{i - width}"] if i >= width else []
        inputs: dict[str, Any] = {"n": i}
        if i == 0:
            inputs["blob_bytes"] = blob_bytes
        tasks.append(_spec(f"s{i}", STEP, *deps, **inputs))
    budget = common_pb2.Budget()
    budget.CopyFrom(BUDGET)
    budget.max_iterations = steps * 2
    return planner_pb2.TaskGraph(template="bench-long", budget=budget, tasks=tasks)


def parked_plan() -> planner_pb2.TaskGraph:
    """An approval gate first: the workflow parks on it before any agent runs."""
    gate = planner_pb2.TaskSpec(
        id="approve", kind=planner_pb2.TASK_KIND_APPROVAL_GATE, gate_reason="bench: park"
    )
    graph = supervisor_plan()
    graph.template = "bench-parked"
    graph.tasks.insert(0, gate)
    graph.tasks[1].depends_on.append("approve")
    return graph
