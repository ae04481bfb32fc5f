"""Workload names and the caller table."""

from __future__ import annotations

import pytest

from tessera.identity.callers import CALLERS, allowed_callers, may_call
from tessera.identity.names import WorkloadName

COORDINATOR = WorkloadName.of("coordinator")
BILLING = WorkloadName.of("agent-billing")
GATEWAY = WorkloadName.of("gateway")
OPERATOR = WorkloadName.of("operator")


def test_names_map_to_one_spiffe_id_and_one_dns_name() -> None:
    assert BILLING.spiffe_id == "spiffe://tessera.local/agent/billing"
    assert BILLING.dns_name == "billing.agent.tessera.local"
    assert BILLING.identity == "agent-billing"
    assert COORDINATOR.spiffe_id == "spiffe://tessera.local/service/coordinator"
    assert WorkloadName.from_spiffe_id(BILLING.spiffe_id) == BILLING


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://tessera.local/agent/Billing",
        "spiffe://tessera.local/human/alice",
        "spiffe://tessera.local/agent/billing/extra",
        "https://tessera.local/agent/billing",
        "",
    ],
)
def test_foreign_or_malformed_spiffe_ids_are_nobody(uri: str) -> None:
    assert WorkloadName.from_spiffe_id(uri) is None


@pytest.mark.parametrize(
    ("caller", "method", "allowed"),
    [
        (COORDINATOR, "/tessera.v1.AgentService/ExecuteTask", True),
        (BILLING, "/tessera.v1.AgentService/ExecuteTask", False),
        (GATEWAY, "/tessera.v1.AgentService/ExecuteTask", False),
        (OPERATOR, "/tessera.v1.AgentService/ExecuteTask", False),
        (BILLING, "/tessera.v1.ToolProxyService/InvokeTool", True),
        (COORDINATOR, "/tessera.v1.ToolProxyService/InvokeTool", False),
        (GATEWAY, "/tessera.v1.CoordinatorService/DecideGate", True),
        (BILLING, "/tessera.v1.CoordinatorService/DecideGate", False),
        (BILLING, "/tessera.v1.PlannerService/Plan", False),
        (BILLING, "/tessera.v1.PolicyService/ReloadPolicies", False),
        (OPERATOR, "/tessera.v1.PolicyService/ReloadPolicies", True),
        (BILLING, "/grpc.health.v1.Health/Check", True),
        (COORDINATOR, "/tessera.v1.NoSuchService/Anything", False),
    ],
)
def test_the_table_decides_by_verified_identity(
    caller: WorkloadName, method: str, allowed: bool
) -> None:
    assert may_call(caller, method) is allowed


def test_the_most_specific_row_wins() -> None:
    assert (
        allowed_callers("/tessera.v1.PolicyService/Check")
        == CALLERS["tessera.v1.PolicyService/Check"]
    )
    assert (
        allowed_callers("/tessera.v1.PolicyService/ReloadPolicies")
        == CALLERS["tessera.v1.PolicyService/*"]
    )
    assert (
        allowed_callers("/tessera.v1.PolicyService/GetPolicySet")
        == CALLERS["tessera.v1.PolicyService/GetPolicySet"]
    )
