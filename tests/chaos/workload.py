"""W(N, T) of mixed reference workflows through the front door, as clients and approvers
that keep going through faults: N clients each start the next workflow when the last
one ended, for T seconds.

The mix: small refunds (run directly), refunds above 1,000 (the tool proxy parks them on
an approval gate; the client approves through `DecideGate`), technical tickets, risk
assessments (fan-out with an optional slow branch) and procurement (handoffs with a
blackboard rollback). Clients behave as a well-written client of any language would:
`StartWorkflow` is retried with the same request id (idempotent), reads and decisions
are retried on UNAVAILABLE, and a broken watch stream is re-opened.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2

from tessera.runtime.errors import error_details
from tessera.runtime.grpc_client import channel
from tessera.v1 import coordinator_pb2, coordinator_pb2_grpc

WS = coordinator_pb2.WorkflowState
TERMINAL = {
    WS.WORKFLOW_STATE_SUCCEEDED,
    WS.WORKFLOW_STATE_FAILED,
    WS.WORKFLOW_STATE_CANCELLED,
    WS.WORKFLOW_STATE_COMPENSATED,
}
# What a client treats as "try again": the mesh or its front door is restarting.
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
GIVE_UP_S = 120.0
"""A client retries one call for at most this long (every retry is bounded in time)."""


@dataclass
class Load:
    started: dict[str, str] = field(default_factory=dict)
    """workflow name -> kind of the mix"""
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    finished_at: list[float] = field(default_factory=list)
    """monotonic time of every workflow's end, in order"""
    approvals: int = 0
    refused: int = 0
    """StartWorkflow calls refused by admission control (RESOURCE_EXHAUSTED)."""
    retried: Counter[str] = field(default_factory=Counter)
    """Calls a client had to retry, by the status that made it retry."""

    def stall_after(self, t0: float, window_s: float = 60.0) -> float:
        """Longest time without a workflow ending, from ``t0`` on: the fault's pause."""
        ends = [t for t in self.finished_at if t0 <= t <= t0 + window_s]
        marks = [t0, *ends]
        return max((b - a for a, b in itertools.pairwise(marks)), default=window_s)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def request_for(kind: str, i: int, n: int) -> tuple[str, dict[str, Any]]:
    """The goal and inputs of the ``n``-th workflow of client ``i`` of the given kind."""
    tag = f"{i}-{n}"
    if kind == "small_refund":
        text = f"please refund {10 + n % 90} for the double charge"
        return "support", {"ticket": {"id": f"S-{tag}", "customer_id": f"C-{i}", "text": text}}
    if kind == "large_refund":
        text = f"please refund {1500 + n % 100} for the duplicate annual charge"
        return "support", {"ticket": {"id": f"L-{tag}", "customer_id": f"C-{i}", "text": text}}
    if kind == "technical":
        text = "the app shows an error and crashes on start"
        return "support", {"ticket": {"id": f"T-{tag}", "customer_id": f"C-{i}", "text": text}}
    if kind == "risk":
        transactions = [120, 8_000 + n, 45, 2_300]
        customer = {"id": f"R-{tag}", "income": 50_000 + n, "transactions": transactions}
        return "risk", {"customer": customer, "fast": True}
    if kind == "procurement":
        return "procurement", {"item": "laptops", "quantity": 100, "max_budget": 10_000}
    raise ValueError(kind)


MIX = ("small_refund", "technical", "small_refund", "large_refund", "risk", "procurement")


@dataclass(frozen=True)
class People:
    """Identity tokens for the front door: who starts the workflows, and who decides their
    gates (a finance approver: refunds and support escalations are theirs to decide)."""

    requester: str
    approver: str


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _rate_limited(err: grpc.aio.AioRpcError) -> bool:
    """Refused by Envoy's rate limit (no error details), not by the mesh's admission
    control (``MESH_BUSY``, which :meth:`Client.start` counts and waits out itself)."""
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_details(err).reason == ""


def _ratelimit_reset_s(err: grpc.aio.AioRpcError) -> float:
    for metadata in (err.initial_metadata(), err.trailing_metadata()):
        for key, value in metadata or ():
            if key == "x-ratelimit-reset" and isinstance(value, str) and value.isdigit():
                return min(float(value), 2.0)
    return 0.0


class Client:
    """One client of the mesh through its front door."""

    def __init__(self, address: str, people: People) -> None:
        self.channel = channel(address, default_timeout_s=10, metadata=_bearer(people.requester))
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)
        self._approver_channel = channel(
            address, default_timeout_s=10, metadata=_bearer(people.approver)
        )
        self.approver = coordinator_pb2_grpc.CoordinatorServiceStub(self._approver_channel)
        self.retried: Counter[str] = Counter()
        self._watch_backoff_s = 0.0

    async def close(self) -> None:
        await self.channel.close()
        await self._approver_channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        give_up = time.monotonic() + GIVE_UP_S
        delay = 0.05
        while True:
            pause = delay
            try:
                return await method(request, timeout=10)
            except grpc.aio.AioRpcError as err:
                if time.monotonic() > give_up:
                    raise
                if _rate_limited(err):
                    # The front door's per-person bucket (all clients are one person):
                    # wait until it refills, as its x-ratelimit-reset says.
                    self.retried["RATE_LIMITED"] += 1
                    pause = max(delay, _ratelimit_reset_s(err))
                elif err.code() in RETRY:
                    self.retried[err.code().name] += 1
                else:
                    raise
            await asyncio.sleep(pause)  # backoff between retries of a refused call
            delay = min(1.0, delay * 2)

    async def start(self, goal: str, inputs: dict[str, Any], load: Load) -> str:
        """Start it; while the mesh refuses new work (RESOURCE_EXHAUSTED, admission
        control), wait as its RetryInfo says and try again with the same request id."""
        request = coordinator_pb2.StartWorkflowRequest(
            request_id=uuid.uuid4().hex, goal=goal, inputs=_struct(inputs)
        )
        give_up = time.monotonic() + GIVE_UP_S
        while True:
            try:
                response = await self._call(self.stub.StartWorkflow, request)
                return str(response.workflow.name)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > give_up:
                    raise
                load.refused += 1
                await asyncio.sleep(error_details(err).retry_after_s or 1.0)

    async def get(self, name: str) -> coordinator_pb2.Workflow:
        request = coordinator_pb2.GetWorkflowRequest(name=name)
        return (await self._call(self.stub.GetWorkflow, request)).workflow

    async def approve(self, gate: str) -> None:
        request = coordinator_pb2.DecideGateRequest(
            name=gate, decision=coordinator_pb2.GATE_DECISION_APPROVE
        )
        await self._call(self.approver.DecideGate, request)

    async def until_terminal(
        self, name: str, load: Load, timeout_s: float
    ) -> coordinator_pb2.Workflow:
        """Follow the workflow, approving its gates, until it ends; the watch stream is
        re-opened after a fault (it is the front door or coordinator that restarted)."""
        give_up = time.monotonic() + timeout_s
        decided: set[str] = set()
        while True:
            workflow = await self.get(name)
            for gate in workflow.gates:
                if gate.state == coordinator_pb2.GATE_STATE_PENDING and gate.name not in decided:
                    await self.approve(gate.name)
                    decided.add(gate.name)
                    load.approvals += 1
            if workflow.state in TERMINAL:
                return workflow
            if time.monotonic() > give_up:
                raise AssertionError(f"{name} not terminal after {timeout_s:g}s")
            await self._watch_until_change(name, workflow.event_count, give_up)

    async def _watch_until_change(self, name: str, seen: int, give_up: float) -> None:
        """Return at the first event after ``seen`` (or when the stream breaks)."""
        left = max(0.5, give_up - time.monotonic())
        call = self.stub.WatchWorkflow(
            coordinator_pb2.WatchWorkflowRequest(name=name, start_sequence=seen + 1),
            timeout=min(left, 30.0),
        )
        try:
            async for _ in call:
                self._watch_backoff_s = 0.0
                return
        except grpc.aio.AioRpcError:
            # The stream broke in a fault: back off (longer each time it breaks again, as
            # while its coordinator is down), then re-read.
            self._watch_backoff_s = min(1.0, max(0.1, self._watch_backoff_s * 2))
            await asyncio.sleep(self._watch_backoff_s)
        finally:
            call.cancel()


async def run(
    address: str, people: People, clients: int, seconds: float, *, mix: tuple[str, ...] = MIX
) -> Load:
    load = Load()
    stop_at = time.monotonic() + seconds

    async def one(i: int) -> None:
        client = Client(address, people)
        n = 0
        try:
            while time.monotonic() < stop_at:
                kind = mix[(i + n) % len(mix)]
                goal, inputs = request_for(kind, i, n)
                began = time.monotonic()
                name = await client.start(goal, inputs, load)
                load.started[name] = kind
                workflow = await client.until_terminal(name, load, timeout_s=GIVE_UP_S)
                load.finished_at.append(time.monotonic())
                load.latencies[name] = time.monotonic() - began
                load.outcomes[WS.Name(workflow.state)] += 1
                if workflow.state != WS.WORKFLOW_STATE_SUCCEEDED:
                    load.errors[name] = workflow.error.message
                n += 1
        finally:
            load.retried.update(client.retried)
            await client.close()

    await asyncio.gather(*(one(i) for i in range(clients)))
    load.finished_at.sort()
    return load
