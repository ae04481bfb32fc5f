"""Values an agent handler receives and returns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from google.protobuf.message import Message

from tessera.v1 import common_pb2

__all__ = ["Handoff", "TaskContext", "TaskResult", "ToolCaller", "Usage"]

ToolCaller = Callable[["TaskContext", str, Mapping[str, Any], str], Awaitable[dict[str, Any]]]
"""How a context reaches the tool proxy: (ctx, tool, arguments, idempotency_key) -> result."""


@dataclass(frozen=True)
class Usage:
    """What one execution consumed. ``tool_calls`` defaults to the calls made through
    :meth:`TaskContext.call_tool` when left at 0."""

    tokens: int = 0
    cost_micros: int = 0
    tool_calls: int = 0


@dataclass(frozen=True)
class Handoff:
    """Ask the coordinator to route the workflow to ``capability`` next (it must be listed
    in the capability's ``handoffs``)."""

    capability: str
    reason: str = ""
    input: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TaskResult:
    """What a handler returns.

    ``output`` is a JSON object (or a protobuf message for typed capabilities); ``writes``
    are blackboard writes (keys must be declared in ``writes``); ``confidence`` in [0, 1]
    or ``None`` when not reported; ``approval_request`` parks the workflow on a human gate
    with that reason before the output takes effect.
    """

    output: Mapping[str, Any] | Message | None = None
    writes: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    handoff: Handoff | None = None
    confidence: float | None = None
    usage: Usage = field(default_factory=Usage)
    approval_request: str | None = None


async def _no_tools(
    ctx: TaskContext, tool: str, arguments: Mapping[str, Any], key: str
) -> dict[str, Any]:
    from tessera.runtime.errors import FailedPrecondition

    raise FailedPrecondition(
        f"tool {tool!r}: this task context has no tool proxy", reason="NO_TOOL_PROXY"
    )


@dataclass
class TaskContext:
    """Everything one task attempt sees.

    ``input`` is the task's JSON input; ``blackboard`` holds only the keys the capability
    declared in ``reads``; ``log`` is bound with agent, capability, workflow and task ids.
    Handlers may construct one directly in unit tests. The task token is never part of
    the repr and must never be logged.
    """

    capability: str
    workflow_id: str = "wf-test"
    task_id: str = "task-test"
    attempt: int = 1
    input: dict[str, Any] = field(default_factory=dict)
    blackboard: dict[str, Any] = field(default_factory=dict)
    blackboard_version: int = 0
    remaining_budget: common_pb2.Budget = field(default_factory=common_pb2.Budget)
    causation_id: str = ""
    traceparent: str = ""
    payload: common_pb2.Payload = field(default_factory=common_pb2.Payload, repr=False)
    """The raw input payload (typed capabilities unpack ``payload.typed`` themselves)."""
    tool_proxy_endpoint: str = ""
    task_token: str = field(default="", repr=False)
    log: Any = field(default=None, repr=False)
    tool_calls: int = 0
    """Tool calls made so far through :meth:`call_tool`."""
    deadline: float | None = None
    """When the attempt's capability timeout ends (``time.monotonic()`` seconds; None in
    hand-made contexts): :meth:`call_tool` gives each call what is left of it."""
    _tool_caller: ToolCaller = field(default=_no_tools, repr=False)

    def __post_init__(self) -> None:
        if self.log is None:
            self.log = structlog.get_logger("tessera.agent").bind(
                capability=self.capability,
                workflow_id=self.workflow_id,
                task_id=self.task_id,
                attempt=self.attempt,
            )

    def get(self, key: str, default: Any = None) -> Any:
        """``blackboard[key]`` if present, else ``input[key]``, else ``default``."""
        if key in self.blackboard:
            return self.blackboard[key]
        return self.input.get(key, default)

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Call ``name`` through ``tessera.v1.ToolProxyService/InvokeTool`` with this task's
        token; returns the tool's JSON result. Failures raise ``grpc.aio.AioRpcError`` with
        the proxy's status (PERMISSION_DENIED, FAILED_PRECONDITION for approval…).
        Side-effecting tools need an ``idempotency_key``; by default
        ``<workflow>/<task>/<tool>/<n>`` is used, stable across attempts of the task."""
        self.tool_calls += 1
        key = idempotency_key or f"{self.workflow_id}/{self.task_id}/{name}/{self.tool_calls}"
        return await self._tool_caller(self, name, dict(arguments or {}), key)
