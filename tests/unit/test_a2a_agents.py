"""The A2A agent declarations: what a valid file gives, and how a broken one is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.agents.a2a_bridge.agent import GOVERNANCE_MARGIN_S, build
from services.tool_proxy.tools.a2a_backend import A2AAgents
from services.tool_proxy.tools.registry import Backend, SideEffect
from tessera.a2a_agents import A2AAgentsSettings, DeclarationError, declared_tools, load

VALID = """
agents:
  - name: quoter
    url: http://127.0.0.1:9999
    timeout_s: 5
    side_effect: idempotent_write
    capability:
      name: pricing.quote
      version: 1.2.0
      reads: [order]
      writes: [quote]
      output_schema: {type: object, required: [quote]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "a2a-agents.yaml"
    path.write_text(text)
    return path


def test_a_declared_agent_is_a_tool_and_a_capability(tmp_path: Path) -> None:
    declared = load(write(tmp_path, VALID))
    assert declared_tools(write(tmp_path, VALID)) == ("a2a.quoter",)

    (tool,) = A2AAgents(declared).tools()
    assert tool.spec.name == tool.spec.scope == "a2a.quoter"
    assert tool.spec.backend is Backend.A2A
    assert tool.spec.side_effect is SideEffect.IDEMPOTENT_WRITE
    assert tool.spec.timeout_s == 5

    contract = build(declared).descriptor().capabilities[0]
    assert (contract.name, contract.version) == ("pricing.quote", "1.2.0")
    assert list(contract.tools) == ["a2a.quoter"]
    assert list(contract.reads) == ["order"] and list(contract.writes) == ["quote"]
    assert contract.timeout.ToTimedelta().total_seconds() == 5 + GOVERNANCE_MARGIN_S
    assert contract.HasField("output_schema")


def test_no_file_or_an_empty_one_declares_nothing(tmp_path: Path) -> None:
    assert load(None) == ()
    assert load(write(tmp_path, "")) == ()
    empty = A2AAgentsSettings.model_validate({"a2a_agents_file": ""})
    assert empty.a2a_agents_file is None


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("agents: [{name: Quoter, url: 'http://x', capability: {name: a.b}}]", "agents.0.name"),
        ("agents: [{name: q, url: 'ftp://x', capability: {name: a.b}}]", "agents.0.url"),
        ("agents: [{name: q, url: 'http://u:p@x', capability: {name: a.b}}]", "credentials"),
        ("agents: [{name: q, url: 'http://x', capability: {name: nodot}}]", "capability.name"),
        (
            "agents: [{name: q, url: 'http://x', capability: {name: a.b, version: '1'}}]",
            "capability.version",
        ),
        (
            "agents: [{name: q, url: 'http://x', capability: {name: a.b, "
            "output_schema: {type: 7}}}]",
            "output_schema",
        ),
        ("agents: [{name: q, url: 'http://x', timeout_s: 0, capability: {name: a.b}}]", "timeout"),
        ("agents: [{name: q, url: 'http://x', capability: {name: a.b}, extra: 1}]", "extra"),
        (
            "agents: [{name: q, url: 'http://x', capability: {name: a.b}},"
            " {name: q, url: 'http://y', capability: {name: a.c}}]",
            "two agents declare name",
        ),
        ("agents: [", "cannot read"),
    ],
)
def test_an_invalid_declaration_is_refused_naming_where(
    tmp_path: Path, text: str, names: str
) -> None:
    with pytest.raises(DeclarationError) as refused:
        load(write(tmp_path, text))
    assert names in str(refused.value)
    assert str(tmp_path) in str(refused.value)
