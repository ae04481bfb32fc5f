"""The planner over gRPC, with the real registry on a real NATS server: agents register
their contracts, a caller asks for plans and reads rich errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.planner import PlannerService, PlannerSettings
from services.planner.templates import TemplateError
from tessera.registry import Registry
from tessera.runtime.bus import Topology, connect
from tessera.runtime.errors import error_details
from tessera.v1 import agent_pb2, common_pb2, planner_pb2, planner_pb2_grpc

# agent name → (capability, tools, handoffs), as in docs/reference-workflows.md
AGENTS: dict[str, list[tuple[str, Sequence[str], Sequence[str]]]] = {
    "triage": [
        (
            "support.triage",
            ["crm.lookup_customer"],
            ["support.billing", "support.technical", "support.account"],
        ),
    ],
    "billing": [
        ("support.billing", ["billing.get_invoices", "billing.issue_refund"], ["support.account"]),
        ("support.billing.reverse", ["billing.reverse_refund"], []),
    ],
    "technical": [("support.technical", ["kb.search"], [])],
    "account": [("support.account", ["crm.lookup_customer"], ["support.billing"])],
    "synthesis": [("support.synthesis", ["email.send"], [])],
    "document-analysis": [
        ("loan.document_analysis", [], ["loan.clarification"]),
        ("loan.clarification", [], ["loan.document_analysis"]),
    ],
    "risk": [("loan.risk", ["credit.bureau_report"], [])],
    "compliance": [("loan.compliance", [], [])],
    "sourcing": [
        ("procurement.sourcing", [], ["procurement.negotiation"]),
        ("procurement.cancel_order", [], []),
    ],
    "negotiation": [
        ("procurement.negotiation", ["procurement.accept_offer"], ["procurement.sourcing"])
    ],
    "credit": [("risk.credit", ["credit.bureau_report"], [])],
    "fraud": [("risk.fraud", [], [])],
    "churn": [("risk.churn", [], [])],
    "aggregator": [("risk.aggregate", [], [])],
}
# capability → the capability that undoes it (its saga compensation)
COMPENSATIONS = {
    "support.billing": "support.billing.reverse",
    "procurement.sourcing": "procurement.cancel_order",
}


def descriptor(name: str, *, skip: str = "") -> agent_pb2.AgentDescriptor:
    return agent_pb2.AgentDescriptor(
        name=name,
        version="1.0.0",
        instance_id=f"{name}-1",
        endpoint="127.0.0.1:1",
        capabilities=[
            common_pb2.CapabilityContract(
                name=capability,
                version="1.0.0",
                tools=list(tools),
                handoffs=list(handoffs),
                compensation=COMPENSATIONS.get(capability, ""),
                timeout=duration_pb2.Duration(seconds=10),
            )
            for capability, tools, handoffs in AGENTS[name]
            if capability != skip
        ],
    )


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


INPUTS = {
    "support": struct(ticket={"id": "T-1", "customer_id": "C-9", "text": "refund please"}),
    "loan": struct(application={"applicant": "ACME", "amount": 50000, "country": "DE"}),
    "procurement": struct(item="laptop", quantity=100, max_budget=10000),
    "risk": struct(customer={"id": "42", "income": 50000, "transactions": []}),
}
GOALS = {
    "support": "customer wants a refund for a double charge",
    "loan": "assess a loan for ACME",
    "procurement": "buy 100 laptops under 10k",
    "risk": "churn and fraud risk for customer 42",
}


class Mesh:
    def __init__(self, planner: PlannerService, registry: Registry) -> None:
        self.planner = planner
        self.registry = registry
        self.channel = grpc.aio.insecure_channel(planner.address)
        self.stub = planner_pb2_grpc.PlannerServiceStub(self.channel)

    async def register_all(self, *, skip: str = "") -> None:
        for name in AGENTS:
            await self.registry.register(descriptor(name, skip=skip))

    async def plan(
        self, goal: str, inputs: struct_pb2.Struct | None = None, **kw: object
    ) -> planner_pb2.PlanResponse:
        request = planner_pb2.PlanRequest(goal=goal, inputs=inputs, **kw)  # type: ignore[arg-type]
        response: planner_pb2.PlanResponse = await self.stub.Plan(request, timeout=10)
        return response


@pytest.fixture
async def mesh(nats_url: str, namespace: str) -> AsyncIterator[Mesh]:
    settings = PlannerSettings(listen="127.0.0.1:0", nats_url=nats_url, namespace=namespace)
    planner = PlannerService(settings)
    await planner.start()
    nc = await connect(nats_url, name="test-agents")
    mesh = Mesh(planner, Registry(nc.jetstream(), Topology(namespace)))
    try:
        yield mesh
    finally:
        await mesh.channel.close()
        await nc.drain()
        await planner.stop()


@pytest.mark.parametrize("template", ["support", "loan", "procurement", "risk"])
async def test_each_reference_workflow_is_planned_once_its_agents_are_registered(
    mesh: Mesh, template: str
) -> None:
    await mesh.register_all()
    response = await mesh.plan(GOALS[template], INPUTS[template])
    plan = response.plan
    assert plan.template == template
    assert response.intents[0].template == template
    assert response.intents[0].confidence >= 0.35
    assert plan.blackboard == INPUTS[template]
    assert plan.budget.max_tokens > 0 and plan.max_iterations > 0
    for task in plan.tasks:
        assert task.kind == planner_pb2.TASK_KIND_AGENT
        assert task.version == "^1.0"
        # Defaults filled in where the template gives none (risk's slow churn gives 1).
        assert task.max_attempts == (1 if task.id == "churn" else 3)
        expected_ms = 1000 if (template, task.id) == ("risk", "churn") else 10_000
        assert task.timeout.ToMilliseconds() == expected_ms


async def test_a_template_name_and_a_budget_override(mesh: Mesh) -> None:
    await mesh.register_all()
    response = await mesh.plan(
        "procurement", INPUTS["procurement"], budget=common_pb2.Budget(max_tokens=123)
    )
    assert response.intents[0] == planner_pb2.IntentMatch(template="procurement", confidence=1.0)
    assert response.plan.budget.max_tokens == 123
    assert response.plan.budget.max_tool_calls > 0
    assert [c.key for c in response.plan.constraints] == ["offer.price"]


async def test_a_missing_capability_names_the_task(mesh: Mesh) -> None:
    await mesh.register_all(skip="loan.risk")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.plan(GOALS["loan"], INPUTS["loan"])
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "PLAN_INVALID"
    assert details.domain == "tessera"
    ((field, description),) = details.field_violations
    assert field == "plan.tasks[1].capability"
    assert "task 'risk'" in description and "loan.risk" in description


async def test_nothing_registered_reports_every_task(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.plan("risk", INPUTS["risk"])
    details = error_details(raised.value)
    assert [f for f, _ in details.field_violations] == [
        f"plan.tasks[{i}].capability" for i in range(4)
    ]


async def test_an_unknown_template_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.plan("payroll")
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.reason == "TEMPLATE_NOT_FOUND"
    assert details.metadata["known_templates"] == "loan,procurement,risk,support"


async def test_a_goal_nobody_understands_is_invalid(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.plan("what is the weather in Paris")
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "GOAL_NOT_UNDERSTOOD"
    assert "alternatives" in details.metadata


async def test_missing_inputs_are_field_violations(mesh: Mesh) -> None:
    await mesh.register_all()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.plan("procurement", struct(item="laptop", quantity="lots"))
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details.field_violations] == ["inputs.quantity", "inputs.max_budget"]


async def test_oversized_inputs_are_resource_exhausted(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.plan("support", struct(ticket={"text": "x" * (300 * 1024)}))
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "INPUTS_TOO_LARGE"
    assert details.metadata["max_input_bytes"] == str(256 * 1024)


async def test_validate_plan_fills_defaults_and_reports_all_problems(mesh: Mesh) -> None:
    await mesh.register_all()
    budget = common_pb2.Budget(
        max_tokens=10, max_cost_micros=10, max_tool_calls=1, max_iterations=5
    )
    good = planner_pb2.TaskGraph(
        tasks=[
            planner_pb2.TaskSpec(id="fraud", capability="risk.fraud"),
            planner_pb2.TaskSpec(
                id="ok",
                kind=planner_pb2.TASK_KIND_APPROVAL_GATE,
                gate_reason="check",
                depends_on=["fraud"],
            ),
        ],
        budget=budget,
    )
    validated = await mesh.stub.ValidatePlan(planner_pb2.ValidatePlanRequest(plan=good))
    fraud = validated.plan.tasks[0]
    assert (fraud.version, fraud.timeout.seconds, fraud.max_attempts) == ("^1.0", 10, 3)
    assert validated.plan.max_iterations == 5

    bad = planner_pb2.TaskGraph(
        tasks=[
            planner_pb2.TaskSpec(id="a", capability="risk.fraud", depends_on=["b"]),
            planner_pb2.TaskSpec(id="b", capability="risk.nope", depends_on=["a"]),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await mesh.stub.ValidatePlan(planner_pb2.ValidatePlanRequest(plan=bad))
    details = error_details(raised.value)
    assert details.reason == "PLAN_INVALID"
    assert [f for f, _ in details.field_violations] == [
        "plan.tasks[1].depends_on[0]",
        "plan.budget",
        "plan.max_iterations",
        "plan.tasks[1].capability",
    ]


async def test_health_reports_the_planner_serving(mesh: Mesh) -> None:
    stub = health_pb2_grpc.HealthStub(mesh.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service="tessera.v1.PlannerService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_broken_template_stops_start_up(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "broken.yaml").write_text("name: broken\ntasks: []\n")
    settings = PlannerSettings(
        listen="127.0.0.1:0",
        nats_url=nats_url,
        namespace=namespace,
        extra_template_dirs=[tmp_path],
    )
    planner = PlannerService(settings)
    with pytest.raises(TemplateError) as raised:
        await planner.start()
    assert raised.value.path == tmp_path / "broken.yaml"
    await planner.stop()
