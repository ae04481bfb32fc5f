"""Who may publish and subscribe to what on NATS: the mesh's one table, keyed by
workload identity, rendered into nats-server's ``authorization`` block (users are the
identities' certificate DNS names, mapped by ``verify_and_map``) and tested by
tests/integration/test_nats_permissions.py, which tries every forbidden write and read.

Writes are least privilege: each identity publishes only to the subjects and KV buckets
it owns (the registry service: the agent registry; the coordinator: workflow state, budgets and
events; each audit writer: its own chains). Agents have no NATS user at all: they
register over gRPC (RegistryService) and talk to the mesh only through gRPC. Destroying
data (deleting or purging a stream, or a message of one) and changing a stream's
configuration are the operator's alone.

Reads are least privilege too (:func:`_reads`): each identity reads only the streams and
buckets it needs, through the JetStream API subjects that name the stream (consumers,
message gets, stream info, acks and flow control of its consumers); the audit stream only
its own chains' heads (a direct get by subject); replies only under its own inbox prefix
(:func:`tessera.identity.nats_tls.inbox_prefix`, which every client of the mesh connects
with), so no identity overhears another's answers or deliveries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tessera.identity.names import WorkloadName
from tessera.identity.nats_tls import inbox_prefix
from tessera.runtime.bus import Topology

__all__ = [
    "NO_ACCESS",
    "OPERATOR",
    "Permissions",
    "permissions",
    "render_authorization",
    "streams_used",
]

OPERATOR = "operator"

_API = "$JS.API"
# What every JetStream client may ask without naming a stream: the account's limits, and
# which stream holds a subject (names only; nats-py's subscribe looks a stream up so).
_JS_ACCOUNT = (f"{_API}.INFO", f"{_API}.STREAM.NAMES")
# Destroying records: nobody but the operator.
_JS_DESTROY = (
    f"{_API}.STREAM.DELETE.>",
    f"{_API}.STREAM.PURGE.>",
    f"{_API}.STREAM.MSG.DELETE.>",
)


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = _JS_DESTROY


NO_ACCESS = Permissions(publish=(), subscribe=())
"""Identities with no business on NATS (agents): they get no NATS user at all."""


def _kv(bucket: str) -> str:
    return f"$KV.{bucket}.>"


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _declarable(t: Topology) -> tuple[str, ...]:
    """Every stream a workload may create at start (none of them exists yet the first
    time; `tessera up` declares first as the operator). Never an update: a changed
    configuration (sources, mirrors, republish, limits) could copy or destroy another
    identity's records, so it is the operator's."""
    names = [s.name for s in t.streams()] + [_kv_stream(b.bucket) for b in t.buckets()]
    return tuple(f"{_API}.STREAM.CREATE.{name}" for name in names)


def _stream_reads(stream: str) -> tuple[str, ...]:
    """Reading ``stream`` whole: its info, consumers on it (create, durable create, info,
    next, delete), message gets (direct and through the API), and the acks and flow
    control replies of its consumers (``$JS.ACK`` in both the v1 and the domain form)."""
    return (
        f"{_API}.STREAM.INFO.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}.>",
        f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"{_API}.CONSUMER.INFO.{stream}.>",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.>",
        f"{_API}.CONSUMER.DELETE.{stream}.>",
        f"{_API}.DIRECT.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}.>",
        f"{_API}.STREAM.MSG.GET.{stream}",
        f"$JS.ACK.{stream}.>",
        f"$JS.ACK.*.*.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


@dataclass(frozen=True)
class _ReadScope:
    streams: tuple[str, ...]
    """Streams (a KV bucket: its ``KV_`` stream) the identity reads whole."""
    subjects: tuple[str, ...] = ()
    """Core NATS subscriptions beyond its inbox."""
    audit_chains: bool = False
    """Whether it writes audit records, so reads its own chains' heads."""


def _read_scopes(t: Topology) -> dict[str, _ReadScope]:
    registry = _kv_stream(t.registry_bucket)
    frozen = _kv_stream(t.frozen_bucket)
    policy = _kv_stream(t.policy_bucket)
    return {
        # Workflow state and events, the work queue, and who to dispatch to.
        "coordinator": _ReadScope(
            (
                t.wf_events_stream,
                t.work_stream,
                _kv_stream(t.workflows_bucket),
                _kv_stream(t.blackboard_bucket),
                _kv_stream(t.budgets_bucket),
                registry,
                frozen,  # frozen agents: their running attempts' tokens are revoked
                policy,  # the distributed policy set (decisions on workflow actions)
            ),
            subjects=(t.wf_events_subjects,),  # WatchWorkflow follows histories live
            audit_chains=True,
        ),
        # Its buckets and its effects outbox (on the events stream, whose other events,
        # token revocations and policy reloads, it follows anyway), and the coordinator's
        # budget ledger (read only: the live budget_remaining of each decision).
        "tool-proxy": _ReadScope(
            (
                t.events_stream,
                _kv_stream(t.idempotency_bucket),
                _kv_stream(t.approvals_bucket),
                _kv_stream(t.budgets_bucket),
                frozen,  # frozen agents: their calls are refused by policy
                policy,  # the distributed policy set (policy_mode = "distributed")
            ),
            subjects=(t.events_subject("token.revoked"), t.policy_reload_subject),
            audit_chains=True,
        ),
        "policy": _ReadScope((policy,), audit_chains=True),
        # Its buckets, and the distributed policy set (decisions on freezes).
        "registry": _ReadScope((registry, frozen, policy), audit_chains=True),
        # Readers of the registry: capabilities to plan with, endpoints to route to.
        "planner": _ReadScope((registry,)),
        # The audit trail read back for people (services/audit_reader): every chain (a
        # chain verifies from its first record), and the policy set its reads are decided
        # with. It writes only its own chain (refused reads).
        "audit-reader": _ReadScope((t.audit_stream, policy), audit_chains=True),
        # The console reads nothing; it writes its own chain (refused logins).
        "console": _ReadScope((), audit_chains=True),
        "gateway-control-plane": _ReadScope((registry,)),
    }


def _written_streams(identity: str, t: Topology) -> tuple[str, ...]:
    """The streams ``identity`` publishes to (its ``_owned`` subjects' streams)."""
    written: dict[str, tuple[str, ...]] = {
        "coordinator": (t.wf_events_stream, t.work_stream, t.events_stream),
        "tool-proxy": (t.events_stream,),
        "policy": (t.events_stream,),
    }
    audit = (t.audit_stream,) if _read_scopes(t)[identity].audit_chains else ()
    return (*written.get(identity, ()), *audit)


def _owned(identity: str, t: Topology) -> tuple[str, ...]:
    """The subjects ``identity`` may publish to (beyond the JetStream API)."""
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
        "policy": (t.policy_reload_subject, _kv(t.policy_bucket)),
        "registry": (_kv(t.registry_bucket), _kv(t.frozen_bucket)),
    }
    return (*owned.get(identity, ()), t.audit_owner_subjects(identity))


def streams_used(identity: str, topology: Topology) -> frozenset[str]:
    """The streams (KV buckets as their ``KV_`` streams) ``identity`` reads or writes,
    i.e. whose info it may ask: what its start-up waits for (a leader in a cluster)."""
    if identity == OPERATOR:
        return frozenset(
            [s.name for s in topology.streams()]
            + [_kv_stream(b.bucket) for b in topology.buckets()]
        )
    scope = _read_scopes(topology).get(identity)
    if scope is None:
        return frozenset()
    return frozenset((*scope.streams, *_written_streams(identity, topology)))


def _reads(identity: str, t: Topology) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What ``identity`` may read: the JetStream API requests it may publish (scoped to
    the streams of its read scope, its own audit chains' heads, and the info of every
    stream it writes) and the subjects it may subscribe to (its inbox prefix, and its
    core subscriptions)."""
    scope = _read_scopes(t)[identity]
    requests: list[str] = list(_JS_ACCOUNT)
    for stream in scope.streams:
        requests.extend(_stream_reads(stream))
    for stream in sorted(set(_written_streams(identity, t)) - set(scope.streams)):
        requests.append(f"{_API}.STREAM.INFO.{stream}")  # leader and limits, no message
    if scope.audit_chains:
        # Its chains' heads only: a direct get by subject names the subject it reads.
        requests.append(f"{_API}.DIRECT.GET.{t.audit_stream}.{t.audit_owner_subjects(identity)}")
    subscribe = (f"{inbox_prefix(identity)}.>", *scope.subjects)
    return tuple(requests), subscribe


def permissions(identity: str, topology: Topology) -> Permissions:
    """The NATS permissions of one identity of vault/identities.yaml."""
    t = topology
    if identity == OPERATOR:
        return Permissions(publish=(">",), subscribe=(">",), publish_deny=())
    if WorkloadName.of(identity).kind == "agent":
        return NO_ACCESS  # agents talk gRPC only: registry, tasks and tools (no NATS user)
    if identity not in _read_scopes(t):
        return NO_ACCESS
    requests, subscribe = _reads(identity, t)
    if identity == "coordinator":
        # Retention: the owner of the workflow histories removes a workflow's history
        # (a purge by subject, services/coordinator/retention.py) and nothing else.
        return Permissions(
            publish=(
                *requests,
                *_declarable(t),
                *_owned(identity, t),
                f"{_API}.STREAM.PURGE.{t.wf_events_stream}",
            ),
            subscribe=subscribe,
            publish_deny=_destroy_except(t, t.wf_events_stream),
        )
    return Permissions(
        publish=(*requests, *_declarable(t), *_owned(identity, t)),
        subscribe=subscribe,
    )


def _destroy_except(t: Topology, purged: str) -> tuple[str, ...]:
    """:data:`_JS_DESTROY` but for purging ``purged`` (NATS has no exceptions to a
    deny, so every other stream is named)."""
    others = [s.name for s in t.streams() if s.name != purged]
    others += [_kv_stream(b.bucket) for b in t.buckets()]
    return (
        f"{_API}.STREAM.DELETE.>",
        f"{_API}.STREAM.MSG.DELETE.>",
        *(f"{_API}.STREAM.PURGE.{name}" for name in others),
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
