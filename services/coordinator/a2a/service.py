"""The A2A face (``lf.a2a.v1.A2AService``, the a2a-sdk package's contract) and the cards'
HTTP endpoint (``tessera.v1.AgentCardService``), served by the coordinator beside
CoordinatorService.

Every call goes through CoordinatorService's own handlers with the caller's context, so a
person reaching the A2A face through the front door is exactly as authenticated,
authorized (Cedar: start, read, cancel a workflow) and audited as through
CoordinatorService; nothing here decides who may do what. The tenant of a request is the
template's name (from the card); a message starts one workflow of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
from a2a.types import a2a_pb2, a2a_pb2_grpc
from google.api import httpbody_pb2
from google.protobuf import json_format

from services.coordinator.a2a.cards import AgentCards
from services.coordinator.a2a.errors import (
    PushNotificationNotSupported,
    TaskNotCancelable,
    TaskNotFound,
    UnsupportedOperation,
)
from services.coordinator.a2a.tasks import (
    INTERRUPTED,
    TERMINAL,
    inputs_of,
    request_id_for,
    task_of,
    task_state,
)
from services.coordinator.service import CoordinatorServicer
from tessera.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tessera.runtime.principal import principal_of
from tessera.v1 import agent_cards_pb2, agent_cards_pb2_grpc, coordinator_pb2

__all__ = ["A2A_SERVICE_NAME", "CARD_SERVICE_NAME", "A2AServicer", "AgentCardServicer"]

A2A_SERVICE_NAME = "lf.a2a.v1.A2AService"
CARD_SERVICE_NAME = "tessera.v1.AgentCardService"
_MAX_ID = 128
_MARGIN_S = 1.0
_NO_PUSH = "push notifications are not offered: stream or poll the task"
_STATE_FILTER = {
    a2a_pb2.TASK_STATE_SUBMITTED: coordinator_pb2.WORKFLOW_STATE_PENDING,
    a2a_pb2.TASK_STATE_WORKING: coordinator_pb2.WORKFLOW_STATE_RUNNING,
    a2a_pb2.TASK_STATE_INPUT_REQUIRED: coordinator_pb2.WORKFLOW_STATE_WAITING_APPROVAL,
    a2a_pb2.TASK_STATE_COMPLETED: coordinator_pb2.WORKFLOW_STATE_SUCCEEDED,
    a2a_pb2.TASK_STATE_FAILED: coordinator_pb2.WORKFLOW_STATE_FAILED,
    a2a_pb2.TASK_STATE_CANCELED: coordinator_pb2.WORKFLOW_STATE_CANCELLED,
}


def _check_id(value: str, field: str) -> None:
    if not value or len(value) > _MAX_ID:
        raise InvalidArgument(
            f"{field} is required (at most {_MAX_ID} characters)",
            field_violations=[(field, "required, at most 128 characters")],
        )


def _status_update(task: a2a_pb2.Task) -> a2a_pb2.StreamResponse:
    return a2a_pb2.StreamResponse(
        status_update=a2a_pb2.TaskStatusUpdateEvent(
            task_id=task.id, context_id=task.context_id, status=task.status, metadata=task.metadata
        )
    )


class A2AServicer(a2a_pb2_grpc.A2AServiceServicer):
    def __init__(
        self, coordinator: CoordinatorServicer, cards: AgentCards, *, wait_s: float
    ) -> None:
        self._coordinator = coordinator
        self._cards = cards
        self._wait_s = wait_s

    # -- starting --------------------------------------------------------------------
    async def _start(
        self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.Workflow:
        message = request.message
        _check_id(message.message_id, "message.message_id")
        if message.task_id:
            # A2A continues an input-required task with a message; Tessera's gates are
            # decided by people with the authority to, in Tessera, not by the requester.
            raise UnsupportedOperation(
                "a Tessera task takes no follow-up message: a waiting workflow's gate is "
                "decided in Tessera (console inbox or CoordinatorService.DecideGate)",
                metadata={"task": message.task_id[:_MAX_ID]},
            )
        if request.configuration.HasField("task_push_notification_config"):
            raise PushNotificationNotSupported(_NO_PUSH)
        template = (await self._cards.template(request.tenant)).name
        caller = principal_of(context).name
        started = await self._coordinator.StartWorkflow(
            coordinator_pb2.StartWorkflowRequest(
                request_id=request_id_for(caller, message.message_id),
                goal=template,
                inputs=inputs_of(message),
            ),
            context,
        )
        return started.workflow

    async def SendMessage(
        self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.SendMessageResponse:
        workflow = await self._start(request, context)
        task = task_of(workflow)
        if not request.configuration.return_immediately and task.status.state not in INTERRUPTED:
            # Blocking (A2A's default): answer once it ends or waits on a person, or at
            # the bound, with the task as it stands then.
            async for update in self._follow(task, context, within_s=self._within(context)):
                task = update
        return a2a_pb2.SendMessageResponse(task=task)

    async def SendStreamingMessage(
        self, request: a2a_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[a2a_pb2.StreamResponse]:
        task = task_of(await self._start(request, context))
        yield a2a_pb2.StreamResponse(task=task)
        if task.status.state in INTERRUPTED:  # a retried message of a waiting workflow
            return
        async for response in self._stream(task, context):
            yield response

    # -- following ---------------------------------------------------------------------
    def _within(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self._wait_s
        return max(0.0, min(self._wait_s, remaining - _MARGIN_S))

    async def _task(self, task_id: str, context: grpc.aio.ServicerContext) -> a2a_pb2.Task:
        return task_of(await self._workflow(task_id, context))

    async def _workflow(
        self, task_id: str, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.Workflow:
        _check_id(task_id, "id")
        try:
            got = await self._coordinator.GetWorkflow(
                coordinator_pb2.GetWorkflowRequest(name=f"workflows/{task_id}"), context
            )
        except NotFound as exc:
            raise TaskNotFound(f"no task {task_id}", metadata={"task": task_id}) from exc
        return got.workflow

    async def _follow(
        self,
        task: a2a_pb2.Task,
        context: grpc.aio.ServicerContext,
        *,
        within_s: float | None = None,
    ) -> AsyncIterator[a2a_pb2.Task]:
        """Each A2A state ``task`` takes after the one it has, up to one that ends it or
        waits on a person (or until ``within_s`` passes): subscribing to a waiting task
        follows it from the decision on. Reads the workflow after each of its events."""
        if task.status.state in TERMINAL:
            return
        workflow = await self._workflow(task.id, context)
        state = task.status.state
        watch = self._coordinator.WatchWorkflow(
            coordinator_pb2.WatchWorkflowRequest(
                name=workflow.name, start_sequence=workflow.event_count + 1
            ),
            context,
        )
        try:
            async with asyncio.timeout(within_s):
                while True:
                    current = task_of(workflow)
                    if current.status.state != state:
                        state = current.status.state
                        yield current
                        if state in TERMINAL | INTERRUPTED:
                            return
                    try:
                        await anext(watch)
                    except StopAsyncIteration:  # it ended: read how
                        workflow = await self._workflow(task.id, context)
                        if task_state(workflow) not in TERMINAL:
                            return
                        continue
                    workflow = await self._workflow(task.id, context)
        except TimeoutError:
            return
        finally:
            close = getattr(watch, "aclose", None)  # an async generator: end its watch now
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    async def _stream(
        self, task: a2a_pb2.Task, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[a2a_pb2.StreamResponse]:
        async for update in self._follow(task, context):
            if update.status.state == a2a_pb2.TASK_STATE_COMPLETED:
                for artifact in update.artifacts:
                    yield a2a_pb2.StreamResponse(
                        artifact_update=a2a_pb2.TaskArtifactUpdateEvent(
                            task_id=update.id,
                            context_id=update.context_id,
                            artifact=artifact,
                            last_chunk=True,
                        )
                    )
            yield _status_update(update)

    # -- tasks -------------------------------------------------------------------------
    async def _task_of_tenant(
        self, tenant: str, task_id: str, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.Task:
        task = await self._task(task_id, context)
        if tenant and task.metadata["template"] != tenant:
            raise TaskNotFound(
                f"no task {task_id} of {tenant!r}",
                metadata={"task": task_id, "tenant": tenant[:_MAX_ID]},
            )
        return task

    async def GetTask(
        self, request: a2a_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.Task:
        return await self._task_of_tenant(request.tenant, request.id, context)

    async def SubscribeToTask(
        self, request: a2a_pb2.SubscribeToTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[a2a_pb2.StreamResponse]:
        task = await self._task_of_tenant(request.tenant, request.id, context)
        if task.status.state in TERMINAL:
            raise UnsupportedOperation(
                f"task {task.id} has ended ({a2a_pb2.TaskState.Name(task.status.state)}): "
                "read it with GetTask",
                metadata={"task": task.id},
            )
        yield a2a_pb2.StreamResponse(task=task)
        async for response in self._stream(task, context):
            yield response

    async def CancelTask(
        self, request: a2a_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.Task:
        await self._task_of_tenant(request.tenant, request.id, context)
        reason = request.metadata.fields.get("reason")
        try:
            cancelled = await self._coordinator.CancelWorkflow(
                coordinator_pb2.CancelWorkflowRequest(
                    name=f"workflows/{request.id}",
                    reason=(reason.string_value[:256] if reason else "") or "cancelled over A2A",
                ),
                context,
            )
        except FailedPrecondition as exc:  # it has ended, or is ending (compensating)
            raise TaskNotCancelable(exc.message, metadata={"task": request.id}) from exc
        return task_of(cancelled.workflow)

    async def ListTasks(
        self, request: a2a_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.ListTasksResponse:
        state = _STATE_FILTER.get(request.status, coordinator_pb2.WORKFLOW_STATE_UNSPECIFIED)
        if request.status and not state:
            raise InvalidArgument(
                "tasks in that state do not exist here",
                field_violations=[("status", a2a_pb2.TaskState.Name(request.status))],
            )
        listed = await self._coordinator.ListWorkflows(
            coordinator_pb2.ListWorkflowsRequest(
                page_size=request.page_size,
                page_token=request.page_token,
                template=request.tenant,
                state=state,
            ),
            context,
        )
        tasks = [task_of(w) for w in listed.workflows]
        if not request.include_artifacts:
            for task in tasks:
                del task.artifacts[:]
        return a2a_pb2.ListTasksResponse(
            tasks=tasks, next_page_token=listed.next_page_token, page_size=len(tasks)
        )

    async def GetExtendedAgentCard(
        self, request: a2a_pb2.GetExtendedAgentCardRequest, context: grpc.aio.ServicerContext
    ) -> a2a_pb2.AgentCard:
        principal_of(context)  # a person (or the operator): the route requires a token
        return await self._cards.card(request.tenant)

    # -- push notifications: not offered (the card says so) ----------------------------
    async def _no_push(self) -> None:
        raise PushNotificationNotSupported(_NO_PUSH)

    async def CreateTaskPushNotificationConfig(self, request, context):  # type: ignore[no-untyped-def]
        await self._no_push()

    async def GetTaskPushNotificationConfig(self, request, context):  # type: ignore[no-untyped-def]
        await self._no_push()

    async def ListTaskPushNotificationConfigs(self, request, context):  # type: ignore[no-untyped-def]
        await self._no_push()

    async def DeleteTaskPushNotificationConfig(self, request, context):  # type: ignore[no-untyped-def]
        await self._no_push()


def _json_body(value: object) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(
        content_type="application/json", data=json.dumps(value, sort_keys=True).encode()
    )


class AgentCardServicer(agent_cards_pb2_grpc.AgentCardServiceServicer):
    """The cards and their keys as plain HTTP GETs (through the transcoder)."""

    def __init__(self, cards: AgentCards) -> None:
        self._cards = cards

    async def GetAgentCard(
        self, request: agent_cards_pb2.GetAgentCardRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        if not request.template or len(request.template) > _MAX_ID:
            raise InvalidArgument(
                "template is required", field_violations=[("template", "required")]
            )
        card = await self._cards.card(request.template)
        return _json_body(json_format.MessageToDict(card))

    async def GetAgentCardKeys(
        self, request: agent_cards_pb2.GetAgentCardKeysRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return _json_body(await self._cards.jwks())
