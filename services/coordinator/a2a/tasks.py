"""A workflow as an A2A task, and an A2A message as a workflow's start.

One message starts one workflow of the tenant's template; the task id (and its context
id) is the workflow's id. States map as:

=========================== =====================================================
workflow                    A2A task
=========================== =====================================================
PENDING                     SUBMITTED
RUNNING, COMPENSATING       WORKING
WAITING_APPROVAL            INPUT_REQUIRED (until a person decides in Tessera)
SUCCEEDED                   COMPLETED, the result as a data artifact
FAILED, COMPENSATED         FAILED (COMPENSATED: failed, effects undone)
CANCELLED                   CANCELED
=========================== =====================================================
"""

from __future__ import annotations

import hashlib

from a2a.types import a2a_pb2
from google.protobuf import struct_pb2

from services.coordinator.a2a.errors import ContentTypeNotSupported
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import coordinator_pb2

__all__ = [
    "INTERRUPTED",
    "RESULT_ARTIFACT",
    "TERMINAL",
    "inputs_of",
    "request_id_for",
    "task_of",
    "task_state",
]

WS = coordinator_pb2.WorkflowState
TS = a2a_pb2.TaskState

_STATES = {
    WS.WORKFLOW_STATE_PENDING: TS.TASK_STATE_SUBMITTED,
    WS.WORKFLOW_STATE_RUNNING: TS.TASK_STATE_WORKING,
    WS.WORKFLOW_STATE_COMPENSATING: TS.TASK_STATE_WORKING,
    WS.WORKFLOW_STATE_WAITING_APPROVAL: TS.TASK_STATE_INPUT_REQUIRED,
    WS.WORKFLOW_STATE_SUCCEEDED: TS.TASK_STATE_COMPLETED,
    WS.WORKFLOW_STATE_FAILED: TS.TASK_STATE_FAILED,
    WS.WORKFLOW_STATE_COMPENSATED: TS.TASK_STATE_FAILED,
    WS.WORKFLOW_STATE_CANCELLED: TS.TASK_STATE_CANCELED,
}
TERMINAL = frozenset({TS.TASK_STATE_COMPLETED, TS.TASK_STATE_FAILED, TS.TASK_STATE_CANCELED})
INTERRUPTED = frozenset({TS.TASK_STATE_INPUT_REQUIRED})
"""A stream ends here too (A2A): the client subscribes again once a person decided."""
RESULT_ARTIFACT = "result"
TEXT_INPUT = "message"
"""The input a message's text parts become (templates allow extra inputs)."""
_MAX_PARTS = 64


def task_state(workflow: coordinator_pb2.Workflow) -> a2a_pb2.TaskState:
    return _STATES.get(workflow.state, TS.TASK_STATE_SUBMITTED)


def _agent_text(text: str, task_id: str) -> a2a_pb2.Message:
    return a2a_pb2.Message(
        message_id=f"{task_id}-status",
        task_id=task_id,
        context_id=task_id,
        role=a2a_pb2.Role.ROLE_AGENT,
        parts=[a2a_pb2.Part(text=text)],
    )


def _status_text(workflow: coordinator_pb2.Workflow, state: int) -> str:
    if state == TS.TASK_STATE_INPUT_REQUIRED:
        pending = [g for g in workflow.gates if g.state == coordinator_pb2.GATE_STATE_PENDING]
        asks = "; ".join(f"{g.name}: {g.reason}" for g in pending) or "a gate"
        return (
            f"Waiting for a person's decision on {asks}. It is decided in Tessera (the "
            "console's inbox, or CoordinatorService.DecideGate), not by a message."
        )
    if state in (TS.TASK_STATE_FAILED, TS.TASK_STATE_CANCELED) and workflow.error.message:
        return workflow.error.message
    return ""


def task_of(workflow: coordinator_pb2.Workflow) -> a2a_pb2.Task:
    """The A2A view of ``workflow`` (no secrets: the same data GetWorkflow answers)."""
    task_id = workflow.name.removeprefix("workflows/")
    state = task_state(workflow)
    status = a2a_pb2.TaskStatus(state=state)
    status.timestamp.CopyFrom(workflow.update_time)
    text = _status_text(workflow, state)
    if text:
        status.message.CopyFrom(_agent_text(text, task_id))
    task = a2a_pb2.Task(id=task_id, context_id=task_id, status=status)
    if state == TS.TASK_STATE_COMPLETED:
        result = struct_pb2.Value()
        result.struct_value.CopyFrom(workflow.result)
        task.artifacts.append(
            a2a_pb2.Artifact(
                artifact_id=RESULT_ARTIFACT,
                name=RESULT_ARTIFACT,
                description="The workflow's result (its last task's output).",
                parts=[a2a_pb2.Part(data=result, media_type="application/json")],
            )
        )
    task.metadata.update(
        {
            "workflow": workflow.name,
            "template": workflow.plan.template,
            "startedBy": workflow.started_by,
            "pendingGates": [
                g.name for g in workflow.gates if g.state == coordinator_pb2.GATE_STATE_PENDING
            ],
        }
    )
    return task


def inputs_of(message: a2a_pb2.Message) -> struct_pb2.Struct:
    """A message's parts as a workflow's inputs: every data part must be a JSON object
    (they merge, later keys win); text parts, joined, become input ``message``. Files are
    refused (no template takes one)."""
    if len(message.parts) > _MAX_PARTS:
        raise InvalidArgument(
            f"a message has at most {_MAX_PARTS} parts",
            field_violations=[("message.parts", f"{len(message.parts)} parts")],
        )
    inputs = struct_pb2.Struct()
    texts: list[str] = []
    for i, part in enumerate(message.parts):
        kind = part.WhichOneof("content")
        if kind == "data":
            if part.data.WhichOneof("kind") != "struct_value":
                raise InvalidArgument(
                    "a data part must hold a JSON object (the template's inputs by name)",
                    reason="A2A_INPUTS_INVALID",
                    field_violations=[(f"message.parts[{i}].data", "not an object")],
                )
            inputs.MergeFrom(part.data.struct_value)
        elif kind == "text":
            texts.append(part.text)
        else:
            raise ContentTypeNotSupported(
                f"{kind or 'empty'} parts are not accepted: send the inputs as one data part",
                field=f"message.parts[{i}]",
                kind=kind or "empty",
            )
    if texts and TEXT_INPUT not in inputs.fields:
        inputs[TEXT_INPUT] = "\n".join(texts)
    return inputs


def request_id_for(caller: str, message_id: str) -> str:
    """StartWorkflow's idempotency key for a message: the same message from the same
    caller is the same workflow (a retried SendMessage); another caller's message with
    the same id is another workflow."""
    digest = hashlib.sha256(f"{caller}\n{message_id}".encode()).hexdigest()[:40]
    return f"a2a-{digest}"
