"""Coverage of `tessera policy test`: every permit and forbid must decide some case."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from tessera.cli.policy import app
from tessera.policy.cases import Case, load_cases, run_cases
from tessera.policy.coverage import coverage, uncovered
from tessera.policy.engine import CheckInput, build_policy_set, load_policy_dir

ROOT = Path(__file__).resolve().parents[2]
POLICY_DIR = ROOT / "policy"
SCHEMA = (POLICY_DIR / "schema.cedarschema").read_text()

POLICIES = textwrap.dedent(
    """
    @id("read")
    permit (principal is Agent, action == Action::"call_tool", resource is Tool)
    when { principal.tools.contains(resource.name) };

    @id("never-kb")
    forbid (principal is Agent, action == Action::"call_tool", resource is Tool)
    when { resource.name == "kb.search" };

    // Only ever true where never-kb forbids: it matches, never decides.
    @id("kb-for-compliance")
    permit (principal is Agent, action == Action::"call_tool", resource is Tool)
    when { resource.name == "kb.search" && principal.tier == "compliance" };

    // No case reaches it.
    @id("night-shift")
    permit (principal is Agent, action == Action::"call_tool", resource is Tool)
    when { context.hour < 6 };
    """
)


def _case(name: str, tier: str, tool: str) -> Case:
    return Case(
        file="t.yaml",
        name=name,
        request=CheckInput(
            principal_type="Agent",
            principal_id="a",
            action="call_tool",
            resource_type="Tool",
            resource_id=tool,
            principal_attrs={"tier": tier, "tools": [tool]},
            resource_attrs={"side_effect": "read_only", "pii": False, "category": "x"},
            context={"budget_remaining": 1},
        ),
        expect="allow",
    )


def test_every_repository_policy_decides_some_case() -> None:
    ps = load_policy_dir(POLICY_DIR)
    report = coverage(ps, run_cases(ps, load_cases(POLICY_DIR / "tests")))
    assert {c.id for c in report} == set(ps.policy_ids)
    assert uncovered(report) == []


def test_a_shadowed_permit_and_an_unreached_one_are_uncovered() -> None:
    ps = build_policy_set(SCHEMA, [("p.cedar", POLICIES)])
    cases = [
        _case("crm lookup", "standard", "crm.lookup_customer"),
        _case("compliance searches the kb", "compliance", "kb.search"),
    ]
    report = {c.id: c for c in coverage(ps, run_cases(ps, cases))}
    assert report["read"].status == "covered"
    assert report["read"].determined == ("t.yaml: crm lookup",)
    # Matched alone for both cases (the second is overridden by never-kb).
    assert len(report["read"].matched) == 2
    assert report["never-kb"].determined == ("t.yaml: compliance searches the kb",)
    assert report["kb-for-compliance"].status == "shadowed"
    assert report["kb-for-compliance"].matched == ("t.yaml: compliance searches the kb",)
    assert report["night-shift"].status == "unreached"
    assert {c.id for c in uncovered(list(report.values()))} == {
        "kb-for-compliance",
        "night-shift",
    }


def test_invalid_cases_reach_no_policy() -> None:
    ps = build_policy_set(SCHEMA, [("p.cedar", POLICIES)])
    bad = _case("bad", "standard", "crm.lookup_customer")
    bad = Case(
        file=bad.file,
        name=bad.name,
        request=CheckInput(**{**bad.request.__dict__, "context": {"budget_remaining": 1.5}}),
        expect="invalid",
    )
    report = coverage(ps, run_cases(ps, [bad]))
    assert all(not c.determined and not c.matched for c in report)


def test_the_command_fails_naming_the_policy_no_case_reaches(tmp_path: Path) -> None:
    target = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, target)
    runner = CliRunner()
    ok = runner.invoke(app, ["test", "--dir", str(target)])
    assert ok.exit_code == 0, ok.output
    assert "policies covered" in ok.output
    (target / "policies" / "90_dead.cedar").write_text(
        '@id("dead-night-permit")\n'
        'permit (principal is Agent, action == Action::"call_tool", resource is Tool)\n'
        "when { context.hour == 3 };\n"
    )
    failed = runner.invoke(app, ["test", "--dir", str(target)])
    assert failed.exit_code == 1
    assert "dead-night-permit (unreached)" in failed.output
