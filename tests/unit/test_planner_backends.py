"""Planning backends. The LLM backend talks to a real HTTP peer of our own (stdlib
http.server on loopback) that answers like an OpenAI-compatible API."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from google.protobuf import struct_pb2

from services.planner.backends import (
    OpenAICompatibleBackend,
    TemplateBackend,
    parse_task_graph,
)
from services.planner.service import Planner
from services.planner.settings import BUILTIN_TEMPLATES_DIR
from services.planner.templates import TemplateCatalog, load_templates
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import common_pb2, planner_pb2

LLM_PLAN = {
    "template": "procurement",
    "tasks": [
        {
            "id": "sourcing",
            "kind": "agent",
            "capability": "procurement.sourcing",
            "version": "^1.0",
            "timeout_s": 12,
        },
        {
            "id": "sign_off",
            "kind": "approval_gate",
            "gate_reason": "large order",
            "depends_on": ["sourcing"],
        },
    ],
    "constraints": [{"key": "offer.price", "operator": "LTE", "limit_key": "max_budget"}],
}


@dataclass
class FakeLLM:
    """What the canned server answers and what it was asked."""

    status: int = 200
    content: str = json.dumps(LLM_PLAN)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    state = FakeLLM()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            state.requests.append(json.loads(self.rfile.read(length)))
            state.headers.append(dict(self.headers))
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            body = json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": state.content}}]}
            ).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def catalog() -> TemplateCatalog:
    return load_templates([BUILTIN_TEMPLATES_DIR])


# The reference contracts' handoffs and tools, where a plan step names tools.
_HANDOFFS = {"procurement.sourcing": ["procurement.negotiation"]}
_TOOLS = {"procurement.negotiation": ["procurement.accept_offer"]}


class Contracts:
    def __init__(self, *names: str) -> None:
        self.names = names

    async def capabilities(self) -> dict[str, list[common_pb2.CapabilityContract]]:
        return {
            n: [
                common_pb2.CapabilityContract(
                    name=n, version="1.0.0", handoffs=_HANDOFFS.get(n, []), tools=_TOOLS.get(n, [])
                )
            ]
            for n in self.names
        }


def inputs(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def test_llm_backend_returns_the_models_task_graph(
    llm: FakeLLM, catalog: TemplateCatalog
) -> None:
    backend = OpenAICompatibleBackend(llm.url, "tiny-model", api_key="sk-test", timeout_s=5)
    graph = await backend.plan("buy 100 laptops", inputs(item="laptop"), catalog)
    assert graph is not None
    assert graph.template == "procurement"
    assert [t.id for t in graph.tasks] == ["sourcing", "sign_off"]
    assert graph.tasks[0].timeout.seconds == 12
    assert graph.tasks[1].kind == planner_pb2.TASK_KIND_APPROVAL_GATE
    assert graph.constraints[0].operator == planner_pb2.CONSTRAINT_OPERATOR_LTE

    (request,) = llm.requests
    assert request["model"] == "tiny-model"
    assert "buy 100 laptops" in request["messages"][-1]["content"]
    assert "procurement.sourcing" in request["messages"][0]["content"]
    assert llm.headers[0]["Authorization"] == "Bearer sk-test"


@pytest.mark.parametrize(
    ("status", "content"),
    [
        (500, "{}"),
        (200, "I cannot help with that"),
        (200, '["not", "a graph"]'),
        (200, '{"tasks": "nope"}'),
    ],
)
async def test_llm_backend_gives_no_plan_on_failure(
    llm: FakeLLM, catalog: TemplateCatalog, status: int, content: str
) -> None:
    llm.status, llm.content = status, content
    backend = OpenAICompatibleBackend(llm.url, "m", timeout_s=5)
    assert await backend.plan("buy laptops", inputs(), catalog) is None


async def test_unreachable_llm_gives_no_plan(catalog: TemplateCatalog) -> None:
    backend = OpenAICompatibleBackend("http://127.0.0.1:9", "m", timeout_s=1)
    assert await backend.plan("buy laptops", inputs(), catalog) is None


def test_parse_accepts_fenced_json_and_a_plan_key() -> None:
    text = "```json\n" + json.dumps({"plan": {"tasks": [{"id": "x"}]}}) + "\n```"
    assert [t.id for t in parse_task_graph(text).tasks] == ["x"]
    with pytest.raises(ValueError):
        parse_task_graph("nope")


async def test_planner_validates_llm_plans_and_uses_template_defaults(
    llm: FakeLLM, catalog: TemplateCatalog
) -> None:
    planner = Planner(
        templates=catalog,
        registry=Contracts("procurement.sourcing", "procurement.negotiation"),
        llm=OpenAICompatibleBackend(llm.url, "m", timeout_s=5),
    )
    response = await planner.plan(
        "source 100 laptops under 10k", inputs(item="laptop", quantity=100, max_budget=10000)
    )
    plan = response.plan
    assert [t.id for t in plan.tasks] == ["sourcing", "sign_off"]
    assert plan.budget == catalog["procurement"].budget_proto()
    assert plan.max_iterations == catalog["procurement"].max_iterations
    assert plan.blackboard["quantity"] == 100
    assert plan.tasks[0].max_attempts == 3


async def test_planner_falls_back_to_templates_when_the_llm_plan_is_invalid(
    llm: FakeLLM, catalog: TemplateCatalog
) -> None:
    llm.content = json.dumps({"tasks": [{"id": "a", "capability": "x.y", "depends_on": ["a"]}]})
    planner = Planner(
        templates=catalog,
        registry=Contracts("procurement.sourcing", "procurement.negotiation"),
        llm=OpenAICompatibleBackend(llm.url, "m", timeout_s=5),
    )
    response = await planner.plan(
        "buy 100 laptops under 10k", inputs(item="laptop", quantity=100, max_budget=10000)
    )
    assert response.plan.template == "procurement"
    assert [t.id for t in response.plan.tasks] == ["sourcing"]
    assert response.intents[0].template == "procurement"


async def test_template_backend_builds_the_template_graph(catalog: TemplateCatalog) -> None:
    backend = TemplateBackend()
    graph = await backend.plan("assess a loan for ACME", inputs(application={}), catalog)
    assert graph.template == "loan"
    with pytest.raises(InvalidArgument) as raised:
        await backend.plan("assess a loan for ACME", inputs(), catalog)
    assert raised.value.field_violations[0][0] == "inputs.application"
