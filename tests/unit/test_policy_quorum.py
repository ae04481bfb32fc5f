"""`@quorum("N")`: a permit that needs N distinct people (gate approvals)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.policy.engine import CheckInput, PolicyLoadError, build_policy_set, evaluate

POLICY_DIR = Path(__file__).resolve().parents[2] / "policy"
SCHEMA = (POLICY_DIR / "schema.cedarschema").read_text()
GATE = {
    "kind": "approval_step",
    "template": "procurement",
    "started_by": "requester",
    "capability": "",
    "tool": "",
}


def _decide(text: str, groups: tuple[str, ...] = ("finance-approvers",)) -> object:
    policies = build_policy_set(SCHEMA, [("q.cedar", text)])
    request = CheckInput(
        principal_type="User",
        principal_id="finn",
        principal_attrs={"name": "finn"},
        principal_groups=groups,
        action="decide_gate",
        resource_type="Gate",
        resource_id="w/g",
        resource_attrs=GATE,
        context={"approve": True},
    )
    return evaluate(policies, request, hour=12)


PERMIT = (
    'permit (principal in Group::"finance-approvers", action == Action::"decide_gate", '
    "resource is Gate);"
)


def test_an_allow_carries_the_quorum_of_its_policy() -> None:
    verdict = _decide(f'@id("four-eyes")\n@quorum("2")\n{PERMIT}')
    assert (verdict.decision, verdict.quorum) == ("allow", 2)  # type: ignore[attr-defined]
    plain = _decide(f'@id("one")\n{PERMIT}')
    assert plain.quorum == 1  # type: ignore[attr-defined]


def test_the_largest_quorum_of_the_allowing_policies_wins() -> None:
    text = f'@id("a")\n@quorum("2")\n{PERMIT}\n@id("b")\n@quorum("3")\n{PERMIT}'
    assert _decide(text).quorum == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["0", "11", "two", "-1"])
def test_a_quorum_out_of_range_is_refused_at_load(value: str) -> None:
    with pytest.raises(PolicyLoadError) as info:
        build_policy_set(SCHEMA, [("q.cedar", f'@id("bad")\n@quorum("{value}")\n{PERMIT}')])
    assert "q.cedar#bad" in str(info.value.errors)


def test_a_quorum_on_a_forbid_is_refused() -> None:
    text = f'@id("f")\n@quorum("2")\nforbid (principal, action, resource);\n@id("p")\n{PERMIT}'
    with pytest.raises(PolicyLoadError):
        build_policy_set(SCHEMA, [("q.cedar", text)])
