"""The registry service's checks on a descriptor: what a hostile replica cannot register."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from services.registry.service import Limits, _endpoint_problem, _violations
from tessera.v1 import agent_pb2


def descriptor(**fields: object) -> agent_pb2.AgentDescriptor:
    base = agent_pb2.AgentDescriptor(name="billing", instance_id="r1", endpoint="10.0.0.7:50051")
    base.capabilities.add(name="support.billing", version="1.2.0")
    for name, value in fields.items():
        setattr(base, name, value)
    return base


def test_a_well_formed_descriptor_passes() -> None:
    assert _violations(descriptor()) == []


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("", "required"),
        ("nowhere", "host:port"),
        ("host:0", "1..65535"),
        ("host:70000", "1..65535"),
        ("host:http", "1..65535"),
        ("bad host!:50051", "host:port"),
        ("h" * 300 + ":1", "longer than"),
    ],
)
def test_endpoints_must_be_host_and_port(endpoint: str, problem: str) -> None:
    found = _endpoint_problem(endpoint)
    assert found is not None and problem in found
    assert _endpoint_problem("[::1]:50051") is None


def test_capabilities_are_bounded_named_and_versioned() -> None:
    none = descriptor()
    del none.capabilities[:]
    assert [f for f, _ in _violations(none)] == ["agent.capabilities"]

    many = descriptor()
    for i in range(Limits.max_capabilities):
        many.capabilities.add(name=f"cap.n{i}", version="1.0.0")
    assert ("agent.capabilities", f"more than {Limits.max_capabilities}") in _violations(many)

    bad = descriptor()
    bad.capabilities.add(name="support.billing", version="2.0.0")  # declared twice
    bad.capabilities.add(name="Not Lower", version="1.0.0")
    bad.capabilities.add(name="ok.name", version="v" * 100)
    fields = [f for f, _ in _violations(bad)]
    assert fields == [
        "agent.capabilities[1].name",
        "agent.capabilities[2].name",
        "agent.capabilities[3].version",
    ]


def test_an_oversized_descriptor_is_refused_before_anything_else_is_read() -> None:
    huge = descriptor()
    huge.capabilities[0].description = "x" * (Limits.max_descriptor_bytes + 1)
    assert _violations(huge) == [("agent", f"larger than {Limits.max_descriptor_bytes} bytes")]


def test_instance_ids_are_plain_names() -> None:
    fields = [f for f, _ in _violations(descriptor(instance_id="a.b"))]
    assert fields == ["agent.instance_id"]
    fields = [f for f, _ in _violations(descriptor(instance_id="x" * 65))]
    assert fields == ["agent.instance_id"]


def test_an_output_schema_must_be_usable_draft_2020_12() -> None:
    good = descriptor()
    json_format.ParseDict(
        {"type": "object", "prefixItems": [{}], "unevaluatedProperties": False},
        good.capabilities[0].output_schema,
    )
    assert _violations(good) == []

    bad = descriptor()
    json_format.ParseDict(
        {"type": "object", "properties": {"n": {"minimum": "1"}}, "$ref": "#/$defs/none"},
        bad.capabilities[0].output_schema,
    )
    assert _violations(bad) == [
        ("agent.capabilities[0].output_schema.properties.n.minimum", "expected number")
    ]
