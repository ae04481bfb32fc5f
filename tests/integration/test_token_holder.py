"""RELIABILITY.md I5, the tool proxy's half: a task token is useful only to the agent it
was issued to. Another agent that holds a copy (leaked, or read out of a task) presents it
with its own certificate: PERMISSION_DENIED TOKEN_NOT_CALLERS, the tool never runs, and
the refusal is an audit record naming the token's agent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.integration.test_governed_calls import (  # noqa: F401 (fixtures)
    REFUND,
    Bao,
    Mesh,
    assert_refused_and_audited,
    audit_records,
    bao,
    creds,
    governed_mesh,
    invoke,
    new_ids,
    refund_args,
    refused,
    task_token,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def mesh(nats_url: str, bao: Bao, creds: dict[str, Path]) -> AsyncIterator[Mesh]:  # noqa: F811
    async with governed_mesh(nats_url, bao, creds, name="holder") as running:
        yield running


async def test_another_agents_token_for_this_very_task_is_refused(mesh: Mesh) -> None:
    wf, task = new_ids()
    # Issued to triage for exactly this workflow, task and tool: only the holder is wrong.
    token = await task_token(mesh, wf, task, tools=[REFUND], agent="triage")
    details = await refused(
        invoke(mesh, token.token, wf, task, REFUND, refund_args(), key="k", caller="billing")
    )
    await assert_refused_and_audited(
        mesh, wf, details, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_NOT_CALLERS", "denied"
    )
    assert details.metadata["caller"] == "spiffe://tessera.local/agent/billing"
    records = await audit_records(mesh, wf)
    assert records[-1].details["agent"] == "triage"


async def test_the_holder_it_was_issued_to_goes_ahead(mesh: Mesh) -> None:
    wf, task = new_ids()
    token = await task_token(mesh, wf, task, tools=[REFUND], agent="triage")
    reply = await invoke(
        mesh, token.token, wf, task, REFUND, refund_args(), key="k", caller="triage"
    )
    assert reply.result["refund_id"]
