"""Who may publish and subscribe to what on NATS: the mesh's one table, keyed by
workload identity, rendered into nats-server's ``authorization`` block (users are the
identities' certificate DNS names, mapped by ``verify_and_map``) and tested by
tests/integration/test_nats_permissions.py, which tries every forbidden write.

Writes are least privilege: each identity publishes only to the subjects and KV buckets
it owns (the registry service: the agent registry; the coordinator: workflow state, budgets and
events; each audit writer: its own chains). Agents have no NATS user at all: they
register over gRPC (RegistryService) and talk to the mesh only through gRPC. Destroying
data (deleting or purging a stream, or a message of one) is the operator's alone. Reads
stay open to every service identity for now (JetStream's consumer API), which the table
says plainly rather than pretends otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tessera.identity.names import WorkloadName
from tessera.runtime.bus import Topology

__all__ = ["NO_ACCESS", "OPERATOR", "Permissions", "permissions", "render_authorization"]

OPERATOR = "operator"

# What every JetStream client needs: account info, stream info, consumers (create, fetch,
# ack, flow control), KV reads (direct get, message get), and the replies to its requests.
_JS_CLIENT = (
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.>",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.CONSUMER.>",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.STREAM.MSG.GET.>",
    "$JS.ACK.>",
    "$JS.FC.>",
)
# Declaring streams and buckets at start (services only; `tessera up` declares first).
_JS_DECLARE = ("$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>")
# Destroying records: nobody but the operator.
_JS_DESTROY = (
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
)
_INBOX = "_INBOX.>"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = _JS_DESTROY


NO_ACCESS = Permissions(publish=(), subscribe=())
"""Identities with no business on NATS (agents): they get no NATS user at all."""


def _kv(bucket: str) -> str:
    return f"$KV.{bucket}.>"


def permissions(identity: str, topology: Topology) -> Permissions:
    """The NATS permissions of one identity of vault/identities.yaml."""
    t = topology
    if identity == OPERATOR:
        return Permissions(publish=(">",), subscribe=(">",), publish_deny=())
    if WorkloadName.of(identity).kind == "agent":
        return NO_ACCESS  # agents talk gRPC only: registry, tasks and tools (no NATS user)
    owned: dict[str, tuple[str, ...]] = {
        "coordinator": (
            t.wf_events_subjects,
            t.work_subjects,
            t.events_subject("token.revoked"),
            _kv(t.workflows_bucket),
            _kv(t.blackboard_bucket),
            _kv(t.budgets_bucket),
        ),
        "tool-proxy": (
            _kv(t.idempotency_bucket),
            _kv(t.approvals_bucket),
            t.events_subject("tool.effects"),
        ),
        "policy": (t.policy_reload_subject,),
        "registry": (_kv(t.registry_bucket),),
        "planner": (),
        "gateway-control-plane": (),
    }
    subscribe: dict[str, tuple[str, ...]] = {
        "tool-proxy": (t.events_subject("token.revoked"), t.policy_reload_subject),
    }
    if identity not in owned:
        return NO_ACCESS
    audit = (t.audit_owner_subjects(identity),)
    return Permissions(
        publish=(*_JS_CLIENT, *_JS_DECLARE, *owned[identity], *audit),
        subscribe=(_INBOX, *subscribe.get(identity, ())),
    )


def _quoted(subjects: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"


def render_authorization(identities: Iterable[str], topology: Topology) -> str:
    """nats-server's ``authorization { users: [...] }`` for ``identities``: each user is
    the DNS name its certificate carries (``verify_and_map``)."""
    users = []
    for identity in sorted(set(identities)):
        perms = permissions(identity, topology)
        if perms == NO_ACCESS:
            continue  # no user: its certificate cannot even connect
        user = WorkloadName.of(identity).dns_name
        publish = f"allow: {_quoted(perms.publish)}, deny: {_quoted(perms.publish_deny)}"
        users.append(
            f'    {{ user: "{user}", permissions: {{\n'
            f"        publish: {{ {publish} }}\n"
            f"        subscribe: {{ allow: {_quoted(perms.subscribe)} }}\n"
            "    } }"
        )
    return "authorization {\n  users: [\n" + ",\n".join(users) + "\n  ]\n}\n"
