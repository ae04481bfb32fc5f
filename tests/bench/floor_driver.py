"""`python -m tests.bench.floor_driver --agent ADDR --concurrency N --duration S`: the
floor of the workflow benchmark. The same supervisor workflow against the same bench
agent process the mesh run uses, over the same ExecuteTask calls, driven by a minimal
in-process orchestrator with no durability at all: no coordinator, no snapshot, no event,
no work queue, nothing written before a step is dispatched. N concurrent clients, each
running workflows one after the other; a workflow walks the plan (`supervisor_plan()`) the
way the coordinator does: `sup`, then the handoffs its chain returns (`sup.1` the worker,
`sup.2` the supervisor again), then `synth`, with the blackboard kept in memory and each
agent sent only the keys its contract reads. Prints one JSON object like the mesh
driver's.

What it still pays, because the agent is the mesh's own: four gRPC round trips per
workflow, the agent SDK's work per execution (validation, dedup cache, contract checks)
and the SDK's awaited `executed` record on JetStream (one publish per execution).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import grpc
import uvloop
from google.protobuf import json_format, struct_pb2

from tessera.runtime.grpc_client import channel
from tessera.v1 import agent_pb2, agent_pb2_grpc, common_pb2, planner_pb2
from tests.bench.load import closed_loop, driver_parser
from tests.bench.workload import agent, supervisor_plan

MAX_CHAIN = 20  # the plan's max_iterations: a runaway handoff loop ends the workflow
READS = {c.name: frozenset(c.reads) for c in agent.descriptor().capabilities}
EXPECTED = {"answer": "DONE: BENCH"}


class Workflow:
    """One run of the plan, in memory."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceStub, plan: planner_pb2.TaskGraph):
        self.stub = stub
        self.plan = plan
        self.id = uuid.uuid4().hex[:20]
        self.blackboard: dict[str, struct_pb2.Value] = {}
        self.version = 0
        self.calls = 0
        self.budget = common_pb2.Budget(
            max_tokens=plan.budget.max_tokens,
            max_cost_micros=plan.budget.max_cost_micros,
            max_tool_calls=plan.budget.max_tool_calls,
        )

    async def execute(
        self, task_id: str, capability: str, payload: struct_pb2.Struct, timeout_s: float
    ) -> agent_pb2.ExecuteTaskResponse:
        self.calls += 1
        reads = READS.get(capability, frozenset())
        request = agent_pb2.ExecuteTaskRequest(
            context=common_pb2.RequestContext(
                workflow_id=self.id,
                task_id=task_id,
                causation_id=f"{self.id}.{self.calls}",
                principal="floor",
            ),
            capability=capability,
            attempt=1,
            input=common_pb2.Payload(json=payload),
            blackboard={k: v for k, v in self.blackboard.items() if k in reads},
            blackboard_version=self.version,
            remaining_budget=self.budget,
        )
        response: agent_pb2.ExecuteTaskResponse = await self.stub.ExecuteTask(
            request, timeout=timeout_s
        )
        if response.blackboard_writes:
            for key, value in response.blackboard_writes.items():
                self.blackboard[key] = value
            self.version += 1
        return response

    async def run(self) -> str:
        """Every task of the plan in order, each followed by its handoff chain; returns
        the outcome (`workflow_completed` when the synthesizer's answer is right)."""
        last: agent_pb2.ExecuteTaskResponse | None = None
        for spec in self.plan.tasks:
            timeout = spec.timeout.seconds or 30
            last = await self.execute(spec.id, spec.capability, spec.input, timeout)
            for hop in range(1, MAX_CHAIN + 1):
                if not last.HasField("handoff"):
                    break
                handoff = last.handoff
                last = await self.execute(
                    f"{spec.id}.{hop}", handoff.capability, handoff.input.json, timeout
                )
            else:
                return "workflow_failed"
        if last is None or json_format.MessageToDict(last.output.json) != EXPECTED:
            return "wrong_result"
        return "workflow_completed"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    plan = supervisor_plan()
    # One channel to the agent, as the coordinator's dispatcher keeps (same options and
    # interceptors: tessera.runtime.grpc_client.channel).
    ch = channel(args.agent, service="bench-floor")
    stub = agent_pb2_grpc.AgentServiceStub(ch)

    async def one(_: int) -> tuple[str, float]:
        began = time.perf_counter()
        try:
            kind = await Workflow(stub, plan).run()
        except grpc.aio.AioRpcError as exc:
            kind = f"rpc_{exc.code().name.lower()}"
        return kind, time.perf_counter() - began

    try:
        return await closed_loop(
            one, concurrency=args.concurrency, warmup=args.warmup, duration=args.duration
        )
    finally:
        await ch.close()


if __name__ == "__main__":
    parser = driver_parser()
    parser.add_argument("--agent", required=True)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
