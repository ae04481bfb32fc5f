"""The built-in side-effecting tools look their own effects up in the outbox (real NATS):
a refund that was issued is found with the result its call returned, one that was not
is reported as not executed, and when the stream has discarded messages since the claim
the tool says it cannot tell rather than guess."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from services.tool_proxy.idempotency import effect_id
from services.tool_proxy.tools import CallInfo, EffectLookup, EffectStatus, Tool
from services.tool_proxy.tools.builtin import builtin_tools
from tessera.runtime.bus import Topology, connect, declare
from tessera.vault import ToolSecret

REFUND = "billing.issue_refund"
SECRET = ToolSecret(tool=REFUND, version=3, data={"api_key": "test-key"})
ARGS = {"customer_id": "c-1", "invoice_id": "inv-1", "amount": 10.0}


def call(workflow: str, key: str) -> CallInfo:
    return CallInfo(
        workflow_id=workflow,
        task_id="t-1",
        agent="billing",
        decision_id="d-1",
        idempotency_key=key,
        effect_id=effect_id(workflow, REFUND, key),
    )


@pytest.fixture
async def outbox(nats_url: str, namespace: str) -> AsyncIterator[tuple[JetStreamContext, Tool]]:
    nc = await connect(nats_url, name="test-outbox-lookup")
    js = nc.jetstream()
    topology = Topology(namespace)
    await declare(js, topology)
    refund = next(t for t in builtin_tools(js, topology) if t.spec.name == REFUND)
    assert refund.lookup is not None
    try:
        yield js, refund
    finally:
        await nc.close()


async def test_an_issued_refund_is_found_with_its_result(
    outbox: tuple[JetStreamContext, Tool],
) -> None:
    _, refund = outbox
    assert refund.lookup is not None
    claimed_at = time.time()
    issued = call("wf-1", "k-1")
    result = await refund.handler(ARGS, SECRET, issued)
    await refund.handler(ARGS, SECRET, call("wf-1", "k-other"))  # another refund after it

    found = await refund.lookup(issued, claimed_at)
    assert found == EffectLookup.executed(result)
    never = await refund.lookup(call("wf-1", "k-never"), claimed_at)
    assert never.status is EffectStatus.NOT_EXECUTED


async def test_a_lookup_cannot_tell_once_the_stream_discarded_messages_since_the_claim(
    outbox: tuple[JetStreamContext, Tool], namespace: str
) -> None:
    js, refund = outbox
    assert refund.lookup is not None
    stream = Topology(namespace).events_stream
    config = (await js.stream_info(stream)).config
    config.max_msgs = 2  # an operator put a limit on the events stream
    await js.update_stream(config)
    claimed_at = time.time()
    for n in range(4):  # the oldest two are discarded
        await refund.handler(ARGS, SECRET, call("wf-2", f"k-{n}"))

    answer = await refund.lookup(call("wf-2", "k-never"), claimed_at)
    assert answer.status is EffectStatus.UNKNOWN
    assert (await refund.lookup(call("wf-2", "k-3"), claimed_at)).status is EffectStatus.EXECUTED
