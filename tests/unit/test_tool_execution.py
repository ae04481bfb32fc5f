"""What a backend's refusal becomes for the caller: a ToolError promises nothing happened,
so the claim is released; one that says "not yet" (``retry_after_s``) is a transient
UNAVAILABLE with that RetryInfo, any other a FAILED_PRECONDITION."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from services.tool_proxy.execution import Execution, execute
from services.tool_proxy.idempotency import Claim
from services.tool_proxy.tools import CallInfo, SideEffect, Tool, ToolError, ToolSpec
from tessera.runtime.errors import FailedPrecondition, Unavailable
from tessera.vault import ToolSecret


class Store:
    """Stands in for IdempotencyStore: the one call execute() makes on a refused effect."""

    def __init__(self) -> None:
        self.released: list[str] = []

    async def release(self, claim: Claim) -> None:
        self.released.append(claim.effect_id)


def refusing(error: ToolError) -> Tool:
    async def handler(
        args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        raise error

    spec = ToolSpec(
        name="test.effect",
        description="refuses",
        input_schema={"type": "object"},
        side_effect=SideEffect.EXTERNAL_ACTION,
        category="test",
    )
    return Tool(spec, handler)


def run(tool: Tool) -> Execution:
    info = CallInfo(
        workflow_id="wf",
        task_id="t",
        agent="a",
        decision_id="d",
        idempotency_key="k",
        effect_id="e-1",
    )
    return Execution(
        tool=tool,
        arguments={},
        secret=None,
        info=info,
        claim=Claim("e-1", 1),
        arguments_digest="x",
        timeout_s=5.0,
    )


@pytest.mark.parametrize(
    ("error", "status", "retry_after_s"),
    [
        (ToolError("later", reason="EFFECT_IN_FLIGHT", retry_after_s=0.5), Unavailable, 0.5),
        (ToolError("no", reason="INVOICE_NOT_FOUND"), FailedPrecondition, None),
    ],
)
async def test_a_refusal_releases_the_claim_and_says_whether_to_retry(
    error: ToolError, status: type[Exception], retry_after_s: float | None
) -> None:
    store = Store()
    with pytest.raises(status) as raised:
        await execute(run(refusing(error)), store=store, max_result_bytes=1024)  # type: ignore[arg-type]
    assert raised.value.reason == error.reason  # type: ignore[attr-defined]
    assert getattr(raised.value, "retry_after_s", None) == retry_after_s
    assert store.released == ["e-1"]  # nothing happened: a retry may run it
