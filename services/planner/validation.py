"""Plan validation: pure structural checks plus one async check against the registry.

Every problem becomes one ``(field path, description)`` violation such as
``("plan.tasks[2].depends_on[0]", "unknown task 'x'")``; :class:`PlanValidator` reports all
of them together in one INVALID_ARGUMENT (reason ``PLAN_INVALID``) and otherwise returns
the plan with defaults filled in (kind, version, timeout, attempts, iteration cap).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from tessera import semver
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import common_pb2, planner_pb2

__all__ = [
    "MAX_REPORTED",
    "ContractSource",
    "Limits",
    "PlanValidator",
    "ValidationResult",
    "Violation",
    "check_budget",
    "check_plan",
    "check_structure",
    "raise_if_invalid",
]

log = structlog.get_logger(__name__)

Violation = tuple[str, str]
"""(field path, description)."""

MAX_REPORTED = 100
"""At most this many violations are sent back; the last one says how many were left out."""

TASK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_AGENT_KINDS = (planner_pb2.TASK_KIND_UNSPECIFIED, planner_pb2.TASK_KIND_AGENT)
_KNOWN_KINDS = (*_AGENT_KINDS, planner_pb2.TASK_KIND_APPROVAL_GATE)
_LIMITED_OPERATORS = (planner_pb2.CONSTRAINT_OPERATOR_LTE, planner_pb2.CONSTRAINT_OPERATOR_GTE)
_KNOWN_OPERATORS = (*_LIMITED_OPERATORS, planner_pb2.CONSTRAINT_OPERATOR_PRESENT)


@dataclass(frozen=True)
class Limits:
    """Caps and defaults applied by validation."""

    max_depth: int = 10
    """Longest dependency chain, counted in tasks."""
    max_fan_out: int = 10
    """Most tasks depending on one task."""
    max_tasks: int = 50
    default_max_attempts: int = 3
    default_timeout_s: float = 30.0
    """Used when neither the task nor the capability contract sets a timeout."""


class ContractSource(Protocol):
    """What validation needs from the registry (``tessera.registry.Registry`` fits): the
    contracts live replicas offer, by capability name, highest version first."""

    async def capabilities(self) -> dict[str, list[common_pb2.CapabilityContract]]: ...


def _task(i: int) -> str:
    return f"plan.tasks[{i}]"


def _is_agent(task: planner_pb2.TaskSpec) -> bool:
    return task.kind in _AGENT_KINDS


def _version_ok(constraint: str) -> bool:
    try:
        semver.parse_constraint(constraint)
    except ValueError:
        return False
    return True


def check_structure(graph: planner_pb2.TaskGraph, limits: Limits = Limits()) -> list[Violation]:
    """Task ids, kinds, references, cycles, depth, fan-out and constraints. Pure."""
    out: list[Violation] = []
    tasks = graph.tasks
    if not tasks:
        out.append(("plan.tasks", "a plan needs at least one task"))
    elif len(tasks) > limits.max_tasks:
        out.append(("plan.tasks", f"{len(tasks)} tasks exceed the cap of {limits.max_tasks}"))

    index: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if not task.id:
            out.append((f"{_task(i)}.id", "task id is required"))
        elif not TASK_ID_RE.match(task.id):
            out.append((f"{_task(i)}.id", f"task id {task.id!r} must be 1-64 of [A-Za-z0-9_-]"))
        elif task.id in index:
            out.append(
                (f"{_task(i)}.id", f"duplicate task id {task.id!r} (also tasks[{index[task.id]}])")
            )
        else:
            index[task.id] = i

    for i, task in enumerate(tasks):
        where = _task(i)
        name = task.id or f"#{i}"
        if task.kind not in _KNOWN_KINDS:
            out.append((f"{where}.kind", f"task {name!r}: unknown kind {task.kind}"))
        elif _is_agent(task):
            if not task.capability:
                out.append((f"{where}.capability", f"agent task {name!r} needs a capability"))
            if task.version and not _version_ok(task.version):
                out.append(
                    (
                        f"{where}.version",
                        f"task {name!r}: invalid version constraint {task.version!r}",
                    )
                )
        elif not task.gate_reason:
            out.append((f"{where}.gate_reason", f"approval gate {name!r} needs a gate_reason"))
        if task.max_attempts < 0:
            out.append((f"{where}.max_attempts", f"task {name!r}: must not be negative"))
        if task.HasField("timeout") and (task.timeout.seconds < 0 or task.timeout.nanos < 0):
            out.append((f"{where}.timeout", f"task {name!r}: must not be negative"))
        seen: set[str] = set()
        for j, dep in enumerate(task.depends_on):
            field = f"{where}.depends_on[{j}]"
            if dep in seen:
                out.append((field, f"task {name!r}: duplicate dependency {dep!r}"))
            elif dep not in index:
                out.append((field, f"task {name!r} depends on unknown task {dep!r}"))
            seen.add(dep)

    edges = _edges(graph, index)
    cycles = _cycles(graph, index, edges)
    out.extend(cycles)
    if not cycles and index:
        out.extend(_depth(graph, index, edges, limits))
    dependents: dict[str, int] = {}
    for deps in edges.values():
        for dep in deps:
            dependents[dep] = dependents.get(dep, 0) + 1
    for task_id, count in dependents.items():
        if count > limits.max_fan_out:
            out.append(
                (
                    _task(index[task_id]),
                    f"{count} tasks depend on {task_id!r}; the fan-out cap is {limits.max_fan_out}",
                )
            )

    for k, rule in enumerate(graph.constraints):
        where = f"plan.constraints[{k}]"
        if not rule.key:
            out.append((f"{where}.key", "constraint key is required"))
        if rule.operator not in _KNOWN_OPERATORS:
            out.append((f"{where}.operator", "constraint operator is required"))
        elif rule.operator in _LIMITED_OPERATORS and not rule.limit_key:
            out.append((f"{where}.limit_key", "LTE/GTE constraints need a limit_key"))
    return out


def _edges(graph: planner_pb2.TaskGraph, index: dict[str, int]) -> dict[str, list[str]]:
    """task id → ids it depends on (known, deduplicated), first definition of each id."""
    edges: dict[str, list[str]] = {}
    for task_id, i in index.items():
        deps: list[str] = []
        for dep in graph.tasks[i].depends_on:
            if dep in index and dep not in deps:
                deps.append(dep)
        edges[task_id] = deps
    return edges


def _cycles(
    graph: planner_pb2.TaskGraph, index: dict[str, int], edges: dict[str, list[str]]
) -> list[Violation]:
    """One violation per back edge found by an (iterative) depth-first search."""
    out: list[Violation] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in index:
        if state.get(root):
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        state[root] = 1
        while stack:
            node, next_edge = stack[-1]
            deps = edges[node]
            if next_edge == len(deps):
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            stack[-1] = (node, next_edge + 1)
            dep = deps[next_edge]
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                j = list(graph.tasks[index[node]].depends_on).index(dep)
                out.append(
                    (
                        f"{_task(index[node])}.depends_on[{j}]",
                        "dependency cycle: " + " -> ".join(cycle),
                    )
                )
            elif not state.get(dep):
                state[dep] = 1
                stack.append((dep, 0))
                path.append(dep)
    return out


def _depth(
    graph: planner_pb2.TaskGraph,
    index: dict[str, int],
    edges: dict[str, list[str]],
    limits: Limits,
) -> list[Violation]:
    """Longest chain (acyclic graphs only); one violation naming it when over the cap."""
    depth: dict[str, int] = {}
    via: dict[str, str | None] = {}
    remaining = {t: len(deps) for t, deps in edges.items()}
    dependents: dict[str, list[str]] = {t: [] for t in edges}
    for t, deps in edges.items():
        for dep in deps:
            dependents[dep].append(t)
    ready = [t for t, n in remaining.items() if n == 0]
    for t in ready:
        depth[t], via[t] = 1, None
    while ready:
        node = ready.pop()
        for child in dependents[node]:
            if depth[node] + 1 > depth.get(child, 0):
                depth[child], via[child] = depth[node] + 1, node
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    deepest = max(depth, key=lambda t: (depth[t], -index[t]))
    if depth[deepest] <= limits.max_depth:
        return []
    chain: list[str] = []
    cursor: str | None = deepest
    while cursor is not None:
        chain.append(cursor)
        cursor = via[cursor]
    return [
        (
            f"{_task(index[deepest])}.depends_on",
            f"dependency chain of {depth[deepest]} tasks exceeds the depth cap of "
            f"{limits.max_depth}: " + " -> ".join(chain),
        )
    ]


def check_budget(graph: planner_pb2.TaskGraph) -> list[Violation]:
    """The budget and iteration cap are present and positive (zero means missing)."""
    out: list[Violation] = []
    if not graph.HasField("budget"):
        out.append(("plan.budget", "a budget is required"))
    else:
        budget = graph.budget
        for field in ("max_tokens", "max_cost_micros", "max_tool_calls"):
            if getattr(budget, field) <= 0:
                out.append((f"plan.budget.{field}", f"{field} must be > 0 (0 means missing)"))
        if budget.max_iterations < 0:
            out.append(("plan.budget.max_iterations", "must not be negative"))
    if graph.max_iterations < 0:
        out.append(("plan.max_iterations", "must not be negative"))
    elif graph.max_iterations == 0 and graph.budget.max_iterations == 0:
        out.append(
            (
                "plan.max_iterations",
                "an iteration cap is required (plan.max_iterations or budget.max_iterations > 0)",
            )
        )
    return out


def check_plan(graph: planner_pb2.TaskGraph, limits: Limits = Limits()) -> list[Violation]:
    """Every registry-independent check."""
    return [*check_structure(graph, limits), *check_budget(graph)]


def raise_if_invalid(violations: Sequence[Violation]) -> None:
    """INVALID_ARGUMENT (reason PLAN_INVALID) carrying every violation, if there are any."""
    if not violations:
        return
    reported = list(violations[:MAX_REPORTED])
    if len(violations) > MAX_REPORTED:
        reported.append(("plan", f"{len(violations) - MAX_REPORTED} more problems not shown"))
    summary = "; ".join(f"{f}: {d}" for f, d in reported[:3])
    more = f" (+{len(violations) - 3} more)" if len(violations) > 3 else ""
    raise InvalidArgument(
        f"plan is invalid: {summary}{more}",
        reason="PLAN_INVALID",
        field_violations=reported,
        metadata={"violations": str(len(violations))},
    )


@dataclass(frozen=True)
class ValidationResult:
    """A valid plan with defaults filled in, and non-fatal findings."""

    plan: planner_pb2.TaskGraph
    warnings: tuple[Violation, ...] = ()


def _parse_version(version: str) -> semver.Version | None:
    try:
        return semver.parse(version)
    except ValueError:
        return None


class _Contracts:
    """One registry snapshot, queried like ``Registry.find`` (contracts only)."""

    def __init__(self, by_name: dict[str, list[common_pb2.CapabilityContract]]) -> None:
        self._by_name = by_name

    def find(self, capability: str, constraint: str = "") -> list[common_pb2.CapabilityContract]:
        wanted = semver.parse_constraint(constraint)
        found: list[tuple[semver.Version, common_pb2.CapabilityContract]] = []
        for contract in self._by_name.get(capability, []):
            version = _parse_version(contract.version)
            if version is not None and wanted.allows(version):
                found.append((version, contract))
        found.sort(key=lambda item: item[0], reverse=True)
        return [c for _, c in found]


def _next_capabilities(contract: common_pb2.CapabilityContract) -> list[tuple[str, str]]:
    """(capability, how) a task of `contract` may lead to: its handoff targets and the
    compensation that undoes it (run under the same plan step's tools)."""
    out = [(target, "hand off to") for target in contract.handoffs]
    if contract.compensation:
        out.append((contract.compensation, "be compensated by"))
    return out


def _chain_tools(contract: common_pb2.CapabilityContract, contracts: _Contracts) -> set[str]:
    """Tools of `contract` and of every capability reachable from it by handoffs or as
    a compensation."""
    tools: set[str] = set()
    seen: set[str] = set()
    pending = [contract]
    while pending:
        current = pending.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        tools.update(current.tools)
        for target, _ in _next_capabilities(current):
            pending.extend(contracts.find(target, "")[:1])
    return tools


class PlanValidator:
    """Validates plans against the structural rules and the live registry."""

    def __init__(self, source: ContractSource, limits: Limits = Limits()) -> None:
        self._source = source
        self.limits = limits

    async def validate(self, graph: planner_pb2.TaskGraph) -> ValidationResult:
        """The normalised plan, or INVALID_ARGUMENT (PLAN_INVALID) listing every problem.

        Reads the registry once per call; registry errors (NATS down…) propagate.
        """
        violations = check_plan(graph, self.limits)
        plan = planner_pb2.TaskGraph()
        plan.CopyFrom(graph)
        contracts = _Contracts(await self._source.capabilities())

        reachable: list[tuple[int, common_pb2.CapabilityContract]] = []
        for i, task in enumerate(plan.tasks):
            if task.kind not in _KNOWN_KINDS:
                continue
            if not _is_agent(task):
                continue
            task.kind = planner_pb2.TASK_KIND_AGENT
            if task.max_attempts == 0:
                task.max_attempts = self.limits.default_max_attempts
            if not task.capability or (task.version and not _version_ok(task.version)):
                continue
            matches = contracts.find(task.capability, task.version)
            if not matches:
                violations.append((f"{_task(i)}.capability", _missing(task, contracts)))
                continue
            contract = matches[0]
            reachable.append((i, contract))
            # A step authorizes tools for its whole handoff chain and its compensations,
            # so a tool must be in the contract of the capability or of one it can hand
            # off to or be compensated by.
            allowed = _chain_tools(contract, contracts)
            for j, tool in enumerate(task.tools):
                if tool not in allowed:
                    violations.append(
                        (
                            f"{_task(i)}.tools[{j}]",
                            f"task {task.id!r}: tool {tool!r} is not in the contract of "
                            f"{contract.name} {contract.version} or of a capability it "
                            "hands off to or is compensated by "
                            f"(allowed: {', '.join(sorted(allowed)) or 'none'})",
                        )
                    )
            self._fill_defaults(task, contract)

        warnings = _handoff_warnings(reachable, contracts)
        raise_if_invalid(violations)

        if plan.max_iterations == 0:
            plan.max_iterations = plan.budget.max_iterations
        elif plan.budget.max_iterations == 0:
            plan.budget.max_iterations = plan.max_iterations
        for field, problem in warnings:
            log.warning("plan_warning", field=field, problem=problem, template=plan.template)
        return ValidationResult(plan=plan, warnings=tuple(warnings))

    def _fill_defaults(
        self, task: planner_pb2.TaskSpec, contract: common_pb2.CapabilityContract
    ) -> None:
        if not task.version:
            version = _parse_version(contract.version)
            task.version = (
                f"^{version.major}.{version.minor}" if version is not None else contract.version
            )
        if task.timeout.seconds == 0 and task.timeout.nanos == 0:
            if contract.timeout.seconds > 0 or contract.timeout.nanos > 0:
                task.timeout.CopyFrom(contract.timeout)
            else:
                task.timeout.FromNanoseconds(round(self.limits.default_timeout_s * 1e9))


def _missing(task: planner_pb2.TaskSpec, contracts: _Contracts) -> str:
    wanted = f"{task.capability!r}" + (f" matching {task.version!r}" if task.version else "")
    others = contracts.find(task.capability) if task.version else []
    if others:
        versions = ", ".join(sorted({c.version for c in others}))
        return (
            f"task {task.id!r}: no registered agent offers capability {wanted}; "
            f"registered versions: {versions}"
        )
    return f"task {task.id!r}: no registered agent offers capability {wanted}"


def _handoff_warnings(
    reachable: list[tuple[int, common_pb2.CapabilityContract]], contracts: _Contracts
) -> list[Violation]:
    """Handoff targets and compensations (transitively reachable from the plan's tasks)
    nobody offers."""
    warnings: list[Violation] = []
    visited = {c.name for _, c in reachable}
    queue = list(reachable)
    while queue:
        i, contract = queue.pop(0)
        for target, how in _next_capabilities(contract):
            if target in visited:
                continue
            visited.add(target)
            matches = contracts.find(target)
            if matches:
                queue.append((i, matches[0]))
            else:
                warnings.append(
                    (
                        f"{_task(i)}.capability",
                        f"{contract.name} may {how} {target!r}, which is not registered",
                    )
                )
    return warnings
