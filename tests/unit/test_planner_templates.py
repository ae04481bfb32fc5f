"""Workflow templates: the four reference templates load and build the documented graphs;
a broken template is refused at load time with its file and field named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from services.planner.settings import BUILTIN_TEMPLATES_DIR, PlannerSettings
from services.planner.templates import (
    TemplateError,
    check_inputs,
    load_template,
    load_templates,
)
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import common_pb2, planner_pb2

GOOD = """\
name: {name}
description: test template
intents:
  keywords: {{widget: 0.8}}
  examples: [build a widget]
inputs:
  - {{name: item, type: string}}
  - {{name: count, type: integer, required: false}}
budget: {{max_tokens: 100, max_cost_micros: 100, max_tool_calls: 1, max_iterations: 5}}
max_iterations: 5
tasks:
  - {{id: a, capability: widget.build, version: "^1.0"}}
  - {{id: b, capability: widget.check, depends_on: [a]}}
"""


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def test_the_four_reference_templates_load() -> None:
    catalog = load_templates([BUILTIN_TEMPLATES_DIR])
    assert catalog.names() == ["loan", "procurement", "risk", "support"]


def test_reference_templates_build_the_documented_graphs() -> None:
    catalog = load_templates([BUILTIN_TEMPLATES_DIR])

    def shape(name: str) -> list[tuple[str, str, list[str]]]:
        graph = catalog[name].build(struct())
        return [(t.id, t.capability, list(t.depends_on)) for t in graph.tasks]

    assert shape("support") == [
        ("triage", "support.triage", []),
        ("synthesis", "support.synthesis", ["triage"]),
    ]
    assert shape("loan") == [
        ("documents", "loan.document_analysis", []),
        ("risk", "loan.risk", ["documents"]),
        ("compliance", "loan.compliance", ["risk"]),
    ]
    assert shape("procurement") == [("sourcing", "procurement.sourcing", [])]
    assert shape("risk") == [
        ("credit", "risk.credit", []),
        ("fraud", "risk.fraud", []),
        ("churn", "risk.churn", []),
        ("aggregate", "risk.aggregate", ["credit", "fraud", "churn"]),
    ]
    for name in catalog:
        graph = catalog[name].build(struct())
        assert all(t.version == "^1.0" for t in graph.tasks)
        assert all(t.kind == planner_pb2.TASK_KIND_AGENT for t in graph.tasks)


def test_procurement_carries_the_budget_constraint() -> None:
    graph = load_templates([BUILTIN_TEMPLATES_DIR])["procurement"].build(struct())
    assert [(c.key, c.operator, c.limit_key) for c in graph.constraints] == [
        ("offer.price", planner_pb2.CONSTRAINT_OPERATOR_LTE, "max_budget")
    ]


def test_risk_churn_is_optional_with_a_one_second_timeout() -> None:
    graph = load_templates([BUILTIN_TEMPLATES_DIR])["risk"].build(struct())
    churn = next(t for t in graph.tasks if t.id == "churn")
    assert churn.optional
    assert churn.timeout.ToMilliseconds() == 1000
    assert not any(t.optional for t in graph.tasks if t.id != "churn")


def test_build_merges_the_request_budget_over_the_defaults(tmp_path: Path) -> None:
    template = load_template(write(tmp_path, "widget", GOOD.format(name="widget")))
    graph = template.build(struct(item="x"), common_pb2.Budget(max_tokens=7))
    assert graph.budget == common_pb2.Budget(
        max_tokens=7, max_cost_micros=100, max_tool_calls=1, max_iterations=5
    )
    assert graph.template == "widget"
    assert graph.max_iterations == 5
    assert dict(graph.blackboard) == {"item": "x"}


@pytest.mark.parametrize(
    ("mutation", "field"),
    [
        (lambda t: t.replace("budget: {max_tokens: 100, ", "budget: {"), "budget.max_tokens"),
        (lambda t: t.replace("max_tool_calls: 1", "max_tool_calls: 0"), "budget.max_tool_calls"),
        (lambda t: t.replace("depends_on: [a]", "depends_on: [zz]"), "tasks[1].depends_on[0]"),
        (
            lambda t: t.replace('version: "^1.0"}', 'version: "^1.0", depends_on: [b]}'),
            "tasks[1].depends_on[0]",  # b -> a closes the cycle a -> b -> a
        ),
        (lambda t: t.replace("capability: widget.check, ", ""), "tasks[1].capability"),
        (lambda t: t.replace("type: string", "type: text"), "inputs[0].type"),
        (lambda t: t.replace("widget: 0.8", "widget: 3"), "intents.keywords"),
        (lambda t: t.replace("max_iterations: 5\ntasks", "tasks"), "max_iterations"),
        (lambda t: t + "  - {id: a, capability: widget.x}\n", "tasks[2].id"),
        (lambda t: t.replace("description: test", "descripton: test"), "descripton"),
        (lambda t: t.replace('version: "^1.0"', 'version: "one"'), "tasks[0].version"),
    ],
)
def test_a_broken_template_is_refused_naming_file_and_field(
    tmp_path: Path, mutation: object, field: str
) -> None:
    assert callable(mutation)
    path = write(tmp_path, "widget", mutation(GOOD.format(name="widget")))
    with pytest.raises(TemplateError) as raised:
        load_templates([tmp_path])
    assert raised.value.path == path
    assert raised.value.field == field
    assert str(path) in str(raised.value)
    assert field in str(raised.value)


def test_a_template_must_be_named_like_its_file(tmp_path: Path) -> None:
    write(tmp_path, "widget", GOOD.format(name="gadget"))
    with pytest.raises(TemplateError, match="must match the file name"):
        load_templates([tmp_path])


def test_invalid_yaml_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "widget", "name: [unclosed\n")
    with pytest.raises(TemplateError, match="not valid YAML") as raised:
        load_templates([tmp_path])
    assert raised.value.path == path


def test_teams_add_templates_from_extra_dirs(tmp_path: Path) -> None:
    write(tmp_path, "widget", GOOD.format(name="widget"))
    catalog = load_templates([BUILTIN_TEMPLATES_DIR, tmp_path])
    assert "widget" in catalog
    assert len(catalog) == 5


def test_a_team_cannot_silently_replace_a_template(tmp_path: Path) -> None:
    path = write(tmp_path, "support", GOOD.format(name="support"))
    with pytest.raises(TemplateError, match="already defined") as raised:
        load_templates([BUILTIN_TEMPLATES_DIR, tmp_path])
    assert raised.value.path == path


def test_a_missing_template_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        load_templates([tmp_path / "nope"])


def test_settings_read_template_dirs_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESSERA_PLANNER_TEMPLATES_DIR", str(tmp_path))
    monkeypatch.setenv("TESSERA_PLANNER_EXTRA_TEMPLATE_DIRS", "/a,/b")
    settings = PlannerSettings()
    assert settings.template_dirs == [tmp_path, Path("/a"), Path("/b")]
    assert settings.min_confidence == 0.35
    assert settings.max_input_bytes == 256 * 1024


def test_missing_and_mistyped_inputs_are_field_violations(tmp_path: Path) -> None:
    template = load_template(write(tmp_path, "widget", GOOD.format(name="widget")))
    check_inputs(template, struct(item="x", count=3, extra=True))
    with pytest.raises(InvalidArgument) as raised:
        check_inputs(template, struct(count=2.5))
    assert raised.value.reason == "INPUTS_INVALID"
    assert [f for f, _ in raised.value.field_violations] == ["inputs.item", "inputs.count"]
    with pytest.raises(InvalidArgument) as raised:
        check_inputs(template, struct(item=5))
    assert raised.value.field_violations == (
        ("inputs.item", "input 'item' must be string, got integer"),
    )
