"""The Cedar policy engine: the repository's policies and cases, refusal of bad sets,
fail-closed decisions, and properties over random requests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cedarpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.policy.cases import load_cases, run_case
from tessera.policy.engine import (
    CheckInput,
    LoadedPolicySet,
    PolicyLoadError,
    RequestInvalid,
    build_policy_set,
    evaluate,
    load_policy_dir,
)
from tessera.policy.store import PolicyStore

ROOT = Path(__file__).resolve().parents[2]
POLICY_DIR = ROOT / "policy"
SCHEMA = (POLICY_DIR / "schema.cedarschema").read_text()
REPO_SET = load_policy_dir(POLICY_DIR)
CASES = load_cases(POLICY_DIR / "tests")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.file}:{c.name}" for c in CASES])
def test_every_policy_case_passes(case: Any) -> None:
    result = run_case(REPO_SET, case)
    assert result.passed, result.problems


def test_oracle_has_every_forbid() -> None:
    assert set(FORBID_ORACLES) == {p.id for p in REPO_SET.policies.values() if p.effect == "forbid"}


def test_cases_cover_every_policy_and_every_decision() -> None:
    named = {p for c in CASES for p in (c.policies or ())}
    assert named >= set(REPO_SET.policy_ids)
    assert {c.expect for c in CASES} >= {"allow", "deny", "approval_required", "invalid"}
    assert any(c.expect == "deny" and c.policies == () for c in CASES), "default deny case"


def _copy_policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, target)
    return target


def _refund(amount: int, approval: str = "none") -> CheckInput:
    return CheckInput(
        principal_type="Agent",
        principal_id="billing",
        action="call_tool",
        resource_type="Tool",
        resource_id="billing.issue_refund",
        principal_attrs={"tier": "standard", "tools": ["billing.issue_refund"]},
        resource_attrs={"side_effect": "external_action", "pii": False, "category": "billing"},
        context={"amount": amount, "approval": approval, "budget_remaining": 10**9},
    )


@pytest.mark.parametrize(
    ("files", "expected_subject"),
    [
        ({"99_bad.cedar": "permit(principal, action, resource"}, "policies/99_bad.cedar"),
        ({"99_noid.cedar": "permit(principal, action, resource);"}, "policies/99_noid.cedar"),
        (
            {"99_dup.cedar": '@id("declared-tool") forbid(principal, action, resource);'},
            "policies/99_dup.cedar#declared-tool",
        ),
        (
            {
                "99_type.cedar": '@id("typo") permit(principal is Agent, '
                'action == Action::"call_tool", resource is Tool) when { resource.pii == "yes" };'
            },
            "policies/99_type.cedar#typo",
        ),
        (
            {
                "99_appr.cedar": '@id("f") @approval("required") '
                "forbid(principal, action, resource);"
            },
            "policies/99_appr.cedar#f",
        ),
    ],
    ids=["parse-error", "missing-id", "duplicate-id", "schema-type-error", "approval-on-forbid"],
)
def test_invalid_policy_sets_are_refused_with_the_culprit_named(
    tmp_path: Path, files: dict[str, str], expected_subject: str
) -> None:
    directory = _copy_policy_dir(tmp_path)
    for name, text in files.items():
        (directory / "policies" / name).write_text(text)

    with pytest.raises(PolicyLoadError) as caught:
        load_policy_dir(directory)

    assert expected_subject in [subject for subject, _ in caught.value.errors]


def test_empty_policy_set_is_refused() -> None:
    with pytest.raises(PolicyLoadError, match="empty policy set"):
        build_policy_set(SCHEMA, [])


async def test_a_broken_file_is_refused_and_the_last_good_set_keeps_answering(
    tmp_path: Path,
) -> None:
    directory = _copy_policy_dir(tmp_path)
    store = PolicyStore(directory)
    good = await store.reload()
    (directory / "policies" / "20_billing.cedar").write_text("permit(principal,")

    with pytest.raises(PolicyLoadError):
        await store.reload()

    assert store.current is good
    assert "20_billing.cedar" in store.last_error
    assert evaluate(store.current, _refund(500), hour=12).decision == "allow"


def test_policy_set_version_is_a_content_hash(tmp_path: Path) -> None:
    directory = _copy_policy_dir(tmp_path)
    assert load_policy_dir(directory).version == REPO_SET.version
    (directory / "policies" / "60_extra.cedar").write_text(
        '@id("extra") forbid(principal, action, resource) when { context.hour == 3 };'
    )
    assert load_policy_dir(directory).version != REPO_SET.version


def test_evaluation_error_is_a_deny_not_an_allow() -> None:
    # An overflow makes the forbid fail to evaluate: Cedar skips it and would Allow.
    ps = build_policy_set(
        SCHEMA,
        [
            (
                "p.cedar",
                '@id("all") permit(principal, action, resource);\n'
                '@id("overflow") forbid(principal, action == Action::"call_tool", resource) '
                "when { context.budget_remaining * 9223372036854775807 > 0 };",
            )
        ],
    )
    verdict = evaluate(ps, _refund(10), hour=12)
    assert verdict.decision == "deny"
    assert verdict.errors


def test_no_decision_is_a_deny(monkeypatch: pytest.MonkeyPatch) -> None:
    class _NoDecision:
        decision = cedarpy.Decision.NoDecision

        class diagnostics:
            errors = ["policy set is broken"]
            reasons: list[str] = []

    monkeypatch.setattr(cedarpy, "is_authorized", lambda *a, **k: _NoDecision())
    verdict = evaluate(load_policy_dir(POLICY_DIR), _refund(10), hour=12)  # nothing cached
    assert verdict.decision == "deny"
    assert verdict.errors == ("policy set is broken",)


def test_wrong_types_are_invalid_with_field_paths() -> None:
    request = _refund(10)
    bad = CheckInput(
        **{**request.__dict__, "principal_attrs": {"tier": 1, "tools": ["billing.issue_refund"]}}
    )
    with pytest.raises(RequestInvalid) as caught:
        evaluate(REPO_SET, bad, hour=12)
    assert [f for f, _ in caught.value.violations] == ["principal"]
    assert "tier" in caught.value.violations[0][1]

    with pytest.raises(RequestInvalid) as caught:
        evaluate(REPO_SET, CheckInput(**{**request.__dict__, "action": "launch"}), hour=12)
    assert [f for f, _ in caught.value.violations] == ["action"]

    with pytest.raises(RequestInvalid) as caught:
        evaluate(REPO_SET, CheckInput("", "", "", "", ""), hour=12)
    assert {f for f, _ in caught.value.violations} == {
        "principal.type",
        "principal.id",
        "action",
        "resource.type",
        "resource.id",
    }


def test_caller_cannot_choose_the_hour_or_smuggle_entity_escapes() -> None:
    ps = build_policy_set(
        SCHEMA,
        [
            (
                "p.cedar",
                '@id("night") permit(principal, action, resource) when { context.hour == 3 };',
            )
        ],
    )
    request = _refund(10)
    forged = CheckInput(**{**request.__dict__, "context": {**request.context, "hour": 3}})
    assert evaluate(ps, forged, hour=12).decision == "deny"
    assert evaluate(ps, forged, hour=3).decision == "allow"
    escape = CheckInput(
        **{**request.__dict__, "principal_attrs": {"tier": {"__entity": {"type": "X", "id": "y"}}}}
    )
    with pytest.raises(RequestInvalid):
        evaluate(REPO_SET, escape, hour=12)


# -- properties ----------------------------------------------------------------------------

TOOL_NAMES = [
    "crm.lookup_customer",
    "billing.get_invoices",
    "billing.issue_refund",
    "billing.reverse_refund",
    "kb.search",
    "email.send",
    "credit.bureau_report",
    "procurement.accept_offer",
    "shell.exec",
]
AGENT_IDS = ["triage", "billing", "negotiation", "risk", "rogue", "x"]
cents = st.integers(min_value=-(10**7), max_value=10**9)


@st.composite
def tool_calls(draw: st.DrawFn) -> CheckInput:
    context: dict[str, Any] = {"budget_remaining": draw(cents)}
    for key in ("amount", "price", "max_budget"):
        if draw(st.booleans()):
            context[key] = draw(cents)
    context["approval"] = draw(st.sampled_from(["none", "approved"]))
    if draw(st.booleans()):
        context["arguments"] = {"note": draw(st.text(max_size=5))}
    return CheckInput(
        principal_type="Agent",
        principal_id=draw(st.sampled_from(AGENT_IDS)),
        action="call_tool",
        resource_type="Tool",
        resource_id=draw(st.sampled_from(TOOL_NAMES)),
        principal_attrs={
            "tier": draw(st.sampled_from(["standard", "compliance"])),
            "tools": draw(st.lists(st.sampled_from(TOOL_NAMES), max_size=4, unique=True)),
        },
        resource_attrs={
            "side_effect": draw(st.sampled_from(["read_only", "external_action"])),
            "pii": draw(st.booleans()),
            "category": draw(st.sampled_from(["crm", "billing", "credit"])),
        },
        context=context,
    )


def _single_forbid_sets() -> dict[str, LoadedPolicySet]:
    """Each repository forbid alone beside a catch-all permit: an independent oracle of
    whether that forbid matches a request (Deny iff it does)."""
    combined = "\n".join(p.read_text() for p in sorted((POLICY_DIR / "policies").glob("*.cedar")))
    static = json.loads(cedarpy.policies_to_json_str(combined))["staticPolicies"]
    permit_all = '@id("any") permit(principal, action, resource);'
    out = {}
    for body in static.values():
        if body["effect"] != "forbid":
            continue
        text = cedarpy.policies_from_json_str(
            json.dumps({"staticPolicies": {"f": body}, "templates": {}, "templateLinks": []})
        )
        out[body["annotations"]["id"]] = build_policy_set(
            SCHEMA, [("f.cedar", text + "\n" + permit_all)]
        )
    return out


FORBID_ORACLES = _single_forbid_sets()


def _forbids_matching(req: CheckInput, hour: int) -> set[str]:
    return {
        policy_id
        for policy_id, ps in FORBID_ORACLES.items()
        if evaluate(ps, req, hour=hour).decision == "deny"
    }


@settings(max_examples=300, deadline=None)
@given(tool_calls(), st.integers(min_value=0, max_value=23))
def test_an_undeclared_tool_is_never_allowed(req: CheckInput, hour: int) -> None:
    verdict = evaluate(REPO_SET, req, hour=hour)
    if req.resource_id not in req.principal_attrs["tools"]:
        assert verdict.decision == "deny"
        assert "undeclared-tool" in verdict.determining_policies


@settings(max_examples=200, deadline=None)
@given(tool_calls(), st.integers(min_value=0, max_value=23))
def test_never_allowed_when_any_forbid_matches(req: CheckInput, hour: int) -> None:
    verdict = evaluate(REPO_SET, req, hour=hour)
    forbids = _forbids_matching(req, hour)
    if forbids:
        assert verdict.decision == "deny"
        assert set(verdict.determining_policies) == forbids
    if verdict.decision != "deny":
        assert all(REPO_SET_BY_ID[p].effect == "permit" for p in verdict.determining_policies)


REPO_SET_BY_ID = {p.id: p for p in REPO_SET.policies.values()}


def test_entity_sets_are_parsed_once_and_decide_as_before() -> None:
    ps = load_policy_dir(POLICY_DIR)
    first = evaluate(ps, _refund(500), hour=12)
    assert len(ps.entities) == 1
    again = evaluate(ps, _refund(250_000), hour=12)  # same entities, other context
    assert len(ps.entities) == 1
    assert (first.decision, again.decision) == ("allow", "approval_required")
    undeclared = {"tier": "standard", "tools": []}
    other = CheckInput(**{**_refund(500).__dict__, "principal_attrs": undeclared})
    assert evaluate(ps, other, hour=12).decision == "deny"  # other entities: own entry
    assert len(ps.entities) == 2
    # Entities that do not conform are never cached and are still reported precisely.
    bad = CheckInput(**{**_refund(10).__dict__, "principal_attrs": {"tier": 1, "tools": ["x"]}})
    with pytest.raises(RequestInvalid):
        evaluate(ps, bad, hour=12)
    assert len(ps.entities) == 2


def test_verdicts_are_reused_only_for_the_same_request_and_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    real = cedarpy.is_authorized

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cedarpy, "is_authorized", counting)
    ps = load_policy_dir(POLICY_DIR)
    first = evaluate(ps, _refund(500), hour=12)
    assert evaluate(ps, _refund(500), hour=12) == first and calls == 1
    # Arguments are opaque to Cedar: other arguments with the same amount, same verdict.
    other_args = CheckInput(
        **{**_refund(500).__dict__, "context": {**_refund(500).context, "arguments": {"x": 1}}}
    )
    assert evaluate(ps, other_args, hour=12) == first and calls == 1
    # Anything Cedar sees is part of the key: the amount, the hour, the principal.
    assert evaluate(ps, _refund(250_000), hour=12).decision == "approval_required"
    assert calls == 2
    evaluate(ps, _refund(500), hour=13)
    assert calls == 3
    undeclared = CheckInput(
        **{**_refund(500).__dict__, "principal_attrs": {"tier": "standard", "tools": []}}
    )
    assert evaluate(ps, undeclared, hour=12).decision == "deny" and calls == 4
    # A reloaded set starts empty, so a changed policy is never answered from the old set.
    assert evaluate(load_policy_dir(POLICY_DIR), _refund(500), hour=12) == first
    assert calls == 5
