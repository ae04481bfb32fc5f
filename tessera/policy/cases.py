"""Policy test cases (``policy/tests/*.yaml``): load them and run them offline.

A case file::

    agents:                 # named principals (type Agent unless `type` is given)
      billing: {tier: standard, tools: [billing.get_invoices, billing.issue_refund]}
    tools:                  # named resources (type Tool unless `type` is given)
      billing.issue_refund: {side_effect: external_action, pii: false, category: billing}
    defaults:               # merged under every case
      action: call_tool
      context: {budget_remaining: 100000}
    cases:
      - name: small refund runs directly
        principal: billing              # a name above, or {type, id, attributes, groups}
        resource: billing.issue_refund  # a name above, or {type, id, attributes}
        context: {amount: 50000}        # cents; merged over defaults.context
        expect: allow                   # allow | deny | approval_required
        policies: [refund-within-limit] # optional: exact determining @ids
        reason: ...                     # optional: expected approval reason
        hour: 12                        # optional: UTC hour (default 12)

`tessera policy test` also reports coverage (:mod:`tessera.policy.coverage`): every
policy must be a determining policy of at least one case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tessera.policy.engine import CheckInput, LoadedPolicySet, RequestInvalid, evaluate

__all__ = ["Case", "CaseError", "CaseResult", "load_cases", "run_cases"]

DECISIONS = ("allow", "deny", "approval_required", "invalid")
DEFAULT_HOUR = 12


class CaseError(Exception):
    """A case file that cannot be read."""


@dataclass(frozen=True)
class Case:
    file: str
    name: str
    request: CheckInput
    expect: str
    policies: tuple[str, ...] | None = None
    reason: str | None = None
    hour: int = DEFAULT_HOUR


@dataclass(frozen=True)
class CaseResult:
    case: Case
    decision: str
    policies: tuple[str, ...] = ()
    reason: str = ""
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return not self.problems


def _entity(
    spec: Any, named: Mapping[str, Any], default_type: str, where: str
) -> tuple[str, str, dict[str, Any]]:
    if isinstance(spec, str):
        if spec not in named:
            raise CaseError(f"{where}: unknown name {spec!r}")
        attrs = dict(named[spec] or {})
        return str(attrs.pop("type", default_type)), spec, attrs
    if isinstance(spec, Mapping):
        return (
            str(spec.get("type", default_type)),
            str(spec.get("id", "")),
            dict(spec.get("attributes") or {}),
        )
    raise CaseError(f"{where}: expected a name or a mapping")


def _cases_in(path: Path) -> list[Case]:
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CaseError(f"{path.name}: {exc}") from exc
    agents = doc.get("agents") or {}
    tools = doc.get("tools") or {}
    defaults = doc.get("defaults") or {}
    out: list[Case] = []
    for i, raw in enumerate(doc.get("cases") or []):
        name = str(raw.get("name") or f"case {i + 1}")
        where = f"{path.name}: {name}"
        expect = raw.get("expect")
        if expect not in DECISIONS:
            raise CaseError(f"{where}: expect must be one of {', '.join(DECISIONS)}")
        p_type, p_id, p_attrs = _entity(raw.get("principal"), agents, "Agent", where)
        # A person's groups (the `groups` claim of their token): `principal.groups`.
        spec = raw.get("principal")
        groups = (spec.get("groups") or []) if isinstance(spec, Mapping) else []
        r_type, r_id, r_attrs = _entity(raw.get("resource"), tools, "Tool", where)
        context = {**(defaults.get("context") or {}), **(raw.get("context") or {})}
        policies = raw.get("policies")
        out.append(
            Case(
                file=path.name,
                name=name,
                request=CheckInput(
                    principal_type=p_type,
                    principal_id=p_id,
                    action=str(raw.get("action", defaults.get("action", ""))),
                    resource_type=r_type,
                    resource_id=r_id,
                    principal_attrs=p_attrs,
                    resource_attrs=r_attrs,
                    context=context,
                    principal_groups=tuple(str(g) for g in groups),
                ),
                expect=str(expect),
                policies=tuple(policies) if policies is not None else None,
                reason=raw.get("reason"),
                hour=int(raw.get("hour", DEFAULT_HOUR)),
            )
        )
    return out


def load_cases(directory: Path) -> list[Case]:
    """Every case of every ``*.yaml`` file in ``directory`` (sorted by file name)."""
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    if not files:
        raise CaseError(f"no *.yaml case files in {directory}")
    return [case for path in files for case in _cases_in(path)]


def run_case(ps: LoadedPolicySet, case: Case) -> CaseResult:
    policies: tuple[str, ...]
    try:
        verdict = evaluate(ps, case.request, hour=case.hour)
    except RequestInvalid as exc:
        decision, policies, reason = "invalid", (), str(exc)
    else:
        decision, policies, reason = (
            verdict.decision,
            verdict.determining_policies,
            verdict.approval_reason,
        )
    problems: list[str] = []
    if decision != case.expect:
        problems.append(f"expected {case.expect}, got {decision}")
    if case.policies is not None and sorted(case.policies) != sorted(policies):
        problems.append(f"expected policies {sorted(case.policies)}, got {sorted(policies)}")
    if case.reason is not None and case.reason != reason:
        problems.append(f"expected reason {case.reason!r}, got {reason!r}")
    return CaseResult(case, decision, tuple(policies), reason, tuple(problems))


def run_cases(ps: LoadedPolicySet, cases: Sequence[Case]) -> list[CaseResult]:
    return [run_case(ps, case) for case in cases]
