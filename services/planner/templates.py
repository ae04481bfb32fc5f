"""Workflow templates: YAML data files turned into task graphs.

A template is ``<dir>/<name>.yaml`` (see ``templates/support.yaml``). Templates are loaded
once at start-up by :func:`load_templates`, which refuses a broken file with a
:class:`TemplateError` naming the file and the field, so a typo never reaches a request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import structlog
import yaml
from google.protobuf import json_format, struct_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.planner import validation
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import common_pb2, planner_pb2

__all__ = [
    "BudgetSpec",
    "ConstraintSpec",
    "InputSpec",
    "IntentSpec",
    "TaskTemplate",
    "Template",
    "TemplateCatalog",
    "TemplateError",
    "check_inputs",
    "load_template",
    "load_templates",
]

log = structlog.get_logger(__name__)

TEMPLATE_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_SUFFIXES = (".yaml", ".yml")

JsonType = Literal["object", "array", "string", "number", "integer", "boolean"]


class TemplateError(Exception):
    """A template file cannot be used; ``path`` and ``field`` say where."""

    def __init__(self, path: Path, field: str, problem: str) -> None:
        where = f"{path}: {field}" if field else str(path)
        super().__init__(f"invalid workflow template {where}: {problem}")
        self.path = path
        self.field = field
        self.problem = problem


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntentSpec(_Model):
    """How free-text goals are matched to the template (see :mod:`.intent`)."""

    keywords: dict[str, float] = Field(default_factory=dict)
    """Word or phrase → weight in (0, 1]: how strongly it alone signals this template."""
    examples: list[str] = Field(default_factory=list)
    """Typical goals; overlap with them adds evidence."""

    @field_validator("keywords")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        for phrase, weight in value.items():
            if not phrase.strip():
                raise ValueError("a keyword must not be empty")
            if not (0.0 < weight <= 1.0) or math.isnan(weight):
                raise ValueError(f"weight of {phrase!r} must be in (0, 1], got {weight}")
        return value


class InputSpec(_Model):
    """One input of the workflow; it becomes the blackboard key of the same name."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: JsonType
    required: bool = True
    description: str = ""


class BudgetSpec(_Model):
    """Default workflow budget; every cap must be positive."""

    max_tokens: int = Field(gt=0)
    max_cost_micros: int = Field(gt=0)
    max_tool_calls: int = Field(gt=0)
    max_iterations: int = Field(gt=0)


class ConstraintSpec(_Model):
    """A blackboard rule (``offer.price`` LTE ``max_budget``)."""

    key: str = Field(min_length=1)
    operator: Literal["LTE", "GTE", "PRESENT"]
    limit_key: str = ""
    description: str = ""


class TaskTemplate(_Model):
    """One task of the template; maps onto ``TaskSpec``."""

    id: str = Field(min_length=1)
    kind: Literal["agent", "approval_gate"] = "agent"
    capability: str = ""
    version: str = "^1.0"
    depends_on: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    timeout_s: float | None = Field(default=None, gt=0)
    max_attempts: int | None = Field(default=None, gt=0)
    optional: bool = False
    gate_reason: str = ""
    input: dict[str, Any] = Field(default_factory=dict)

    def to_spec(self) -> planner_pb2.TaskSpec:
        spec = planner_pb2.TaskSpec(
            id=self.id,
            kind=(
                planner_pb2.TASK_KIND_APPROVAL_GATE
                if self.kind == "approval_gate"
                else planner_pb2.TASK_KIND_AGENT
            ),
            capability=self.capability,
            version=self.version if self.kind == "agent" else "",
            depends_on=self.depends_on,
            tools=self.tools,
            max_attempts=self.max_attempts or 0,
            optional=self.optional,
            gate_reason=self.gate_reason,
        )
        if self.timeout_s is not None:
            spec.timeout.FromNanoseconds(round(self.timeout_s * 1e9))
        if self.input:
            spec.input.update(self.input)
        return spec


_OPERATORS = {
    "LTE": planner_pb2.CONSTRAINT_OPERATOR_LTE,
    "GTE": planner_pb2.CONSTRAINT_OPERATOR_GTE,
    "PRESENT": planner_pb2.CONSTRAINT_OPERATOR_PRESENT,
}


class Template(_Model):
    """A workflow template as loaded from its file."""

    name: str = Field(pattern=TEMPLATE_NAME_RE.pattern)
    description: str = ""
    intents: IntentSpec = Field(default_factory=IntentSpec)
    inputs: list[InputSpec] = Field(default_factory=list)
    budget: BudgetSpec
    max_iterations: int = Field(gt=0)
    """Hard cap on task executions; a request's budget can lower it, never raise it."""
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    tasks: list[TaskTemplate] = Field(min_length=1)
    source: Path | None = Field(default=None, exclude=True)
    """File the template was loaded from."""

    def build(
        self, inputs: struct_pb2.Struct, budget: common_pb2.Budget | None = None
    ) -> planner_pb2.TaskGraph:
        """The task graph for ``inputs``; non-zero fields of ``budget`` override the
        template's default budget. Inputs are not checked here (see :func:`check_inputs`)."""
        graph = planner_pb2.TaskGraph(
            template=self.name,
            tasks=[t.to_spec() for t in self.tasks],
            budget=merge_budget(self.budget_proto(), budget),
            max_iterations=self.max_iterations,
            constraints=[
                planner_pb2.BlackboardConstraint(
                    key=c.key,
                    operator=_OPERATORS[c.operator],
                    limit_key=c.limit_key,
                    description=c.description,
                )
                for c in self.constraints
            ],
        )
        graph.blackboard.CopyFrom(inputs)
        return graph

    def summary(self) -> planner_pb2.TemplateSummary:
        """How callers see it (``PlannerService.ListTemplates``)."""
        return planner_pb2.TemplateSummary(
            name=self.name,
            description=self.description.strip(),
            inputs=[
                planner_pb2.TemplateInput(
                    name=i.name, type=i.type, required=i.required, description=i.description
                )
                for i in self.inputs
            ],
            examples=self.intents.examples,
            has_approval_step=any(t.kind == "approval_gate" for t in self.tasks),
        )

    def budget_proto(self) -> common_pb2.Budget:
        return common_pb2.Budget(
            max_tokens=self.budget.max_tokens,
            max_cost_micros=self.budget.max_cost_micros,
            max_tool_calls=self.budget.max_tool_calls,
            max_iterations=self.budget.max_iterations,
        )


def merge_budget(
    defaults: common_pb2.Budget, override: common_pb2.Budget | None
) -> common_pb2.Budget:
    """``defaults`` with every non-zero field of ``override`` applied."""
    merged = common_pb2.Budget()
    merged.CopyFrom(defaults)
    if override is not None:
        for field in ("max_tokens", "max_cost_micros", "max_tool_calls", "max_iterations"):
            value = getattr(override, field)
            if value:
                setattr(merged, field, value)
    return merged


_KIND_OF = {
    "object": "struct_value",
    "array": "list_value",
    "string": "string_value",
    "number": "number_value",
    "integer": "number_value",
    "boolean": "bool_value",
}


def check_inputs(template: Template, inputs: struct_pb2.Struct) -> None:
    """Raise INVALID_ARGUMENT (reason INPUTS_INVALID) with one ``inputs.<name>`` field
    violation per missing or mistyped input; unknown extra inputs are allowed."""
    violations: list[tuple[str, str]] = []
    for spec in template.inputs:
        field = f"inputs.{spec.name}"
        if spec.name not in inputs.fields:
            if spec.required:
                violations.append((field, f"required input {spec.name!r} ({spec.type}) is missing"))
            continue
        value = inputs.fields[spec.name]
        kind = value.WhichOneof("kind")
        ok = kind == _KIND_OF[spec.type]
        if ok and spec.type == "integer":
            ok = math.isfinite(value.number_value) and value.number_value.is_integer()
        if not ok:
            got = (
                "integer" if kind == "number_value" else (kind or "nothing").removesuffix("_value")
            )
            violations.append((field, f"input {spec.name!r} must be {spec.type}, got {got}"))
    if violations:
        raise InvalidArgument(
            f"inputs do not match template {template.name!r}: "
            + "; ".join(d for _, d in violations),
            reason="INPUTS_INVALID",
            field_violations=violations,
            metadata={"template": template.name},
        )


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_template(path: Path) -> Template:
    """Load and check one template file; :class:`TemplateError` when it is unusable."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TemplateError(path, "", f"cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise TemplateError(path, "", f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise TemplateError(path, "", "expected a mapping at the top level")
    try:
        template = Template.model_validate({**raw, "source": path})
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise TemplateError(path, _loc(first["loc"]), first["msg"] + more) from None
    if template.name != path.stem:
        raise TemplateError(
            path, "name", f"name {template.name!r} must match the file name {path.stem!r}"
        )
    names = [i.name for i in template.inputs]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise TemplateError(path, f"inputs[{index}].name", f"duplicate input {name!r}")
    for index, c in enumerate(template.constraints):
        if c.operator != "PRESENT" and not c.limit_key:
            raise TemplateError(
                path, f"constraints[{index}].limit_key", f"{c.operator} needs a limit_key"
            )
    # The graph must be structurally valid with any inputs (registry checks come later).
    problems = validation.check_structure(template.build(struct_pb2.Struct()))
    if problems:
        field, problem = problems[0]
        raise TemplateError(path, field.removeprefix("plan."), problem)
    return template


class TemplateCatalog(Mapping[str, Template]):
    """The loaded templates by name (read-only)."""

    def __init__(self, templates: Sequence[Template] = ()) -> None:
        self._by_name: dict[str, Template] = {}
        for template in templates:
            if template.name in self._by_name:
                raise ValueError(f"template {template.name!r} defined twice")
            self._by_name[template.name] = template

    def __getitem__(self, name: str) -> Template:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._by_name))

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        """Template names, sorted."""
        return sorted(self._by_name)


def load_templates(dirs: Sequence[Path]) -> TemplateCatalog:
    """Load every ``*.yaml``/``*.yml`` of ``dirs`` (in order).

    Raises :class:`TemplateError` for a missing directory, a broken file, or a name
    already defined by an earlier file (teams cannot silently replace a template).
    """
    seen: dict[str, Template] = {}
    for directory in dirs:
        if not directory.is_dir():
            raise TemplateError(directory, "", "template directory does not exist")
        files = sorted(p for p in directory.iterdir() if p.suffix in _SUFFIXES and p.is_file())
        for path in files:
            template = load_template(path)
            if template.name in seen:
                raise TemplateError(
                    path,
                    "name",
                    f"template {template.name!r} is already defined by "
                    f"{seen[template.name].source}",
                )
            seen[template.name] = template
    catalog = TemplateCatalog(list(seen.values()))
    log.info("templates_loaded", templates=catalog.names(), dirs=[str(d) for d in dirs])
    return catalog


def graph_to_json(graph: planner_pb2.TaskGraph) -> dict[str, Any]:
    """A task graph as proto3 JSON (snake_case field names)."""
    return json_format.MessageToDict(graph, preserving_proto_field_name=True)
