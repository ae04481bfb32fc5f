"""The built-in side-effecting tools look their own effects up in the outbox (real NATS):
a refund that was issued is found with the result its call returned, one that was not
is reported as not executed, and when the stream has discarded messages since the claim
the tool says it cannot tell rather than guess. billing.reverse_refund finds the refund
it undoes the same way: reversed once, nothing where none was made, an error when the
outbox cannot tell."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from services.tool_proxy.idempotency import Claim, IdempotencyStore, effect_id
from services.tool_proxy.tools import CallInfo, EffectLookup, EffectStatus, Tool, ToolError
from services.tool_proxy.tools.builtin import builtin_tools, effects_subject
from tessera.runtime.bus import Topology, connect, declare
from tessera.runtime.errors import Internal
from tessera.vault import ToolSecret

REFUND = "billing.issue_refund"
REVERSE = "billing.reverse_refund"
SECRET = ToolSecret(tool=REFUND, version=3, data={"api_key": "test-key"})
ARGS = {"customer_id": "c-1", "invoice_id": "inv-1", "amount": 10.0}


def call(workflow: str, key: str, tool: str = REFUND) -> CallInfo:
    return CallInfo(
        workflow_id=workflow,
        task_id="t-1",
        agent="billing",
        decision_id="d-1",
        idempotency_key=key,
        effect_id=effect_id(workflow, tool, key),
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


@pytest.fixture
async def reverse(nats_url: str, namespace: str) -> AsyncIterator[tuple[JetStreamContext, Tool]]:
    nc = await connect(nats_url, name="test-reverse-refund")
    js = nc.jetstream()
    topology = Topology(namespace)
    await declare(js, topology)
    tool = next(t for t in builtin_tools(js, topology) if t.spec.name == REVERSE)
    try:
        yield js, tool
    finally:
        await nc.close()


async def outbox_bodies(js: JetStreamContext, namespace: str) -> list[dict[str, object]]:
    topology = Topology(namespace)
    info = await js.stream_info(topology.events_stream)
    if not info.state.messages:
        return []
    bodies = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(topology.events_stream, seq)
        if msg.subject == effects_subject(topology) and msg.data:
            bodies.append(json.loads(msg.data))
    return bodies


async def test_a_refund_is_reversed_once_whatever_key_the_reversal_uses(
    outbox: tuple[JetStreamContext, Tool],
    reverse: tuple[JetStreamContext, Tool],
    namespace: str,
) -> None:
    js, refund = outbox
    _, tool = reverse
    claimed_at = time.time()
    issued = await refund.handler(ARGS, SECRET, call("wf-r", "refund/t-1"))
    await refund.handler(ARGS, SECRET, call("wf-r", "refund/t-2"))  # another refund

    reversing = call("wf-r", "reverse/t-1", REVERSE)
    args = {"refund_idempotency_key": "refund/t-1"}
    first = await tool.handler(args, SECRET, reversing)
    again = await tool.handler(args, SECRET, call("wf-r", "reverse/other", REVERSE))

    assert first["reversed"] is True
    assert first["refund_id"] == issued["refund_id"] and first["amount"] == 10.0
    assert first["refund_effect_id"] == effect_id("wf-r", REFUND, "refund/t-1")
    assert again == first  # the reversal already recorded: nothing moves twice
    reversals = [b for b in await outbox_bodies(js, namespace) if b["tool"] == REVERSE]
    assert [b["effect_id"] for b in reversals] == [reversing.effect_id]
    # The reversal finds its own effect like every side-effecting built-in.
    assert tool.lookup is not None
    assert await tool.lookup(reversing, claimed_at) == EffectLookup.executed(first)


async def test_no_refund_no_reversal(
    outbox: tuple[JetStreamContext, Tool],
    reverse: tuple[JetStreamContext, Tool],
    namespace: str,
) -> None:
    js, refund = outbox
    _, tool = reverse
    # A refund under that key, but in another workflow: not this workflow's to undo.
    await refund.handler(ARGS, SECRET, call("wf-other", "refund/t-1"))
    args = {"refund_idempotency_key": "refund/t-1"}
    answer = await tool.handler(args, SECRET, call("wf-n", "reverse/t-1", REVERSE))
    assert answer == {"reversed": False, "reason": "no refund was made", "credential_version": 3}
    assert [b["tool"] for b in await outbox_bodies(js, namespace)] == [REFUND]


async def test_a_reversal_that_cannot_tell_fails_and_records_nothing(
    reverse: tuple[JetStreamContext, Tool], namespace: str
) -> None:
    js, tool = reverse
    refund = next(t for t in builtin_tools(js, Topology(namespace)) if t.spec.name == REFUND)
    stream = Topology(namespace).events_stream
    config = (await js.stream_info(stream)).config
    config.max_msgs = 2  # an operator put a limit on the events stream
    await js.update_stream(config)
    for n in range(3):  # the oldest is discarded: it may have been the refund
        await refund.handler(ARGS, SECRET, call("wf-u", f"refund/other-{n}"))

    args = {"refund_idempotency_key": "refund/t-1"}
    with pytest.raises(Internal) as raised:
        await tool.handler(args, SECRET, call("wf-u", "reverse/t-1", REVERSE))
    assert raised.value.reason == "REFUND_OUTCOME_UNKNOWN"
    assert all(b["tool"] == REFUND for b in await outbox_bodies(js, namespace))
    # A refund still in the outbox is found and reversed all the same.
    found = await tool.handler(
        {"refund_idempotency_key": "refund/other-2"}, SECRET, call("wf-u", "rv", REVERSE)
    )
    assert found["reversed"] is True


async def test_a_reversal_waits_for_a_refund_still_being_made(
    outbox: tuple[JetStreamContext, Tool], namespace: str
) -> None:
    """A workflow cancelled while its refund call runs: the reversal must not conclude
    "no refund was made" from an outbox the refund has not reached yet. It is told to
    retry (UNAVAILABLE for its caller, nothing recorded) until the refund's claim settles,
    then it reverses the refund."""
    js, refund = outbox
    topology = Topology(namespace)
    store = IdempotencyStore(await js.key_value(topology.idempotency_bucket), lease_s=30.0)
    tool = next(
        t for t in builtin_tools(js, topology, in_flight=store.in_flight) if t.spec.name == REVERSE
    )
    making = call("wf-race", "refund/t-1")
    claim = await store.begin(
        making.effect_id, tool=REFUND, arguments_digest="d", decision_id="d-1"
    )
    assert isinstance(claim, Claim)  # the refund's call is under way
    args = {"refund_idempotency_key": "refund/t-1"}
    with pytest.raises(ToolError) as wait:
        await tool.handler(args, SECRET, call("wf-race", "reverse/t-1", REVERSE))
    assert wait.value.reason == "EFFECT_IN_FLIGHT"
    assert wait.value.retry_after_s is not None and 0 < wait.value.retry_after_s <= 1.0
    assert await outbox_bodies(js, namespace) == []  # nothing reversed, nothing recorded

    issued = await refund.handler(ARGS, SECRET, making)  # the refund lands...
    await store.finish(claim, tool=REFUND, arguments_digest="d", result=issued, decision_id="d-1")
    reversed_ = await tool.handler(args, SECRET, call("wf-race", "reverse/t-1", REVERSE))
    assert reversed_["reversed"] is True and reversed_["refund_id"] == issued["refund_id"]
