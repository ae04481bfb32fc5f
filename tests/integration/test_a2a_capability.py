"""An external A2A agent, declared in a file (no code), implements a capability contract
in a real workflow run through the gateway (`tessera up` with TESSERA_A2A_AGENTS_FILE):

- the agent is an `a2a-sdk` server started here (JSON-RPC binding, its own
  AgentExecutor) that prices an order and counts every message it receives;
- Tessera calls it from the tool proxy's identity as the governed tool `a2a.quoter`
  (token, Cedar, idempotency, audit), for the A2A bridge agent that serves the
  capability `pricing.quote`;
- an answer that breaks the contract's output schema fails the task, nothing of it is
  accepted; an agent that hangs past the contract's timeout ends the task within its
  bound, its remote task is cancelled, and the mesh serves on;
- an agent behind a bearer token gets it from its tool secret, read with the task's
  token; the token is on no audit record.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest
import uvicorn
import yaml
from a2a.helpers.proto_helpers import get_data_parts, new_data_part, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue_v2 import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes.agent_card_routes import create_agent_card_routes
from a2a.server.routes.jsonrpc_routes import create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import a2a_pb2
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse

from tessera.cli._local import nats_options, nats_url
from tessera.cli.login import ensure_login
from tessera.client import MeshClient
from tessera.launcher.ports import free_port
from tessera.v1 import coordinator_pb2
from tests.end_of_run import check_executions, read_stored
from tests.integration.mesh_cli import mesh_up

pytestmark = pytest.mark.integration

TIMEOUT_S = 3.0
"""The declared exchange timeout (the capability's is one second more)."""
WS = coordinator_pb2.WorkflowState
TERMINAL = {
    WS.WORKFLOW_STATE_SUCCEEDED,
    WS.WORKFLOW_STATE_FAILED,
    WS.WORKFLOW_STATE_CANCELLED,
    WS.WORKFLOW_STATE_COMPENSATED,
}

QUOTE_SCHEMA = {
    "type": "object",
    "required": ["quote"],
    "additionalProperties": False,
    "properties": {
        "quote": {
            "type": "object",
            "required": ["total", "currency"],
            "additionalProperties": False,
            "properties": {"total": {"type": "number"}, "currency": {"type": "string"}},
        }
    },
}


def template(name: str, capability: str, tool: str) -> dict[str, Any]:
    """A one-task workflow template using ``capability`` (its step lists the tool)."""
    return {
        "name": name,
        "description": "Price an order with an external quoting agent (A2A).",
        "intents": {"keywords": {name: 0.8}, "examples": [f"{name} this order"]},
        "inputs": [{"name": "order", "type": "object", "description": "The order: items."}],
        "budget": {
            "max_tokens": 1000,
            "max_cost_micros": 100000,
            "max_tool_calls": 5,
            "max_iterations": 5,
        },
        "max_iterations": 5,
        "tasks": [
            {
                "id": "quote",
                "capability": capability,
                "version": "^1.0",
                "tools": [tool],
                "max_attempts": 1,
            }
        ],
    }


# -- the external A2A agent ---------------------------------------------------------------


@dataclass
class Received:
    """What the A2A agent saw (written on its own thread, read by the test)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    """The Authorization header of every request to the secured agent."""
    cancelled: list[str] = field(default_factory=list)
    cancel_seen: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def for_workflow(self, workflow_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages if m["workflow_id"] == workflow_id]


class Quoter(AgentExecutor):
    """Prices an order: sum of quantity x price. `behaviour` in the order picks a bad
    answer (breaks the contract) or a hang (until its task is cancelled)."""

    def __init__(self, received: Received) -> None:
        self.received = received

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None
        data = (get_data_parts(message.parts) or [{}])[0]
        meta = json_format.MessageToDict(message.metadata)
        with self.received.lock:
            self.received.messages.append(
                {
                    "message_id": message.message_id,
                    "task_id": context.task_id,
                    "workflow_id": meta.get("tessera/workflow_id"),
                    "tessera_task": meta.get("tessera/task_id"),
                    "data": data,
                }
            )
        if context.current_task is None:
            await event_queue.enqueue_event(new_task_from_user_message(message))
        assert context.task_id is not None and context.context_id is not None
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.start_work()
        order = data.get("blackboard", {}).get("order", {})
        behaviour = order.get("behaviour", "ok")
        if behaviour == "hang":
            await asyncio.Event().wait()  # until the task is cancelled
        if behaviour == "bad":
            answer: dict[str, Any] = {"quote": {"total": "a lot"}}
        else:
            total = sum(i["quantity"] * i["price"] for i in order.get("items", []))
            answer = {"quote": {"total": total, "currency": "EUR"}}
        await updater.add_artifact([new_data_part(answer)], name="quote")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None and context.context_id is not None
        with self.received.lock:
            self.received.cancelled.append(context.task_id)
        self.received.cancel_seen.set()
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


@dataclass
class A2AServer:
    url: str
    received: Received


BEARER = "a2a-bearer-" + "7f3c9e1d"
"""What the secured agent accepts (stored as the tool secret's ``bearer_token``)."""


def agent_card(name: str, url: str) -> a2a_pb2.AgentCard:
    return a2a_pb2.AgentCard(
        name=name,
        description="Prices orders.",
        version="1.0.0",
        supported_interfaces=[
            a2a_pb2.AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")
        ],
        capabilities=a2a_pb2.AgentCapabilities(streaming=False),
        default_input_modes=["application/json"],
        default_output_modes=["application/json"],
        skills=[
            a2a_pb2.AgentSkill(id="quote", name="quote", description="Price an order", tags=["q"])
        ],
    )


class RequireBearer:
    """ASGI middleware: requests under /secure/ need ``Authorization: Bearer BEARER``
    (the card too); each one's header is recorded."""

    def __init__(self, app: Any, received: Received) -> None:
        self.app = app
        self.received = received

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/secure/"):
            headers = dict(scope["headers"])
            seen = headers.get(b"authorization", b"").decode()
            with self.received.lock:
                self.received.authorizations.append(seen)
            if seen != f"Bearer {BEARER}":
                await PlainTextResponse("unauthorized", status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def a2a_agent() -> Iterator[A2AServer]:
    """The quoting agent on loopback, served by uvicorn on its own thread: open at
    ``/``, and a second one (same executor) behind a bearer token at ``/secure/``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    received = Received()
    routes: list[Any] = []
    for name, prefix in (("quoter", ""), ("secure-quoter", "/secure")):
        card = agent_card(name, f"{url}{prefix}/")
        handler = DefaultRequestHandler(
            agent_executor=Quoter(received), task_store=InMemoryTaskStore(), agent_card=card
        )
        routes += create_agent_card_routes(
            card, card_url=f"{prefix}/.well-known/agent-card.json"
        ) + create_jsonrpc_routes(handler, f"{prefix}/")
    app = RequireBearer(Starlette(routes=routes), received)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="a2a-quoter", daemon=True)
    thread.start()
    ready = threading.Event()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        ready.wait(0.02)  # uvicorn sets `started` once it listens: polled, with a deadline
    assert server.started, "the A2A server did not start"
    try:
        yield A2AServer(url, received)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- the mesh, with the agent declared -----------------------------------------------------


@pytest.fixture(scope="module")
def mesh_dir(a2a_agent: A2AServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`tessera up` with the quoter declared as `pricing.quote` and a template using it."""
    config = tmp_path_factory.mktemp("a2a-config")
    declarations = config / "a2a-agents.yaml"
    declarations.write_text(
        yaml.safe_dump(
            {
                "agents": [
                    {
                        "name": "quoter",
                        "url": a2a_agent.url,
                        "timeout_s": TIMEOUT_S,
                        "side_effect": "idempotent_write",
                        "capability": {
                            "name": "pricing.quote",
                            "version": "1.0.0",
                            "description": "Price an order (an external A2A agent).",
                            "reads": ["order"],
                            "writes": ["quote"],
                            "output_schema": QUOTE_SCHEMA,
                        },
                    },
                    {
                        "name": "secure_quoter",
                        "url": a2a_agent.url + "/secure",
                        "timeout_s": TIMEOUT_S,
                        "side_effect": "read_only",
                        "requires_secret": True,
                        "capability": {
                            "name": "pricing.secure_quote",
                            "reads": ["order"],
                            "output_schema": QUOTE_SCHEMA,
                        },
                    },
                ]
            }
        )
    )
    templates = config / "templates"
    templates.mkdir()
    for name, capability, tool in (
        ("a2a-quote", "pricing.quote", "a2a.quoter"),
        ("a2a-secure-quote", "pricing.secure_quote", "a2a.secure_quoter"),
    ):
        (templates / f"{name}.yaml").write_text(yaml.safe_dump(template(name, capability, tool)))
    env = {
        "TESSERA_A2A_AGENTS_FILE": str(declarations),
        "TESSERA_PLANNER_EXTRA_TEMPLATE_DIRS": str(templates),
    }
    with mesh_up(tmp_path_factory.mktemp("a2a-mesh"), env) as data_dir:
        store_bearer(data_dir)
        yield data_dir


def store_bearer(data_dir: Path) -> None:
    """The security team puts the secured agent's bearer token in its tool secret
    (the bootstrap seeded only an api_key)."""
    state = json.loads((data_dir / "state.json").read_text())
    vault = next(c["address"] for c in state["components"] if c["name"] == "openbao")
    root = (data_dir / "secrets" / "root-token").read_text().strip()
    client = hvac.Client(url=vault, token=root, timeout=10)
    client.secrets.kv.v2.create_or_update_secret(
        path="a2a-secure_quoter",
        secret={"api_key": "unused", "bearer_token": BEARER},
        mount_point="tool-secrets",
    )


@pytest.fixture(scope="module")
def gateway(mesh_dir: Path) -> str:
    return str(json.loads((mesh_dir / "state.json").read_text())["gateway"])


async def run_to_end(
    gateway: str, token: str, order: dict[str, Any], goal: str
) -> coordinator_pb2.Workflow:
    async with MeshClient(gateway, token=token) as client:
        started = await client.start(goal, order=order)
        async with asyncio.timeout(60):
            async for _ in client.watch(started.name):
                pass
        return await client.get(started.name)


def quote(
    mesh_dir: Path, gateway: str, order: dict[str, Any], goal: str = "a2a-quote"
) -> coordinator_pb2.Workflow:
    # The template is the test's own: no start rule names it, so an operator starts it
    # (policy/policies/50_workflows.cedar, "start-workflow-operators").
    token = ensure_login(mesh_dir, "oncall").token
    return asyncio.run(run_to_end(gateway, token, order, goal))


def tool_records(
    mesh_dir: Path, wf_id: str, outcomes: list[str], tool: str = "a2a.quoter"
) -> tuple[Any, list[Any]]:
    """The audit trail of ``wf_id`` once the proxy's records of its exchange have the
    ``outcomes`` (the proxy writes an ``executed`` record deferred, within ~50 ms:
    polled, with a deadline), and those records."""
    deadline = time.monotonic() + 15
    while True:
        stored = asyncio.run(
            read_stored(
                nats_url("nats://127.0.0.1:4222", mesh_dir),
                "tessera",
                {wf_id},
                nats_options=nats_options(mesh_dir),
            )
        )
        calls = [r for r in stored.records if r.actor == "tool-proxy" and r.resource == tool]
        if [r.outcome for r in calls] == outcomes or time.monotonic() > deadline:
            assert [r.outcome for r in calls] == outcomes, calls
            return stored, calls
        time.sleep(0.1)


def as_dict(value: Any) -> Any:
    return json_format.MessageToDict(value)


def details(record: Any) -> dict[str, Any]:
    return json_format.MessageToDict(record.details)


ORDER = {"id": "O-1", "items": [{"sku": "bolt", "quantity": 3, "price": 2.5}]}


# -- the stories ---------------------------------------------------------------------------


def test_a2a_agent_answers_a_capability_in_a_governed_workflow(
    mesh_dir: Path, gateway: str, a2a_agent: A2AServer
) -> None:
    workflow = quote(mesh_dir, gateway, ORDER)
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow
    wf_id = workflow.name.split("/")[1]

    # The result is the A2A agent's, accepted under the contract (and on the blackboard).
    assert as_dict(workflow.blackboard["quote"]) == {"total": 7.5, "currency": "EUR"}
    task = next(t for t in workflow.tasks if t.capability == "pricing.quote")
    assert task.agent  # answered by the bridge's replica

    # The A2A agent received exactly one message for the task, carrying the task's input.
    messages = a2a_agent.received.for_workflow(wf_id)
    assert len(messages) == 1, messages
    assert messages[0]["tessera_task"] == "quote"
    assert messages[0]["data"]["blackboard"]["order"]["id"] == "O-1"

    # On the record: one exchange, allowed by policy, then executed, naming the remote
    # task and its final state; the trail verifies.
    stored, calls = tool_records(mesh_dir, wf_id, ["allow", "executed"])
    allow, executed = calls
    assert allow.decision_id and executed.decision_id == allow.decision_id
    assert details(allow)["agent"] == "a2a-bridge"
    assert details(allow)["backend"] == "a2a"
    exchange = details(executed)["exchange"]
    assert exchange["state"] == "TASK_STATE_COMPLETED", exchange
    assert exchange["task_id"] == messages[0]["task_id"]
    assert exchange["message_id"] == messages[0]["message_id"]
    assert exchange["agent_card"] == "quoter" and exchange["card_url"] == a2a_agent.url
    assert check_executions(stored, unfinished_allowed=0) == 1
    assert stored.report.ok, stored.report


def test_an_answer_that_breaks_the_contract_fails_the_task(
    mesh_dir: Path, gateway: str, a2a_agent: A2AServer
) -> None:
    workflow = quote(mesh_dir, gateway, {**ORDER, "behaviour": "bad"})
    assert workflow.state == WS.WORKFLOW_STATE_FAILED, workflow
    wf_id = workflow.name.split("/")[1]
    assert "quote" not in workflow.blackboard  # nothing of the answer was accepted
    task = next(t for t in workflow.tasks if t.capability == "pricing.quote")
    assert "INVALID_OUTPUT" in str(task), task
    assert len(a2a_agent.received.for_workflow(wf_id)) == 1

    # The exchange itself ran (and is on the record); the contract refused its answer.
    tool_records(mesh_dir, wf_id, ["allow", "executed"])


def test_an_agent_that_hangs_is_bounded_by_the_contract_timeout(
    mesh_dir: Path, gateway: str, a2a_agent: A2AServer
) -> None:
    workflow = quote(mesh_dir, gateway, {**ORDER, "behaviour": "hang"})
    assert workflow.state == WS.WORKFLOW_STATE_FAILED, workflow
    wf_id = workflow.name.split("/")[1]
    task = next(t for t in workflow.tasks if t.capability == "pricing.quote")
    assert "DEADLINE_EXCEEDED" in str(task), task
    messages = a2a_agent.received.for_workflow(wf_id)
    assert len(messages) == 1, messages

    # The proxy gave up at the declared timeout, recorded it with the remote task, and
    # asked the agent to cancel that task.
    _, calls = tool_records(mesh_dir, wf_id, ["allow", "deadline_exceeded"])
    exchange = details(calls[1])["exchange"]
    assert exchange["task_id"] == messages[0]["task_id"]
    assert exchange["state"] == "TASK_STATE_WORKING", exchange
    assert a2a_agent.received.cancel_seen.wait(10), "the remote task was not cancelled"
    assert messages[0]["task_id"] in a2a_agent.received.cancelled

    # No crash: the mesh serves the next order.
    again = quote(mesh_dir, gateway, {**ORDER, "id": "O-2"})
    assert again.state == WS.WORKFLOW_STATE_SUCCEEDED, again


def test_a_secured_agent_gets_the_bearer_token_of_its_tool_secret_never_recorded(
    mesh_dir: Path, gateway: str, a2a_agent: A2AServer
) -> None:
    workflow = quote(mesh_dir, gateway, {**ORDER, "id": "O-3"}, goal="a2a-secure-quote")
    assert workflow.state == WS.WORKFLOW_STATE_SUCCEEDED, workflow
    wf_id = workflow.name.split("/")[1]
    assert len(a2a_agent.received.for_workflow(wf_id)) == 1
    with a2a_agent.received.lock:
        seen = list(a2a_agent.received.authorizations)
    assert seen and all(h == f"Bearer {BEARER}" for h in seen), seen  # card and calls

    # The proxy read the secret with the task's token (its version is on the record);
    # the token itself is on no record.
    stored, calls = tool_records(mesh_dir, wf_id, ["allow", "executed"], "a2a.secure_quoter")
    assert details(calls[0])["key_version"] >= 1
    assert details(calls[1])["exchange"]["agent_card"] == "secure-quoter"
    assert not [r for r in stored.records if BEARER.encode() in r.SerializeToString()]
