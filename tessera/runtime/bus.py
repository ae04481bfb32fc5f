"""NATS JetStream helpers: connection, the one place that names streams/buckets, declare.

Every stream, subject and KV bucket name comes from :class:`Topology`, prefixed with the
namespace so parallel tests (or tenants) never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TypeVar

import structlog
from google.protobuf.message import Message
from nats.aio.client import DEFAULT_INBOX_PREFIX, Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from tessera.runtime.startup import STARTUP_TIMEOUT_S, NotReadyYet, until_ready
from tessera.runtime.telemetry import inject_headers

__all__ = [
    "DUPLICATE_WINDOW_S",
    "KvSpec",
    "StreamSpec",
    "Topology",
    "close",
    "connect",
    "declare",
    "msg_id_headers",
]

log = structlog.get_logger(__name__)

DUPLICATE_WINDOW_S = 120.0
_STREAM_NAME_IN_USE = 10058  # JetStream: stream name already in use with a different config
_DEFAULT_NATS_PORT = 4222
DECLARE_ATTEMPT_S = 2.0
"""One declaration (or leader check) unanswered this long is asked again: a forming
cluster can drop a request, which would otherwise cost the API timeout (5 s) each time."""


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout_s: float = 2.0,
    reconnect_wait_s: float = 1.0,
    initial_timeout_s: float | None = STARTUP_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
    tls_hostname: str | None = None,
    inbox_prefix: str | None = None,
) -> Client:
    """Connect to NATS (``url`` may list several servers, comma-separated).

    The first connection waits, with capped exponential backoff and jitter (see
    :func:`tessera.runtime.startup.until_ready`), until one of the servers accepts
    connections, then connects; all within ``initial_timeout_s`` (``None``: wait forever),
    else ``TimeoutError``. Once connected, the client reconnects by itself forever after
    losing its server, waiting ``reconnect_wait_s`` between attempts; every attempt gives
    up after ``connect_timeout_s``. Connection events are logged.

    ``tls``: connect with TLS, presenting the context's certificate (a mesh with NATS
    authentication maps it to this identity's permissions); ``tls_hostname`` is the name
    the server's certificate must carry. ``inbox_prefix``: where replies and push
    deliveries arrive (a mesh with NATS permissions lets each identity subscribe to its
    own prefix only, see :func:`tessera.identity.nats_tls.inbox_prefix`).
    """

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", client=name, error=repr(exc))

    async def on_disconnected() -> None:
        log.warning("nats_disconnected", client=name)

    async def on_reconnected() -> None:
        log.info("nats_reconnected", client=name, server=_server(nc))

    async def on_closed() -> None:
        log.info("nats_closed", client=name)

    servers = [s.strip() for s in url.split(",") if s.strip()]
    loop = asyncio.get_running_loop()
    give_up = None if initial_timeout_s is None else loop.time() + initial_timeout_s
    unreachable = f"NATS {', '.join(servers)} not reachable within {initial_timeout_s}s"
    try:
        await until_ready(
            functools.partial(_any_accepts, servers, connect_timeout_s),
            what="nats connect",
            within_s=initial_timeout_s,
        )
    except (TimeoutError, OSError) as exc:
        raise TimeoutError(unreachable) from exc
    nc = Client()
    try:
        async with asyncio.timeout_at(give_up):
            await nc.connect(
                servers=servers,
                name=name,
                connect_timeout=connect_timeout_s,  # type: ignore[arg-type]
                reconnect_time_wait=reconnect_wait_s,  # type: ignore[arg-type]
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                tls=tls,  # type: ignore[arg-type]
                tls_hostname=tls_hostname,  # type: ignore[arg-type]
                inbox_prefix=inbox_prefix or DEFAULT_INBOX_PREFIX,
                reconnected_cb=on_reconnected,
                closed_cb=on_closed,
            )
    except TimeoutError:
        await nc.close()
        raise TimeoutError(unreachable) from None
    log.info("nats_connected", client=name, server=_server(nc))
    return nc


async def _any_accepts(servers: list[str], timeout_s: float) -> None:
    """Return once one of ``servers`` accepts a TCP connection (closed again at once);
    ``ConnectionError`` if none does."""
    last: BaseException | None = None
    for server in servers:
        parsed = urllib.parse.urlsplit(server if "://" in server else f"nats://{server}")
        try:
            async with asyncio.timeout(timeout_s):
                _reader, writer = await asyncio.open_connection(
                    parsed.hostname or "127.0.0.1", parsed.port or _DEFAULT_NATS_PORT
                )
        except (OSError, TimeoutError, ValueError) as exc:
            last = exc
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise ConnectionError(f"no NATS server accepts connections ({last!r})")


def _server(nc: Client) -> str:
    url = nc.connected_url
    return f"{url.hostname}:{url.port}" if url is not None else ""


def _stream_token(namespace: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", namespace).upper()


def _subject_token(namespace: str) -> str:
    return namespace.lower()


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: api.RetentionPolicy = api.RetentionPolicy.LIMITS
    deny_delete: bool = False
    """Refuse deleting a message (the audit stream: an append-only record)."""
    deny_purge: bool = False
    """Refuse purging the stream."""
    allow_direct: bool = False
    """Answer direct gets (``$JS.API.DIRECT.GET.<stream>.<subject>``): the audit stream,
    whose writers may read their own chains' heads only, which a direct get by subject
    lets NATS permissions scope (a message get names no subject), and the workflow
    histories, read in batches."""
    max_msgs: int = 10_000_000
    """How many messages it holds; a full stream refuses writes (discard NEW: nothing is
    dropped silently, the writer fails closed). With ``max_msg_size`` it bounds the
    stream's size without reserving it (a byte limit reserves storage up front; bound
    bytes per account instead, docs/limits.md)."""
    max_msg_size: int = 1 << 20
    """The largest message it takes (NATS's default max_payload)."""
    max_age_s: float = 0.0
    """How long a message is kept (0: until removed by its owner)."""
    discard: api.DiscardPolicy = api.DiscardPolicy.NEW
    """What a full stream does: refuse the write (NEW, the default), or drop its oldest
    messages (OLD: only for a stream whose readers tell a discarded message apart)."""


@dataclass(frozen=True)
class KvSpec:
    bucket: str
    ttl_s: float | None = None
    history: int = 1
    max_value_size: int = 1 << 20
    """The largest value it takes (NATS's default max_payload)."""


@dataclass(frozen=True)
class Topology:
    """Every JetStream name Tessera uses, derived from ``namespace``.

    Stream names use the upper-cased namespace (non-alphanumerics → ``_``); subjects and
    buckets use it lower-cased, so keep namespaces to letters, digits, ``-`` and ``_``.
    """

    namespace: str = "tessera"
    registry_ttl_s: float = 15.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.namespace):
            raise ValueError(f"namespace {self.namespace!r}: use letters, digits, '-' and '_' only")

    @property
    def _ns(self) -> str:
        return _subject_token(self.namespace)

    @property
    def _ns_upper(self) -> str:
        return _stream_token(self.namespace)

    # workflow histories: two subjects per workflow, its first entry on `.start` (the
    # subject a listing pages over, in creation order) and the rest on `.events`
    @property
    def wf_events_stream(self) -> str:
        return f"{self._ns_upper}_WF_EVENTS"

    @property
    def wf_events_subjects(self) -> str:
        """Every workflow's history (the stream's subject filter)."""
        return f"{self._ns}.wf.*.*"

    @property
    def wf_starts_subjects(self) -> str:
        """The first entry of every workflow."""
        return f"{self._ns}.wf.*.start"

    def wf_start_subject(self, wf_id: str) -> str:
        return f"{self._ns}.wf.{_token(wf_id)}.start"

    def wf_events_subject(self, wf_id: str) -> str:
        return f"{self._ns}.wf.{_token(wf_id)}.events"

    def wf_history_subjects(self, wf_id: str) -> str:
        """One workflow's whole history: what its appends are fenced on."""
        return f"{self._ns}.wf.{_token(wf_id)}.*"

    # work queue: "advance workflow X" and similar
    @property
    def work_stream(self) -> str:
        return f"{self._ns_upper}_WORK"

    @property
    def work_subjects(self) -> str:
        return f"{self._ns}.work.>"

    def work_subject(self, kind: str) -> str:
        return f"{self._ns}.work.{kind}"

    # events for others
    @property
    def events_stream(self) -> str:
        return f"{self._ns_upper}_EVENTS"

    @property
    def events_subjects(self) -> str:
        return f"{self._ns}.events.>"

    def events_subject(self, kind: str) -> str:
        return f"{self._ns}.events.{kind}"

    @property
    def policy_reload_subject(self) -> str:
        """Where the policy service announces a requested reload (PolicyReloadRequested)."""
        return self.events_subject("policy.reload_requested")

    # audit (hash-chained records)
    @property
    def audit_stream(self) -> str:
        return f"{self._ns_upper}_AUDIT"

    @property
    def audit_subjects(self) -> str:
        return f"{self._ns}.audit.>"

    @property
    def audit_subject(self) -> str:
        """The default chain's subject (see `audit_chain_subject`)."""
        return self.audit_chain_subject("default")

    def audit_chain_subject(self, writer: str, owner: str = "") -> str:
        """Each audit writer (service instance) keeps its own hash chain on its own
        subject, so writers never contend for the head of one global chain. ``owner``
        (the writer's identity) comes first, so NATS permissions can give each identity
        exactly its own chains (``<ns>.audit.<owner>.>``)."""
        if owner:
            return f"{self._ns}.audit.{_token(owner)}.{_token(writer)}"
        return f"{self._ns}.audit.{_token(writer)}"

    def audit_owner_subjects(self, owner: str) -> str:
        """Every chain subject of identity ``owner``."""
        return f"{self._ns}.audit.{_token(owner)}.>"

    # KV buckets
    @property
    def registry_bucket(self) -> str:
        return f"{self._ns}_registry"

    @property
    def frozen_bucket(self) -> str:
        """Frozen agents (``tessera.v1.FrozenAgent`` per agent name), owned by the registry
        service; coordinators and tool proxies follow it. No TTL: a freeze lasts until an
        operator lifts it."""
        return f"{self._ns}_frozen"

    @property
    def policy_bucket(self) -> str:
        """The policy set being served (``tessera.v1.PolicySetSnapshot``, key ``set``) and
        its lease (``tessera.v1.PolicyLease``, key ``lease``), owned by the policy
        service; decision points in other processes follow it."""
        return f"{self._ns}_policy"

    @property
    def workflows_bucket(self) -> str:
        return f"{self._ns}_workflows"

    @property
    def blackboard_bucket(self) -> str:
        return f"{self._ns}_blackboard"

    @property
    def idempotency_bucket(self) -> str:
        return f"{self._ns}_idempotency"

    @property
    def approvals_bucket(self) -> str:
        """Tool-call approvals, owned by the tool proxy: it records a pending request, the
        coordinator hands it the human decision (ToolProxyService.DecideApproval), the
        proxy honours it on the retried call."""
        return f"{self._ns}_approvals"

    @property
    def budgets_bucket(self) -> str:
        """The workflow budget ledger (``tessera.v1.WorkflowBudget`` per workflow), owned
        by the coordinator; the tool proxy reads it for the live ``budget_remaining``."""
        return f"{self._ns}_budgets"

    def streams(self) -> tuple[StreamSpec, ...]:
        return (
            # Histories leave it through the coordinator's retention (retention.py).
            StreamSpec(
                self.wf_events_stream,
                (self.wf_events_subjects,),
                allow_direct=True,
                max_msgs=50_000_000,
            ),
            StreamSpec(
                self.work_stream,
                (self.work_subjects,),
                api.RetentionPolicy.WORK_QUEUE,
                max_msgs=1_000_000,
                max_msg_size=64 << 10,
            ),
            # Token revocations, policy reloads and the tools' effects outbox (looked up
            # when a refund is retried: kept longer than any workflow's deadline).
            # The outbox's lookups report "cannot tell" for an effect the stream discarded.
            StreamSpec(
                self.events_stream,
                (self.events_subjects,),
                max_age_s=45 * 24 * 3600.0,
                discard=api.DiscardPolicy.OLD,
            ),
            # The audit trail is never expired or deleted here; a full stream refuses
            # records, and an action whose record cannot be stored is refused.
            StreamSpec(
                self.audit_stream,
                (self.audit_subjects,),
                deny_delete=True,
                deny_purge=True,
                allow_direct=True,
                max_msgs=100_000_000,
            ),
        )

    def buckets(self) -> tuple[KvSpec, ...]:
        return (
            KvSpec(self.registry_bucket, ttl_s=self.registry_ttl_s),
            KvSpec(self.frozen_bucket),
            KvSpec(self.policy_bucket),
            KvSpec(self.workflows_bucket),
            KvSpec(self.blackboard_bucket, history=16),
            KvSpec(self.idempotency_bucket),
            KvSpec(self.approvals_bucket),
            KvSpec(self.budgets_bucket),
        )


def _token(value: str) -> str:
    if not value or any(c in value for c in ".*> \t\r\n"):
        raise ValueError(f"{value!r} cannot be a NATS subject token")
    return value


def _is_name_in_use(exc: BadRequestError) -> bool:
    return exc.err_code == _STREAM_NAME_IN_USE


async def _declare_stream(js: JetStreamContext, spec: StreamSpec, replicas: int) -> None:
    config = api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=spec.retention,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=spec.deny_delete,
        deny_purge=spec.deny_purge,
        allow_direct=spec.allow_direct,
        max_msgs=spec.max_msgs,
        max_msg_size=spec.max_msg_size,
        max_age=spec.max_age_s,
        discard=spec.discard,
    )
    try:
        await js.add_stream(config)
        return
    except BadRequestError as exc:
        if not _is_name_in_use(exc):
            raise
    # Exists with another config: update what JetStream lets us update in place. An
    # incompatible change (storage, retention) raises rather than losing data.
    await js.update_stream(config)
    log.info("stream_updated", stream=spec.name)


async def _declare_bucket(js: JetStreamContext, spec: KvSpec, replicas: int) -> None:
    try:
        await js.create_key_value(
            bucket=spec.bucket,
            history=spec.history,
            ttl=spec.ttl_s,
            storage=api.StorageType.FILE,
            replicas=replicas,
            max_value_size=spec.max_value_size,
        )
        return
    except BadRequestError as exc:
        if not _is_name_in_use(exc):
            raise
    info = await js.stream_info(f"KV_{spec.bucket}")
    config = info.config.evolve(
        max_msgs_per_subject=spec.history,
        max_age=spec.ttl_s,
        max_msg_size=spec.max_value_size,
        num_replicas=replicas,
    )
    await js.update_stream(config)
    log.info("bucket_updated", bucket=spec.bucket)


async def declare(
    js: JetStreamContext,
    topology: Topology,
    *,
    replicas: int = 1,
    within_s: float = STARTUP_TIMEOUT_S,
    leaders_of: Collection[str] | None = None,
) -> None:
    """Create every stream and KV bucket of ``topology``; safe to call any number of times.

    Existing ones with the same config are left alone; a compatible difference (replicas,
    TTL, history…) is applied with an update (the operator's alone where NATS has
    permissions: a workload's update gets no answer, so its start-up fails until the
    operator has declared the new config); nothing is ever deleted. The declarations
    run concurrently. With ``replicas`` > 1, returns only once every stream and bucket has
    an elected leader, so the first publish or KV put is answered: every one, or only those
    named in ``leaders_of`` (stream names, a bucket's as ``KV_<bucket>``; a workload waits
    for the streams it uses, the only ones whose info its NATS permissions let it ask,
    :func:`tessera.runtime.nats_permissions.streams_used`). While a cluster is
    still forming ("no suitable peers for placement", JetStream not ready, no answer
    yet), each step is retried (:func:`tessera.runtime.startup.until_ready`); after
    ``within_s`` in all, the last error is raised.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within_s

    async def step(what: str, call: Callable[[], Awaitable[None]]) -> None:
        left = max(0.0, give_up - loop.time())
        await until_ready(call, what=what, within_s=left, attempt_s=DECLARE_ATTEMPT_S)

    async def stream(spec: StreamSpec) -> None:
        await step(
            f"declare stream {spec.name}", functools.partial(_declare_stream, js, spec, replicas)
        )
        if replicas > 1 and (leaders_of is None or spec.name in leaders_of):
            await step(f"leader of {spec.name}", functools.partial(_has_leader, js, spec.name))

    async def bucket(spec: KvSpec) -> None:
        await step(
            f"declare bucket {spec.bucket}", functools.partial(_declare_bucket, js, spec, replicas)
        )
        name = f"KV_{spec.bucket}"
        if replicas > 1 and (leaders_of is None or name in leaders_of):
            await step(f"leader of {name}", functools.partial(_has_leader, js, name))

    try:
        async with asyncio.TaskGroup() as group:
            for spec in topology.streams():
                group.create_task(stream(spec))
            for kv in topology.buckets():
                group.create_task(bucket(kv))
    except BaseExceptionGroup as failed:
        # One cause is enough for the caller (they are alike: the same server said no).
        raise failed.exceptions[0] from None


async def _has_leader(js: JetStreamContext, stream: str) -> None:
    """Raise ``NotReadyYet`` until the (just declared) ``stream`` has a leader. Right
    after its creation a cluster may still answer "stream not found": not ready either."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        raise NotReadyYet(f"stream {stream} not placed yet") from None
    if info.cluster is not None and not info.cluster.leader:
        raise NotReadyYet(f"stream {stream} has no leader yet")


EventT = TypeVar("EventT", bound=Message)


async def subscribe_events(
    nc: Client,
    subject: str,
    event_type: type[EventT],
    on_event: Callable[[EventT], Awaitable[None]],
) -> Subscription:
    """A core NATS subscription handing each protobuf ``event_type`` on ``subject`` to
    ``on_event``. An event that does not decode is logged and skipped, and a failing
    handler is logged: neither ends the subscription. Flushed before it returns, so every
    event published afterwards is seen."""
    name = event_type.DESCRIPTOR.name

    async def handle(msg: Msg) -> None:
        try:
            event = event_type.FromString(msg.data)
        except Exception:  # DecodeError and friends
            log.warning("event_undecodable", event_type=name, size=len(msg.data))
            return
        try:
            await on_event(event)
        except Exception as exc:
            log.warning("event_handler_failed", event_type=name, error=repr(exc))

    sub = await nc.subscribe(subject, cb=handle)
    await nc.flush()
    return sub


def msg_id_headers(msg_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Publish headers: ``Nats-Msg-Id`` (JetStream dedup) + ``extra`` + trace context."""
    headers = dict(extra or {})
    headers["Nats-Msg-Id"] = msg_id
    return inject_headers(headers)


async def close(nc: Client, *, timeout_s: float = 3.0) -> None:
    """Drain the connection (flush pending publishes, finish subscriptions) but never wait
    longer than ``timeout_s``: a subscription stuck mid-delivery must not hold up shutdown."""
    if nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except Exception as exc:  # timeout or a drain error: closing is what matters now
        log.warning("nats_drain_incomplete", error=repr(exc))
        await nc.close()
