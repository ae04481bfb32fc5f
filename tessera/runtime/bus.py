"""NATS JetStream helpers: connection, the one place that names streams/buckets, declare.

Every stream, subject and KV bucket name comes from :class:`Topology`, prefixed with the
namespace so parallel tests (or tenants) never see each other's data.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import structlog
from google.protobuf.message import Message
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, ServiceUnavailableError

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
_NO_SUITABLE_PEERS = 10005  # JetStream: no suitable peers for placement (cluster forming)
PLACEMENT_WAIT_S = 15.0
"""How long :func:`declare` waits for a forming cluster to accept replicated streams."""


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout_s: float = 2.0,
    reconnect_wait_s: float = 1.0,
    initial_timeout_s: float | None = 30.0,
) -> Client:
    """Connect to NATS (``url`` may list several servers, comma-separated).

    The client retries forever, waiting ``reconnect_wait_s`` between attempts, both at
    start-up and after losing its server; every attempt gives up after
    ``connect_timeout_s``. The first connection must succeed within ``initial_timeout_s``
    (``None``: wait forever), else ``TimeoutError``. Connection events are logged.
    """

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", client=name, error=repr(exc))

    async def on_disconnected() -> None:
        log.warning("nats_disconnected", client=name)

    async def on_reconnected() -> None:
        log.info("nats_reconnected", client=name, server=_server(nc))

    async def on_closed() -> None:
        log.info("nats_closed", client=name)

    nc = Client()
    servers = [s.strip() for s in url.split(",") if s.strip()]
    try:
        async with asyncio.timeout(initial_timeout_s):
            await nc.connect(
                servers=servers,
                name=name,
                connect_timeout=connect_timeout_s,  # type: ignore[arg-type]
                reconnect_time_wait=reconnect_wait_s,  # type: ignore[arg-type]
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                closed_cb=on_closed,
            )
    except TimeoutError:
        await nc.close()
        raise TimeoutError(
            f"NATS {', '.join(servers)} not reachable within {initial_timeout_s:g}s"
        ) from None
    log.info("nats_connected", client=name, server=_server(nc))
    return nc


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


@dataclass(frozen=True)
class KvSpec:
    bucket: str
    ttl_s: float | None = None
    history: int = 1


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

    # workflow events: one subject per workflow
    @property
    def wf_events_stream(self) -> str:
        return f"{self._ns_upper}_WF_EVENTS"

    @property
    def wf_events_subjects(self) -> str:
        return f"{self._ns}.wf.*.events"

    def wf_events_subject(self, wf_id: str) -> str:
        return f"{self._ns}.wf.{_token(wf_id)}.events"

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

    def audit_chain_subject(self, writer: str) -> str:
        """Each audit writer (service instance) keeps its own hash chain on its own
        subject, so writers never contend for the head of one global chain."""
        return f"{self._ns}.audit.{_token(writer)}"

    # KV buckets
    @property
    def registry_bucket(self) -> str:
        return f"{self._ns}_registry"

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
        """Tool-call approvals: the tool proxy records a pending request, the coordinator
        records the human decision, the proxy honours it on the retried call."""
        return f"{self._ns}_approvals"

    def streams(self) -> tuple[StreamSpec, ...]:
        return (
            StreamSpec(self.wf_events_stream, (self.wf_events_subjects,)),
            StreamSpec(self.work_stream, (self.work_subjects,), api.RetentionPolicy.WORK_QUEUE),
            StreamSpec(self.events_stream, (self.events_subjects,)),
            StreamSpec(self.audit_stream, (self.audit_subjects,)),
        )

    def buckets(self) -> tuple[KvSpec, ...]:
        return (
            KvSpec(self.registry_bucket, ttl_s=self.registry_ttl_s),
            KvSpec(self.workflows_bucket),
            KvSpec(self.blackboard_bucket, history=16),
            KvSpec(self.idempotency_bucket),
            KvSpec(self.approvals_bucket),
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
        )
        return
    except BadRequestError as exc:
        if not _is_name_in_use(exc):
            raise
    info = await js.stream_info(f"KV_{spec.bucket}")
    config = info.config.evolve(
        max_msgs_per_subject=spec.history,
        max_age=spec.ttl_s,
        num_replicas=replicas,
    )
    await js.update_stream(config)
    log.info("bucket_updated", bucket=spec.bucket)


async def declare(
    js: JetStreamContext,
    topology: Topology,
    *,
    replicas: int = 1,
    placement_wait_s: float = PLACEMENT_WAIT_S,
) -> None:
    """Create every stream and KV bucket of ``topology``; safe to call any number of times.

    Existing ones with the same config are left alone; a compatible difference (replicas,
    TTL, history…) is applied with an update; nothing is ever deleted. While a cluster is
    still forming (JetStream: "no suitable peers for placement", not ready, or no answer
    yet), each declaration is retried for up to ``placement_wait_s``; after that the error
    is raised.
    """
    for stream in topology.streams():
        await _placed(functools.partial(_declare_stream, js, stream, replicas), placement_wait_s)
    for bucket in topology.buckets():
        await _placed(functools.partial(_declare_bucket, js, bucket, replicas), placement_wait_s)


async def _placed(declare_one: Callable[[], Awaitable[None]], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            await declare_one()
            return
        except (BadRequestError, ServiceUnavailableError, nats.errors.TimeoutError) as exc:
            if not _cluster_forming(exc) or time.monotonic() + delay > deadline:
                raise
            log.info("jetstream_placement_waiting", error=repr(exc))
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _cluster_forming(exc: Exception) -> bool:
    """What JetStream answers while its cluster is still forming: no suitable peers for a
    replicated stream, "JetStream not ready" (503), or no answer at all before a meta
    leader is elected. Retrying a declaration is safe: it is idempotent."""
    if isinstance(exc, BadRequestError):
        return exc.err_code == _NO_SUITABLE_PEERS
    return True


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
