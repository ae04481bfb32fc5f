"""The review console's stories (issue: the review console), each asserted on what the
page shows and on the server's state and audit trail."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import hvac
from playwright.sync_api import Browser, expect

from tessera.v1 import coordinator_pb2
from tessera.vault.humans import HUMAN_POLICY, SIGNING_KEY, login
from tests.browser.conftest import CLOCK_SKEW_S, ConsoleMesh
from tests.browser.console import (
    WAIT_MS,
    audit_lines,
    decided_in_audit,
    gate_article,
    log_in,
    new_page,
    refunds,
    screenshot,
    start,
    wait_for_gate,
    workflow,
)

WS = coordinator_pb2.WorkflowState
REFUND_OVER_1000 = {
    "ticket": {
        "id": "T-902",
        "customer_id": "C-77",
        "text": "please refund 1500 for the duplicate annual plan",
    }
}
LOAN = {"application": {"applicant": "Globex", "amount": 250000, "country": "XX"}}
RISK = {"customer": {"id": "C-42", "income": 55000, "transactions": [120, 7000, 30]}}


def test_finance_approves_a_large_refund_and_watches_it_complete(
    console_mesh: ConsoleMesh, browser: Browser
) -> None:
    name = start(console_mesh, "support", REFUND_OVER_1000)
    gate = wait_for_gate(console_mesh, name)
    context, inbox = new_page(browser)
    try:
        log_in(inbox, console_mesh, "finance")
        article = gate_article(inbox, gate)
        expect(article).to_be_visible(timeout=WAIT_MS)
        # Exactly what is approved: the tool, its arguments, the amount, who asks.
        expect(article.get_by_test_id("gate-tool")).to_have_text("billing.issue_refund")
        expect(article.get_by_test_id("gate-amount")).to_contain_text("1500")
        expect(article.get_by_test_id("gate-arguments")).to_contain_text("C-77")
        expect(article.get_by_test_id("gate-started-by")).to_contain_text("requester")
        expect(article.get_by_test_id("gate-policies")).not_to_be_empty()
        expect(article.get_by_test_id("gate-quorum")).to_contain_text("of")
        screenshot(inbox, "inbox")

        # The workflow's page, open before the decision, follows it live.
        detail = context.new_page()
        detail.goto(f"{console_mesh.url}#/workflows/{name.split('/')[1]}")
        expect(detail.get_by_test_id("workflow-state")).to_have_text(
            "WAITING_APPROVAL", timeout=WAIT_MS
        )

        article.locator("textarea[name=comment]").fill("duplicate charge confirmed")
        article.get_by_test_id("approve").click()
        expect(article.get_by_test_id("gate-result")).to_contain_text("Approved", timeout=WAIT_MS)
        expect(article.get_by_test_id("gate-workflow-state")).to_have_text(
            "SUCCEEDED", timeout=WAIT_MS
        )
        # Without a reload: the stream brought the rest of the workflow to the open page.
        expect(detail.get_by_test_id("workflow-state")).to_have_text("SUCCEEDED", timeout=WAIT_MS)
        decision = detail.locator('[data-testid="timeline"] li[data-kind="gate_decided"]')
        expect(decision).to_contain_text("finance")
        expect(
            detail.locator('[data-testid="timeline"] li[data-kind="workflow_completed"]')
        ).to_have_count(1)
        # Its audit trail on the same page, verified: the decision is covered by a signed
        # checkpoint once its chain's next one is written (within seconds).
        expect(detail.get_by_test_id("audit-summary")).to_contain_text("signatures checked")
        approval = detail.locator('[data-testid="audit"] tr[data-kind="APPROVAL"]').first
        deadline = time.monotonic() + WAIT_MS / 1000
        while True:
            detail.get_by_role("button", name="Verify again").click()
            try:
                expect(approval).to_have_attribute("data-verification", "VERIFIED", timeout=5000)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        expect(
            detail.locator('[data-testid="audit"] tr[data-kind="TOOL_CALL"]').first
        ).to_be_visible()
        screenshot(detail, "workflow")
    finally:
        context.close()

    final = workflow(console_mesh, name)
    assert final.state == WS.WORKFLOW_STATE_SUCCEEDED
    decided = next(g for g in final.gates if g.name == gate)
    assert decided.decided_by == "finance" and decided.comment == "duplicate charge confirmed"
    assert refunds(console_mesh, name.split("/")[1]) == 1  # counted at the tool's outbox
    # On the record, in the name the front door verified, and the trail verifies.
    assert decided_in_audit(console_mesh, gate) == ("approved", "finance")


def test_the_requester_is_not_offered_their_own_gate_and_a_forged_decision_is_refused(
    console_mesh: ConsoleMesh, browser: Browser
) -> None:
    name = start(console_mesh, "support", REFUND_OVER_1000)
    gate = wait_for_gate(console_mesh, name)
    context, page = new_page(browser)
    try:
        log_in(page, console_mesh, "requester")
        expect(page.get_by_test_id("inbox-empty")).to_be_visible(timeout=WAIT_MS)
        expect(gate_article(page, gate)).to_have_count(0)
        # The same request the Approve button would send, with the requester's own session.
        forged = page.request.post(
            f"http://{console_mesh.gateway}/v1/{gate}:decide",
            data={"decision": "GATE_DECISION_APPROVE", "comment": "my own"},
        )
        assert forged.status == 403, forged.text()
        assert forged.json()["code"] == 7  # PERMISSION_DENIED, as a google.rpc.Status
    finally:
        context.close()
    still = workflow(console_mesh, name)
    assert still.state == WS.WORKFLOW_STATE_WAITING_APPROVAL
    pending = next(g for g in still.gates if g.name == gate)
    assert pending.state == coordinator_pb2.GATE_STATE_PENDING
    denials = [
        line
        for line in audit_lines(console_mesh, gate.split("/")[-1])
        if "policy_decision" in line and "deny" in line
    ]
    assert denials, "the refused decision is not on the record"


def test_compliance_sees_the_loan_gate_not_the_refund_gate_and_approves_the_loan(
    console_mesh: ConsoleMesh, browser: Browser
) -> None:
    refund = wait_for_gate(console_mesh, start(console_mesh, "support", REFUND_OVER_1000))
    loan_workflow = start(console_mesh, "loan", LOAN)
    loan = wait_for_gate(console_mesh, loan_workflow)
    context, page = new_page(browser)
    try:
        # The finance approver sees the refund and not the loan.
        log_in(page, console_mesh, "finance")
        expect(gate_article(page, refund)).to_be_visible(timeout=WAIT_MS)
        expect(gate_article(page, loan)).to_have_count(0)
        page.get_by_test_id("logout").click()
        expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
        expect(page.get_by_test_id("whoami")).to_have_count(0)

        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        log_in(page, console_mesh, "compliance")
        article = gate_article(page, loan)
        expect(article).to_be_visible(timeout=WAIT_MS)
        # Readable on a narrow screen: nothing wider than the phone, Approve in reach.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        approve = article.get_by_test_id("approve")
        approve.scroll_into_view_if_needed()
        box = approve.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        expect(gate_article(page, refund)).to_have_count(0)
        expect(article.get_by_test_id("gate-started-by")).to_contain_text("requester")
        # Keyboard only: to the Approve button and press it.
        article.get_by_test_id("approve").focus()
        page.keyboard.press("Enter")
        expect(article.get_by_test_id("gate-workflow-state")).to_have_text(
            "SUCCEEDED", timeout=WAIT_MS
        )
    finally:
        context.close()
    assert workflow(console_mesh, loan_workflow).state == WS.WORKFLOW_STATE_SUCCEEDED
    assert decided_in_audit(console_mesh, loan) == ("approved", "compliance")


def test_no_page_without_a_session_and_an_expired_one_is_sent_back_to_log_in(
    console_mesh: ConsoleMesh, browser: Browser
) -> None:
    context, page = new_page(browser)
    try:
        page.goto(console_mesh.url + "#/workflows")
        expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
        expect(page.get_by_test_id("whoami")).to_have_count(0)
        expect(page.get_by_test_id("workflows")).to_have_count(0)
        api = page.request.get(f"http://{console_mesh.gateway}/v1/workflows")
        assert api.status == 401

        # A wrong password: refused without saying which half was wrong, and on the record.
        page.locator("#user").fill("finance")
        page.locator("#password").fill("not-the-password")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_test_id("login-message")).to_contain_text("wrong user name or password")
        expect(page.get_by_test_id("whoami")).to_have_count(0)
        refused = audit_lines(console_mesh, "console/session")
        assert any("request_rejected" in line and "LOGIN_REFUSED" in line for line in refused)

        log_in(page, console_mesh, "finance")
        cookie = next(c for c in context.cookies() if c["name"] == "tessera_session")
        # Where page scripts cannot read it.
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""

        # The session now holds a real token of the issuer that lasts seconds.
        short = short_lived_token(console_mesh, "finance")
        context.add_cookies([{**cookie, "value": short}])
        expires = float(_claims(short)["exp"])
        time.sleep(max(0.0, expires - time.time()) + CLOCK_SKEW_S + 1)  # the clock is the event
        page.goto(console_mesh.url + "#/workflows")
        page.reload()
        expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
        expect(page.get_by_test_id("login-message")).to_contain_text("expired")
        expect(page.get_by_test_id("workflows")).to_have_count(0)
    finally:
        context.close()


def test_the_risk_workflows_fan_out_and_timed_out_branch_show_on_its_page(
    console_mesh: ConsoleMesh, browser: Browser
) -> None:
    context, page = new_page(browser)
    try:
        log_in(page, console_mesh, "requester")
        name = start(console_mesh, "risk", RISK)
        page.goto(f"{console_mesh.url}#/workflows/{name.split('/')[1]}")
        graph = page.get_by_test_id("plan-graph")
        expect(page.get_by_test_id("workflow-state")).to_have_text("SUCCEEDED", timeout=WAIT_MS)
        for branch in ("credit", "fraud", "churn"):  # the fan-out, joined by the aggregate
            expect(graph.locator(f'[data-edge="{branch}->aggregate"]')).to_have_count(1)
        expect(graph.locator('g[data-task="aggregate"]')).to_have_attribute(
            "data-state", "TASK_STATE_SUCCEEDED"
        )
        expect(graph.locator('g[data-task="churn"]')).to_have_attribute(
            "data-state", "TASK_STATE_FAILED"
        )
        timeline = page.get_by_test_id("timeline")
        expect(timeline.locator('li[data-kind="guardrail_tripped"]')).to_contain_text("churn")
        expect(page.get_by_test_id("guardrails")).to_contain_text("churn")
        expect(timeline.locator('li[data-kind="workflow_completed"]')).to_have_count(1)
        screenshot(page, "risk")
        page.goto(console_mesh.url + "#/workflows?template=risk")
        expect(page.locator(f'tr[data-workflow="{name.split("/")[1]}"]')).to_be_visible(
            timeout=WAIT_MS
        )
        screenshot(page, "workflows")
        page.goto(console_mesh.url + "#/agents")
        expect(page.locator('tr[data-agent="risk"]')).to_be_visible(timeout=WAIT_MS)
        screenshot(page, "agents")
        page.goto(console_mesh.url + "#/policies")  # the set that decided all of the above
        expect(page.get_by_test_id("policy-version")).not_to_have_text("—", timeout=WAIT_MS)
        expect(page.get_by_test_id("policy-coverage")).to_contain_text("every case passes")
        refunds_policy = page.locator('tr[data-policy="refund-needs-approval"]')
        expect(refunds_policy).to_have_attribute("data-status", "covered")
        screenshot(page, "policies")
    finally:
        context.close()
    final = workflow(console_mesh, name)
    assert final.state == WS.WORKFLOW_STATE_SUCCEEDED
    churn = next(t for t in final.tasks if t.task_id == "churn")
    assert churn.state == coordinator_pb2.TASK_STATE_FAILED


def short_lived_token(mesh: ConsoleMesh, user: str) -> str:
    """A genuine identity token of ``user`` from the mesh's issuer that expires in 3 s
    (a role made for this test with the local bootstrap's root token)."""
    root = (mesh.data_dir / "secrets" / "root-token").read_text().strip()
    state = json.loads((mesh.data_dir / "state.json").read_text())
    addr = next(c["address"] for c in state["components"] if c["name"] == "openbao")
    addr = addr if addr.startswith("http") else f"http://{addr}"
    admin = hvac.Client(url=addr, token=root)
    try:
        admin.write(
            "identity/oidc/role/human-short",
            key=SIGNING_KEY,
            ttl="3s",
            client_id="tessera",
            template='{"preferred_username": {{identity.entity.name}}, '
            '"groups": {{identity.entity.groups.names}}}',
        )
        admin.sys.create_or_update_policy(
            HUMAN_POLICY, 'path "identity/oidc/token/*" {\n  capabilities = ["read"]\n}\n'
        )
    finally:
        admin.adapter.close()
    return login(addr, user, mesh.password(user), role="human-short")


def _claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))
