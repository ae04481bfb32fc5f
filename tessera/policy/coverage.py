"""Policy coverage for ``tessera policy test``: which policy did each case reach?

Two relations between a case and a policy are measured:

``determined``
    The policy is one of Cedar's determining policies for the case's decision
    (``diagnostics.reasons``): for an Allow, every permit whose scope and condition held;
    for a Deny, every forbid that held. This is what the policy *decided*.

``matched``
    The policy's scope and condition held for the case's request, whatever decided it:
    the policy is evaluated alone, in a set of its own (a permit alone allows iff it
    matches; a forbid alone names itself iff it matches). This also sees a permit that
    held while a forbid overrode it, which Cedar's reasons never name.

A policy is **covered** when at least one case it *determined* exists. A policy that
only ever matched where another policy decided (a permit every case of which a forbid
overrides) is reported as ``shadowed`` and is not covered: no case shows it deciding what
it says, so it may as well be dead. Cases that expect ``invalid`` reach no policy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tessera.policy.cases import CaseResult
from tessera.policy.engine import LoadedPolicySet, RequestInvalid, prepare

if TYPE_CHECKING:
    import cedarpy

__all__ = ["PolicyCoverage", "coverage", "uncovered"]


@dataclass(frozen=True)
class PolicyCoverage:
    id: str
    """The policy's ``@id``."""
    effect: str
    file: str
    determined: tuple[str, ...]
    """``<file>: <case>`` of every case this policy was a determining policy of."""
    matched: tuple[str, ...]
    """``<file>: <case>`` of every case whose request this policy matched (alone)."""

    @property
    def covered(self) -> bool:
        return bool(self.determined)

    @property
    def status(self) -> str:
        if self.determined:
            return "covered"
        return "shadowed" if self.matched else "unreached"


def _single_sets(ps: LoadedPolicySet) -> dict[str, cedarpy.PolicySet]:
    import cedarpy

    return {
        cedar_id: cedarpy.PolicySet.from_json_str(
            json.dumps({"staticPolicies": {cedar_id: body}, "templates": {}, "templateLinks": []})
        )
        for cedar_id, body in ps.sources.items()
    }


def _matching(
    singles: Mapping[str, cedarpy.PolicySet],
    ps: LoadedPolicySet,
    request: dict[str, Any],
    entities: list[dict[str, Any]],
) -> set[str]:
    import cedarpy

    out: set[str] = set()
    for cedar_id, single in singles.items():
        result = cedarpy.is_authorized(request, single, entities, schema=ps.schema)
        if cedar_id in result.diagnostics.reasons and not result.diagnostics.errors:
            out.add(cedar_id)
    return out


def coverage(ps: LoadedPolicySet, results: Sequence[CaseResult]) -> list[PolicyCoverage]:
    """Every policy of ``ps`` (sorted by file, then @id) with the cases that reached it.
    ``results`` are the cases' runs on ``ps`` (:func:`tessera.policy.cases.run_cases`)."""
    singles = _single_sets(ps)
    determined: dict[str, list[str]] = {p.id: [] for p in ps.policies.values()}
    matched: dict[str, list[str]] = {p.id: [] for p in ps.policies.values()}
    for result in results:
        if result.decision == "invalid":
            continue
        label = f"{result.case.file}: {result.case.name}"
        for policy_id in result.policies:
            determined.setdefault(policy_id, []).append(label)
        try:
            request, entities = prepare(result.case.request, hour=result.case.hour)
        except RequestInvalid:  # pragma: no cover - run_case reported it invalid
            continue
        for cedar_id in _matching(singles, ps, request, entities):
            matched[ps.policies[cedar_id].id].append(label)
    return sorted(
        (
            PolicyCoverage(
                id=info.id,
                effect=info.effect,
                file=info.file,
                determined=tuple(determined[info.id]),
                matched=tuple(matched[info.id]),
            )
            for info in ps.policies.values()
        ),
        key=lambda c: (c.file, c.id),
    )


def uncovered(report: Sequence[PolicyCoverage]) -> list[PolicyCoverage]:
    """The policies no case shows deciding (``unreached`` or ``shadowed``)."""
    return [c for c in report if not c.covered]
