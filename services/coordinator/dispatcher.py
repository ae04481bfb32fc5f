"""Sends task attempts to agents over gRPC, with deadlines, on long-lived channels: over
one ExecuteTasks stream per agent replica (services/coordinator/task_streams.py), or a
unary ExecuteTask call each for an agent that does not implement the stream."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import struct_pb2

from services.coordinator.engine import Dispatch
from services.coordinator.state import WorkflowRecord, dict_to_struct
from services.coordinator.task_streams import StreamUnsupported, TaskStream
from tessera.registry import Registry
from tessera.runtime.identity import Workload
from tessera.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = structlog.get_logger(__name__)


class NoAgent(Exception):
    """No live replica offers the capability (retried with backoff like any failure)."""


@dataclass(frozen=True)
class Answer:
    response: agent_pb2.ExecuteTaskResponse
    contract: common_pb2.CapabilityContract
    agent_instance: str


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        workload: Workload,
        *,
        tool_proxy_address: str = "",
        task_streams: bool = True,
    ) -> None:
        self.registry = registry
        self.workload = workload
        self.tool_proxy_address = tool_proxy_address
        self.task_streams = task_streams
        """Whether attempts go over ExecuteTasks streams (False: unary calls only)."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[str, TaskStream] = {}
        self._unary: set[str] = set()
        """Replicas (key) that answered UNIMPLEMENTED to ExecuteTasks."""
        self._round_robin = itertools.count()

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    @staticmethod
    def _key(agent: agent_pb2.AgentDescriptor) -> str:
        return f"{agent.name}@{agent.endpoint}"

    def _stub(self, agent: agent_pb2.AgentDescriptor) -> agent_pb2_grpc.AgentServiceStub:
        key = self._key(agent)
        ch = self._channels.get(key)
        if ch is None:
            # The channel accepts only a server holding the certificate of the agent the
            # registry names: an entry pointing elsewhere fails the handshake, and no task
            # (nor its task token) reaches whoever listens there.
            # ExecuteTask is idempotent on (task_id, attempt): transport retries are safe.
            ch = self._channels[key] = self.workload.channel(
                agent.endpoint, peer=self.workload.peer("agent", agent.name), service="coordinator"
            )
        return agent_pb2_grpc.AgentServiceStub(ch)

    async def pick(
        self, capability: str, version: str
    ) -> tuple[agent_pb2.AgentDescriptor, common_pb2.CapabilityContract]:
        replicas = await self.registry.find(capability, version)
        if not replicas:
            self.registry.invalidate()
            raise NoAgent(f"no live agent offers {capability} {version}".strip())
        # Prefer the highest version; spread load over its replicas.
        best = replicas[0][1].version
        same = [r for r in replicas if r[1].version == best]
        return same[next(self._round_robin) % len(same)]

    def request(
        self,
        rec: WorkflowRecord,
        dispatch: Dispatch,
        contract: common_pb2.CapabilityContract,
        *,
        task_token: str = "",
    ) -> agent_pb2.ExecuteTaskRequest:
        """The request for one attempt, built from the snapshot at dispatch time. The
        agent sees only the blackboard keys its contract reads."""
        task = rec.tasks[dispatch.task_id]
        reads = set(contract.reads)
        request = agent_pb2.ExecuteTaskRequest(
            context=common_pb2.RequestContext(
                workflow_id=rec.id,
                task_id=dispatch.task_id,
                causation_id=f"{rec.id}.{rec.seq}",
                principal="coordinator",
            ),
            capability=dispatch.capability,
            attempt=dispatch.attempt,
            input=common_pb2.Payload(json=dict_to_struct(task.input)),
            blackboard={k: _value(v) for k, v in rec.blackboard.items() if k in reads},
            blackboard_version=rec.blackboard_version,
            task_token=task_token,
            tool_proxy_endpoint=self.tool_proxy_address,
        )
        budget = rec.graph().budget
        reserved = task.reserved
        if reserved is not None:
            # What this attempt reserved: all it may consume (its reported usage is
            # checked against it). Uncapped dimensions stay 0 ("no cap").
            request.remaining_budget.CopyFrom(
                common_pb2.Budget(
                    max_tokens=reserved.tokens if budget.max_tokens else 0,
                    max_cost_micros=reserved.cost_micros if budget.max_cost_micros else 0,
                    max_tool_calls=reserved.tool_calls if budget.max_tool_calls else 0,
                )
            )
            return request
        request.remaining_budget.CopyFrom(
            common_pb2.Budget(
                max_tokens=max(0, budget.max_tokens - rec.usage.tokens),
                max_cost_micros=max(0, budget.max_cost_micros - rec.usage.cost_micros),
                max_tool_calls=max(0, budget.max_tool_calls - rec.usage.tool_calls),
            )
        )
        return request

    async def send(
        self,
        agent: agent_pb2.AgentDescriptor,
        contract: common_pb2.CapabilityContract,
        request: agent_pb2.ExecuteTaskRequest,
        timeout_s: float,
    ) -> Answer:
        key = self._key(agent)
        response: agent_pb2.ExecuteTaskResponse | None = None
        if self.task_streams and key not in self._unary:
            stream = self._streams.get(key)
            if stream is None or stream.broken:
                stream = self._streams[key] = TaskStream(self._stub(agent))
            try:
                response = await stream.send(request, timeout_s)
            except StreamUnsupported:
                log.info("agent_without_task_streams", agent=agent.name, endpoint=agent.endpoint)
                self._unary.add(key)
        if response is None:
            response = await self._stub(agent).ExecuteTask(request, timeout=timeout_s)
        # The replica that ran it says who it is; an older agent leaves it empty.
        return Answer(response, contract, response.instance_id or agent.instance_id)


def _value(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    holder = struct_pb2.Struct()
    holder.update({"v": value})
    out.CopyFrom(holder.fields["v"])
    return out
