"""A small async client for calling the mesh (through the Envoy gateway or directly).

The gateway lets in only people with an identity token (``tessera login`` gets one):
pass it as ``token``, or set ``TESSERA_TOKEN``. It goes with every call as
``authorization: Bearer <token>``; the mesh records and authorizes everything you do in
the name the token proves.

async with MeshClient("127.0.0.1:8080", token=jwt) as mesh:
    workflow = await mesh.start("support", ticket={"text": "refund please"})
    async for event in mesh.watch(workflow.name):
        ...
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from tessera.runtime.grpc_client import channel
from tessera.runtime.history import TERMINAL_EVENTS
from tessera.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    events_pb2,
    registry_pb2,
    registry_pb2_grpc,
)

TOKEN_ENV = "TESSERA_TOKEN"


class MeshClient:
    def __init__(self, target: str, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self._channel = channel(
            target,
            service="client",
            default_timeout_s=timeout_s,
            metadata=[("authorization", f"Bearer {token}")] if token else (),
        )
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channel)
        """The registry's freeze switch (the gateway routes nothing else of it)."""

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def start(
        self, goal: str, *, request_id: str | None = None, **inputs: Any
    ) -> coordinator_pb2.Workflow:
        """Start a workflow; `request_id` makes a retried call return the same one."""
        values = struct_pb2.Struct()
        values.update(inputs)
        response = await self.stub.StartWorkflow(
            coordinator_pb2.StartWorkflowRequest(
                request_id=request_id or uuid.uuid4().hex, goal=goal, inputs=values
            )
        )
        return response.workflow

    async def get(self, name: str) -> coordinator_pb2.Workflow:
        response = await self.stub.GetWorkflow(coordinator_pb2.GetWorkflowRequest(name=name))
        return response.workflow

    async def list(
        self, *, state: int = 0, page_size: int = 50, page_token: str = ""
    ) -> coordinator_pb2.ListWorkflowsResponse:
        return await self.stub.ListWorkflows(
            coordinator_pb2.ListWorkflowsRequest(
                state=coordinator_pb2.WorkflowState.ValueType(state),
                page_size=page_size,
                page_token=page_token,
            )
        )

    async def watch(
        self, name: str, *, start_sequence: int = 1, stream_timeout_s: float = 290.0
    ) -> AsyncIterator[events_pb2.WorkflowEvent]:
        """Every event from `start_sequence` until the workflow ends. Servers bound one
        stream's life; the watch resumes after the last event it saw."""
        next_sequence = start_sequence
        while True:
            call = self.stub.WatchWorkflow(
                coordinator_pb2.WatchWorkflowRequest(name=name, start_sequence=next_sequence),
                timeout=stream_timeout_s,
            )
            try:
                async for item in call:
                    next_sequence = item.event.sequence + 1
                    yield item.event
                    if item.event.WhichOneof("kind") in TERMINAL_EVENTS:
                        return
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            finally:
                call.cancel()

    async def decide(self, gate: str, *, approve: bool, comment: str = "") -> coordinator_pb2.Gate:
        """Approve or reject ``gate`` in the name of this client's token."""
        decision = (
            coordinator_pb2.GATE_DECISION_APPROVE
            if approve
            else coordinator_pb2.GATE_DECISION_REJECT
        )
        response = await self.stub.DecideGate(
            coordinator_pb2.DecideGateRequest(name=gate, decision=decision, comment=comment)
        )
        return response.gate

    async def cancel(self, name: str, *, reason: str = "") -> coordinator_pb2.Workflow:
        response = await self.stub.CancelWorkflow(
            coordinator_pb2.CancelWorkflowRequest(name=name, reason=reason)
        )
        return response.workflow

    # -- the kill switch for one agent (people in the operators group) -------------------
    async def freeze_agent(self, name: str, *, reason: str = "") -> registry_pb2.FrozenAgent:
        """Freeze agent ``name`` (its tokens revoked, its registrations and tool calls
        refused until unfrozen); the freeze in force (the first, if it was frozen)."""
        response = await self.registry.FreezeAgent(
            registry_pb2.FreezeAgentRequest(name=name, reason=reason)
        )
        return response.frozen

    async def unfreeze_agent(self, name: str) -> bool:
        """Lift ``name``'s freeze; whether there was one."""
        response = await self.registry.UnfreezeAgent(registry_pb2.UnfreezeAgentRequest(name=name))
        return response.was_frozen

    async def frozen_agents(self) -> tuple[registry_pb2.FrozenAgent, ...]:
        response = await self.registry.ListFrozenAgents(registry_pb2.ListFrozenAgentsRequest())
        return tuple(response.agents)
