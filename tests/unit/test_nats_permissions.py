"""The NATS permission table (tessera/runtime/nats_permissions.py) read as a reviewer
would: who may read which stream, bucket and inbox. No server here; the real refusals
are tried in tests/integration/test_nats_permissions.py."""

from __future__ import annotations

import pytest

from tessera.identity.nats_tls import inbox_prefix
from tessera.runtime.bus import Topology
from tessera.runtime.nats_permissions import NO_ACCESS, permissions, streams_used

T = Topology("tessera")
SERVICES = ("coordinator", "tool-proxy", "policy", "registry", "planner", "gateway-control-plane")


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more trailing tokens."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


def _may_publish(identity: str, subject: str) -> bool:
    perms = permissions(identity, T)
    denied = any(_matches(p, subject) for p in perms.publish_deny)
    return not denied and any(_matches(p, subject) for p in perms.publish)


def _may_subscribe(identity: str, subject: str) -> bool:
    return any(_matches(p, subject) for p in permissions(identity, T).subscribe)


def _reads_stream(identity: str, stream: str) -> bool:
    """Any way of reading ``stream``'s messages: a consumer, a message get, a direct get."""
    return any(
        _may_publish(identity, request)
        for request in (
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.c",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.c",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.c",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
        )
    )


def test_matcher_follows_nats_wildcards() -> None:
    assert _matches("a.*.c", "a.b.c") and not _matches("a.*.c", "a.b.d")
    assert _matches("a.>", "a.b.c") and not _matches("a.>", "a")


@pytest.mark.parametrize(
    ("identity", "stream", "allowed"),
    [
        ("coordinator", T.wf_events_stream, True),
        ("coordinator", T.work_stream, True),
        ("coordinator", f"KV_{T.workflows_bucket}", True),
        ("coordinator", f"KV_{T.registry_bucket}", True),
        ("coordinator", f"KV_{T.approvals_bucket}", False),
        ("coordinator", f"KV_{T.idempotency_bucket}", False),
        ("coordinator", T.audit_stream, False),
        ("tool-proxy", f"KV_{T.idempotency_bucket}", True),
        ("tool-proxy", f"KV_{T.approvals_bucket}", True),
        ("tool-proxy", T.events_stream, True),
        ("tool-proxy", f"KV_{T.workflows_bucket}", False),
        ("tool-proxy", T.wf_events_stream, False),
        ("tool-proxy", T.work_stream, False),
        ("tool-proxy", T.audit_stream, False),
        ("planner", f"KV_{T.registry_bucket}", True),
        ("planner", f"KV_{T.workflows_bucket}", False),
        ("planner", T.events_stream, False),
        ("gateway-control-plane", f"KV_{T.registry_bucket}", True),
        ("gateway-control-plane", T.audit_stream, False),
        ("registry", f"KV_{T.registry_bucket}", True),
        ("registry", f"KV_{T.workflows_bucket}", False),
        ("policy", T.events_stream, False),
        ("policy", T.audit_stream, False),
        ("operator", T.audit_stream, True),
    ],
)
def test_each_identity_reads_only_the_streams_it_needs(
    identity: str, stream: str, allowed: bool
) -> None:
    assert _reads_stream(identity, stream) is allowed


@pytest.mark.parametrize("identity", ["coordinator", "tool-proxy", "policy", "registry"])
def test_an_audit_writer_reads_its_own_chain_heads_only(identity: str) -> None:
    own = T.audit_chain_subject(f"{identity}-1", owner=identity)
    other = T.audit_chain_subject("x-1", owner="registry" if identity != "registry" else "policy")
    assert _may_publish(identity, f"$JS.API.DIRECT.GET.{T.audit_stream}.{own}")
    assert not _may_publish(identity, f"$JS.API.DIRECT.GET.{T.audit_stream}.{other}")
    assert not _may_publish(identity, f"$JS.API.DIRECT.GET.{T.audit_stream}")


@pytest.mark.parametrize("identity", SERVICES)
def test_replies_only_on_its_own_inbox_prefix(identity: str) -> None:
    mine = f"{inbox_prefix(identity)}.abc.1"
    assert _may_subscribe(identity, mine)
    for other in SERVICES:
        if other != identity:
            assert not _may_subscribe(identity, f"{inbox_prefix(other)}.abc.1")
    assert not _may_subscribe(identity, "_INBOX.abc.1")
    assert not _may_subscribe(identity, ">")


@pytest.mark.parametrize("identity", SERVICES)
def test_no_workload_changes_a_streams_configuration(identity: str) -> None:
    """Creating the mesh's streams at start is allowed (idempotent); updating any (adding a
    source, a mirror, a republish or new limits) is the operator's."""
    for stream in (T.audit_stream, T.wf_events_stream, f"KV_{T.workflows_bucket}"):
        assert _may_publish(identity, f"$JS.API.STREAM.CREATE.{stream}")
        assert not _may_publish(identity, f"$JS.API.STREAM.UPDATE.{stream}")
        assert not _may_publish(identity, f"$JS.API.STREAM.DELETE.{stream}")
        # Purging: only the coordinator, only the histories it owns (retention).
        owner_purges = identity == "coordinator" and stream == T.wf_events_stream
        assert _may_publish(identity, f"$JS.API.STREAM.PURGE.{stream}") == owner_purges
    assert not _may_publish(identity, "$JS.API.STREAM.CREATE.MIRROR_OF_AUDIT")
    assert not _may_publish(identity, "$JS.API.STREAM.LIST")


@pytest.mark.parametrize("identity", SERVICES)
def test_start_up_waits_only_for_streams_whose_info_it_may_ask(identity: str) -> None:
    for stream in streams_used(identity, T):
        assert _may_publish(identity, f"$JS.API.STREAM.INFO.{stream}"), stream


def test_core_subscriptions_are_the_tool_proxys_two_announcements() -> None:
    assert _may_subscribe("tool-proxy", T.events_subject("token.revoked"))
    assert _may_subscribe("tool-proxy", T.policy_reload_subject)
    assert not _may_subscribe("tool-proxy", T.events_subject("tool.effects"))
    assert not _may_subscribe("coordinator", T.events_subject("token.revoked"))
    assert not _may_subscribe("planner", T.registry_bucket)


def test_agents_have_no_nats_user() -> None:
    assert permissions("agent-billing", T) == NO_ACCESS
