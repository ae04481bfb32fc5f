"""Plan validation: every problem is one field violation, all reported together; valid
plans come back with defaults filled in. Property tests cover arbitrary DAGs."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.planner.validation import (
    Limits,
    PlanValidator,
    check_plan,
    check_structure,
    raise_if_invalid,
)
from tessera.runtime.errors import InvalidArgument
from tessera.v1 import common_pb2, planner_pb2

BUDGET = common_pb2.Budget(
    max_tokens=1000, max_cost_micros=1000, max_tool_calls=5, max_iterations=10
)


def task(
    task_id: str, *deps: str, capability: str = "demo.work", **kw: object
) -> planner_pb2.TaskSpec:
    return planner_pb2.TaskSpec(
        id=task_id,
        capability=capability,
        depends_on=list(deps),
        **kw,  # type: ignore[arg-type]
    )


def graph(*tasks: planner_pb2.TaskSpec, **kw: object) -> planner_pb2.TaskGraph:
    fields: dict[str, object] = {"budget": BUDGET, "max_iterations": 10, **kw}
    return planner_pb2.TaskGraph(tasks=list(tasks), **fields)  # type: ignore[arg-type]


def fields(g: planner_pb2.TaskGraph, limits: Limits | None = None) -> list[str]:
    return [f for f, _ in check_plan(g, limits or Limits())]


class Contracts:
    """An in-memory stand-in for the registry's capability listing (pure unit tests;
    the integration tests use the real registry on NATS)."""

    def __init__(self, contracts: Sequence[common_pb2.CapabilityContract]) -> None:
        self.by_name: dict[str, list[common_pb2.CapabilityContract]] = {}
        for c in contracts:
            self.by_name.setdefault(c.name, []).append(c)

    async def capabilities(self) -> dict[str, list[common_pb2.CapabilityContract]]:
        return self.by_name


def contract(
    name: str,
    version: str = "1.0.0",
    *,
    tools: Sequence[str] = (),
    timeout_s: int = 0,
    handoffs: Sequence[str] = (),
    compensation: str = "",
) -> common_pb2.CapabilityContract:
    c = common_pb2.CapabilityContract(
        name=name,
        version=version,
        tools=list(tools),
        handoffs=list(handoffs),
        compensation=compensation,
    )
    if timeout_s:
        c.timeout.CopyFrom(duration_pb2.Duration(seconds=timeout_s))
    return c


# -- structural checks ------------------------------------------------------------------


def test_a_simple_chain_is_valid() -> None:
    assert check_plan(graph(task("a"), task("b", "a"), task("c", "a", "b"))) == []


def test_ids_must_be_present_and_unique() -> None:
    assert fields(graph(task(""), task("a"), task("a"))) == [
        "plan.tasks[0].id",
        "plan.tasks[2].id",
    ]


def test_dependencies_must_exist() -> None:
    problems = check_plan(graph(task("a"), task("b", "a", "ghost")))
    assert problems == [("plan.tasks[1].depends_on[1]", "task 'b' depends on unknown task 'ghost'")]


def test_a_cycle_is_reported_with_its_path() -> None:
    problems = check_plan(graph(task("a", "c"), task("b", "a"), task("c", "b")))
    assert len(problems) == 1
    field, description = problems[0]
    assert field == "plan.tasks[1].depends_on[0]"  # b -> a closes it
    assert description == "dependency cycle: a -> c -> b -> a"


def test_a_self_dependency_is_a_cycle() -> None:
    assert check_plan(graph(task("a", "a"))) == [
        ("plan.tasks[0].depends_on[0]", "dependency cycle: a -> a")
    ]


def test_depth_is_capped() -> None:
    chain = [task("t0")] + [task(f"t{i}", f"t{i - 1}") for i in range(1, 4)]
    assert check_plan(graph(*chain), Limits(max_depth=4)) == []
    problems = check_plan(graph(*chain), Limits(max_depth=3))
    assert problems == [
        (
            "plan.tasks[3].depends_on",
            "dependency chain of 4 tasks exceeds the depth cap of 3: t3 -> t2 -> t1 -> t0",
        )
    ]


def test_fan_out_and_task_count_are_capped() -> None:
    wide = graph(task("root"), *[task(f"leaf{i}", "root") for i in range(3)])
    assert fields(wide, Limits(max_fan_out=2)) == ["plan.tasks[0]"]
    assert fields(wide, Limits(max_tasks=3)) == ["plan.tasks"]
    assert fields(graph()) == ["plan.tasks"]


def test_agents_need_a_capability_and_gates_a_reason() -> None:
    gate = planner_pb2.TaskSpec(id="g", kind=planner_pb2.TASK_KIND_APPROVAL_GATE)
    assert fields(graph(task("a", capability=""), gate)) == [
        "plan.tasks[0].capability",
        "plan.tasks[1].gate_reason",
    ]


def test_budget_and_iteration_cap_are_required() -> None:
    assert fields(planner_pb2.TaskGraph(tasks=[task("a")])) == [
        "plan.budget",
        "plan.max_iterations",
    ]
    partial = common_pb2.Budget(max_tokens=5)
    assert fields(graph(task("a"), budget=partial, max_iterations=0)) == [
        "plan.budget.max_cost_micros",
        "plan.budget.max_tool_calls",
        "plan.max_iterations",
    ]


def test_constraints_need_a_key_an_operator_and_a_limit() -> None:
    rules = [
        planner_pb2.BlackboardConstraint(operator=planner_pb2.CONSTRAINT_OPERATOR_PRESENT),
        planner_pb2.BlackboardConstraint(key="offer.price"),
        planner_pb2.BlackboardConstraint(
            key="offer.price", operator=planner_pb2.CONSTRAINT_OPERATOR_LTE
        ),
    ]
    assert fields(graph(task("a"), constraints=rules)) == [
        "plan.constraints[0].key",
        "plan.constraints[1].operator",
        "plan.constraints[2].limit_key",
    ]


def test_all_problems_are_reported_together() -> None:
    bad = planner_pb2.TaskGraph(tasks=[task("a", "ghost"), task("a", capability="")])
    with pytest.raises(InvalidArgument) as raised:
        raise_if_invalid(check_plan(bad))
    assert raised.value.reason == "PLAN_INVALID"
    assert [f for f, _ in raised.value.field_violations] == [
        "plan.tasks[1].id",
        "plan.tasks[0].depends_on[0]",
        "plan.tasks[1].capability",
        "plan.budget",
        "plan.max_iterations",
    ]


# -- registry checks and defaults -------------------------------------------------------


def validate(
    g: planner_pb2.TaskGraph, contracts: Sequence[common_pb2.CapabilityContract]
) -> planner_pb2.TaskGraph:
    async def run() -> planner_pb2.TaskGraph:
        return (await PlanValidator(Contracts(contracts)).validate(g)).plan

    return asyncio.run(run())


def test_defaults_are_filled_from_the_contract() -> None:
    plan = validate(
        graph(task("a"), task("b", "a", capability="demo.other"), max_iterations=0),
        [contract("demo.work", "1.2.0", timeout_s=7), contract("demo.other", "2.0.1")],
    )
    a, b = plan.tasks
    assert (a.kind, a.version, a.timeout.seconds, a.max_attempts) == (
        planner_pb2.TASK_KIND_AGENT,
        "^1.2",
        7,
        3,
    )
    assert (b.version, b.timeout.seconds) == ("^2.0", 30)
    assert plan.max_iterations == BUDGET.max_iterations


def test_an_unregistered_capability_names_the_task() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate(
            graph(task("a", version="^1.0"), task("b", capability="demo.missing")),
            [contract("demo.work", "2.0.0")],
        )
    assert raised.value.field_violations == (
        (
            "plan.tasks[0].capability",
            "task 'a': no registered agent offers capability 'demo.work' matching '^1.0'; "
            "registered versions: 2.0.0",
        ),
        (
            "plan.tasks[1].capability",
            "task 'b': no registered agent offers capability 'demo.missing'",
        ),
    )


def test_task_tools_must_be_in_the_contract() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate(
            graph(task("a", tools=["kb.search", "db.drop"])),
            [contract("demo.work", tools=["kb.search"])],
        )
    assert [f for f, _ in raised.value.field_violations] == ["plan.tasks[0].tools[1]"]


def test_a_step_authorizes_the_tools_of_its_chains_compensations() -> None:
    # demo.work hands off to demo.pay, which demo.refund undoes: the plan step must grant
    # demo.refund's tool too (a compensation runs under the step's tools).
    contracts = [
        contract("demo.work", tools=["kb.search"], handoffs=["demo.pay"]),
        contract("demo.pay", tools=["pay.charge"], compensation="demo.refund"),
        contract("demo.refund", tools=["pay.refund"]),
    ]
    plan = validate(graph(task("a", tools=["kb.search", "pay.charge", "pay.refund"])), contracts)
    assert list(plan.tasks[0].tools) == ["kb.search", "pay.charge", "pay.refund"]
    with pytest.raises(InvalidArgument) as raised:
        validate(graph(task("a", tools=["pay.refund", "db.drop"])), contracts)
    assert [f for f, _ in raised.value.field_violations] == ["plan.tasks[0].tools[1]"]


def test_an_unregistered_compensation_is_only_a_warning() -> None:
    async def run() -> tuple[tuple[str, str], ...]:
        validator = PlanValidator(Contracts([contract("demo.work", compensation="demo.undo")]))
        return (await validator.validate(graph(task("a")))).warnings

    assert asyncio.run(run()) == (
        (
            "plan.tasks[0].capability",
            "demo.work may be compensated by 'demo.undo', which is not registered",
        ),
    )


def test_unregistered_handoff_targets_are_only_warnings() -> None:
    async def run() -> tuple[tuple[str, str], ...]:
        validator = PlanValidator(
            Contracts(
                [
                    contract("demo.work", handoffs=["demo.next"]),
                    contract("demo.next", handoffs=["demo.gone"]),
                ]
            )
        )
        return (await validator.validate(graph(task("a")))).warnings

    assert asyncio.run(run()) == (
        (
            "plan.tasks[0].capability",
            "demo.next may hand off to 'demo.gone', which is not registered",
        ),
    )


# -- properties -------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn, max_tasks: int = 12) -> planner_pb2.TaskGraph:
    """Random DAGs: task i depends only on tasks before it."""
    n = draw(st.integers(min_value=1, max_value=max_tasks))
    tasks = []
    for i in range(n):
        deps = draw(st.sets(st.integers(min_value=0, max_value=i - 1), max_size=3)) if i else set()
        tasks.append(task(f"t{i}", *(f"t{d}" for d in sorted(deps))))
    order = draw(st.permutations(range(n)))
    return graph(*(tasks[i] for i in order))


ROOMY = Limits(max_depth=50, max_fan_out=50, max_tasks=50)


@given(dags())
def test_random_dags_validate(g: planner_pb2.TaskGraph) -> None:
    assert check_plan(g, ROOMY) == []


def _ancestors(g: planner_pb2.TaskGraph) -> dict[str, set[str]]:
    deps = {t.id: set(t.depends_on) for t in g.tasks}
    closure: dict[str, set[str]] = {}

    def walk(node: str) -> set[str]:
        if node not in closure:
            closure[node] = set()
            for d in deps[node]:
                closure[node] |= {d, *walk(d)}
        return closure[node]

    for node in deps:
        walk(node)
    return closure


@given(dags(), st.data())
def test_a_back_edge_is_always_reported_as_a_cycle(
    g: planner_pb2.TaskGraph, data: st.DataObject
) -> None:
    reachable = _ancestors(g)
    pairs = [(node, dep) for node, deps in reachable.items() for dep in deps]
    pairs += [(t.id, t.id) for t in g.tasks]  # a self-loop is a back edge too
    node, dep = data.draw(st.sampled_from(sorted(pairs)))
    # `node` depends (transitively) on `dep`; making `dep` depend on `node` closes a cycle.
    target = next(t for t in g.tasks if t.id == dep)
    target.depends_on.append(node)
    problems = check_structure(g, ROOMY)
    assert any("dependency cycle" in d for _, d in problems)


task_ids = st.one_of(st.text(max_size=4), st.sampled_from(["a", "b", "c"]))
specs = st.builds(
    planner_pb2.TaskSpec,
    id=task_ids,
    kind=st.integers(min_value=-1, max_value=4),
    capability=st.text(max_size=6),
    version=st.one_of(st.just(""), st.text(max_size=6), st.sampled_from(["^1.0", ">=1,<2"])),
    depends_on=st.lists(task_ids, max_size=4),
    max_attempts=st.integers(min_value=-3, max_value=3),
    gate_reason=st.text(max_size=3),
)
graphs = st.builds(
    planner_pb2.TaskGraph,
    tasks=st.lists(specs, max_size=8),
    budget=st.one_of(
        st.none(),
        st.builds(
            common_pb2.Budget,
            max_tokens=st.integers(-5, 5),
            max_cost_micros=st.integers(-5, 5),
            max_tool_calls=st.integers(-5, 5),
            max_iterations=st.integers(-5, 5),
        ),
    ),
    max_iterations=st.integers(-5, 5),
)


@settings(max_examples=300)
@given(graphs)
def test_validation_never_raises_anything_but_invalid_argument(
    g: planner_pb2.TaskGraph,
) -> None:
    async def run() -> None:
        await PlanValidator(
            Contracts([contract("a"), contract("b", "0.1.0")]),
            Limits(max_depth=3, max_fan_out=2, max_tasks=5),
        ).validate(g)

    try:
        asyncio.run(run())
    except InvalidArgument as exc:
        assert exc.field_violations
        assert all(f.startswith("plan") for f, _ in exc.field_violations)
