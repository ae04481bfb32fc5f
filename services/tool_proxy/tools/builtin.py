"""Built-in tools: deterministic stand-ins for the reference workflows' real APIs.

Each one needs its Vault secret (``api_key``): the handler refuses to run without it,
so a successful call proves the proxy read the secret with the caller's token. The key
is never returned or logged; results carry only the secret's version.

Side-effecting tools (``billing.issue_refund``, ``billing.reverse_refund``,
``email.send``) record their effect in the effects outbox: one message on
``<ns>.events.tool.effects`` (events stream) whose ``Nats-Msg-Id`` is the call's effect
id, so even a re-execution within the stream's duplicate window is stored once. Tests and
demos count effects there. The message holds the call's result too, so the tools can look
their own effects up (``Tool.lookup``): a claim taken over from a dead executor is
replayed from the outbox instead of run again. ``billing.reverse_refund`` finds the refund
it undoes the same way, by the refund's effect id.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.js import JetStreamContext, api

from services.tool_proxy.idempotency import effect_id
from services.tool_proxy.tools.registry import (
    CallInfo,
    EffectLookup,
    SideEffect,
    Tool,
    ToolError,
    ToolSpec,
)
from tessera.runtime.bus import Topology, msg_id_headers
from tessera.runtime.errors import Internal
from tessera.vault.tokens import ToolSecret

__all__ = [
    "ACCEPT_OFFER",
    "EFFECTS_KIND",
    "REFUND",
    "REVERSES_HEADER",
    "REVERSE_REFUND",
    "builtin_tools",
    "effects_subject",
]

EFFECTS_KIND = "tool.effects"
REVERSES_HEADER = "Tessera-Reverses"
"""Header of a reversal's outbox message: the effect id of the refund it reverses (so a
refund is found reversed by its id, whatever idempotency key the reversal used)."""
REFUND = "billing.issue_refund"
REVERSE_REFUND = "billing.reverse_refund"
ACCEPT_OFFER = "procurement.accept_offer"

log = structlog.get_logger(__name__)
_CLOCK_SKEW_S = 60.0
"""How far the proxy's clock (the claim's time) may be ahead of the NATS server's."""
_MAX_SCAN = 100_000
"""Outbox messages a lookup reads at most (headers only) before answering UNKNOWN."""
_BATCH = 256
_MSG_ID = "Nats-Msg-Id"

_ID = {"type": "string", "format": "identifier", "maxLength": 64}


def effects_subject(topology: Topology) -> str:
    """Subject of the effects outbox."""
    return topology.events_subject(EFFECTS_KIND)


def _obj(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _require_key(secret: ToolSecret | None, tool: str) -> None:
    key = secret.data.get("api_key") if secret is not None else None
    if not isinstance(key, str) or not key:
        raise ToolError(f"{tool}: no api_key in its secret", reason="TOOL_SECRET_MISSING")


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:8], "big")


_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")
_TIERS = ("free", "standard", "premium", "enterprise")


async def _lookup_customer(
    args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
) -> dict[str, Any]:
    _require_key(secret, "crm.lookup_customer")
    cid = str(args["customer_id"])
    s = _seed("crm", cid)
    first, last = _FIRST[s % len(_FIRST)], _LAST[(s >> 8) % len(_LAST)]
    return {
        "customer_id": cid,
        "name": f"{first} {last}",
        "email": f"{first.lower()}.{last.lower()}@example.com",
        "tier": _TIERS[(s >> 16) % len(_TIERS)],
        "open_tickets": (s >> 24) % 5,
        "credential_version": secret.version if secret else 0,
    }


async def _get_invoices(
    args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
) -> dict[str, Any]:
    _require_key(secret, "billing.get_invoices")
    cid = str(args["customer_id"])
    limit = int(args.get("limit", 3))
    invoices = []
    for n in range(limit):
        s = _seed("inv", cid, str(n))
        invoices.append(
            {
                "invoice_id": f"inv-{s % 1_000_000:06d}",
                "amount": round((s % 50_000) / 100, 2),
                "currency": "EUR",
                "status": ("paid", "open", "overdue")[(s >> 20) % 3],
            }
        )
    return {
        "customer_id": cid,
        "invoices": invoices,
        "credential_version": secret.version if secret else 0,
    }


async def _kb_search(
    args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
) -> dict[str, Any]:
    _require_key(secret, "kb.search")
    query = str(args["query"])
    top_k = int(args.get("top_k", 3))
    hits = [
        {
            "id": f"kb-{_seed('kb', query, str(n)) % 10_000:04d}",
            "title": f"Article {n + 1} about {query[:40]}",
            "score": round(1.0 / (n + 1), 3),
        }
        for n in range(top_k)
    ]
    return {"query": query, "hits": hits, "credential_version": secret.version if secret else 0}


async def _bureau_report(
    args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
) -> dict[str, Any]:
    _require_key(secret, "credit.bureau_report")
    s = _seed("bureau", str(args["customer_id"]))
    return {
        "customer_id": str(args["customer_id"]),
        "score": 300 + s % 551,
        "delinquencies": (s >> 12) % 3,
        "credential_version": secret.version if secret else 0,
    }


class _Outbox:
    def __init__(self, js: JetStreamContext, topology: Topology) -> None:
        self._js = js
        self._subject = effects_subject(topology)
        self._stream = topology.events_stream

    async def record(
        self,
        call: CallInfo,
        tool: str,
        effect: Mapping[str, Any],
        result: Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Publish the effect (once per effect id; ``headers`` besides the message id);
        the call's result: ``result`` plus the message's ``outbox_seq``."""
        body = {
            "tool": tool,
            "effect_id": call.effect_id,
            "idempotency_key": call.idempotency_key,
            "workflow_id": call.workflow_id,
            "task_id": call.task_id,
            "agent": call.agent,
            "decision_id": call.decision_id,
            "effect": dict(effect),
            "result": dict(result),
        }
        ack = await self._js.publish(
            self._subject,
            json.dumps(body, sort_keys=True).encode(),
            headers=msg_id_headers(call.effect_id, headers),
            timeout=2.0,
        )
        return {**result, "outbox_seq": int(ack.seq)}

    async def lookup(self, call: CallInfo, claimed_at: float) -> EffectLookup:
        """Whether the outbox holds the effect of ``call``: a message whose
        ``Nats-Msg-Id`` is its effect id, stored since ``claimed_at`` (less the clock
        skew allowed). NOT_EXECUTED only if none of the messages since then was
        discarded by the stream's limits."""
        found, unsure = await self.find(
            {"effect": (_MSG_ID, call.effect_id)}, since=claimed_at - _CLOCK_SKEW_S
        )
        if "effect" in found:
            body = await self.body(found["effect"])
            # Messages published before results were stored still prove the effect.
            result = body.get("result") or body.get("effect") or {}
            log.info("effect_found_in_outbox", tool=body.get("tool"), outbox_seq=found["effect"])
            return EffectLookup.executed({**result, "outbox_seq": found["effect"]})
        if unsure:
            return EffectLookup.unknown(unsure)
        return EffectLookup.not_executed()

    async def find(
        self, wanted: Mapping[str, tuple[str, str]], *, since: float | None
    ) -> tuple[dict[str, int], str]:
        """Where the outbox holds the messages ``wanted`` (label -> (header, value)): the
        stream sequence of the first message stored since ``since`` (wall clock; None:
        every message the stream kept) carrying that header value, by label; and why
        the labels not found may still exist ("" when they certainly do not: no message
        of the window was discarded by the stream's limits). Reads headers only, at
        most ``_MAX_SCAN`` messages; stops once every label is found."""
        if since is None:
            policy, start = api.DeliverPolicy.ALL, None
        else:
            policy, start = api.DeliverPolicy.BY_START_TIME, datetime.fromtimestamp(since, UTC)
        name = f"effect-lookup-{secrets.token_hex(8)}"
        info = await self._js.add_consumer(
            self._stream,
            config=api.ConsumerConfig(
                name=name,
                filter_subject=self._subject,
                deliver_policy=policy,
                opt_start_time=start,
                headers_only=True,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,  # gone even if the deletion below fails
            ),
        )
        found: dict[str, int] = {}
        try:
            # The first message of the window, and how many there are.
            window_start = (info.delivered.stream_seq if info.delivered else 0) + 1
            left = info.num_pending or 0
            if left > _MAX_SCAN:
                return found, f"{left} outbox messages to scan"
            sub = await self._js.pull_subscribe_bind(stream=self._stream, name=name)
            try:
                while left > 0 and len(found) < len(wanted):
                    for msg in await sub.fetch(min(left, _BATCH), timeout=2.0):
                        left -= 1
                        headers = msg.headers or {}
                        for label, (header, value) in wanted.items():
                            if label not in found and headers.get(header) == value:
                                found[label] = msg.metadata.sequence.stream
            finally:
                await sub.unsubscribe()
            if len(found) == len(wanted):
                return found, ""
            state = (await self._js.stream_info(self._stream)).state
            if window_start <= state.first_seq and state.first_seq > 1:
                # Messages older than the first one read were discarded: they may have
                # been stored in the window.
                return found, "outbox messages of the window were discarded"
            return found, ""
        finally:
            try:
                await self._js.delete_consumer(self._stream, name)
            except Exception as exc:  # it expires on its own (inactive_threshold)
                log.warning("effect_lookup_cleanup_failed", error=repr(exc))

    async def body(self, seq: int) -> dict[str, Any]:
        """The outbox message at stream sequence ``seq``."""
        body: dict[str, Any] = json.loads((await self._js.get_msg(self._stream, seq)).data or b"{}")
        return body


InFlight = Callable[[str], Awaitable[float | None]]
"""Seconds left on a live claim of an effect id (None: no call is running it):
:meth:`services.tool_proxy.idempotency.IdempotencyStore.in_flight`."""


async def _nothing_in_flight(eid: str) -> float | None:
    return None


def builtin_tools(
    js: JetStreamContext, topology: Topology, *, in_flight: InFlight = _nothing_in_flight
) -> list[Tool]:
    """Every built-in tool; side effects go to the outbox on ``js``. ``in_flight`` tells
    ``billing.reverse_refund`` whether the refund it undoes is still being made."""
    outbox = _Outbox(js, topology)

    async def issue_refund(
        args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        _require_key(secret, REFUND)
        refund_id = f"rf-{call.effect_id[:16]}"
        effect = {
            "refund_id": refund_id,
            "customer_id": args["customer_id"],
            "invoice_id": args["invoice_id"],
            "amount": args["amount"],
            "currency": args.get("currency", "EUR"),
        }
        result = {
            **effect,
            "status": "issued",
            "credential_version": secret.version if secret else 0,
        }
        return await outbox.record(call, REFUND, effect, result)

    async def reverse_refund(
        args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        """Undo the refund this workflow made with ``refund_idempotency_key``: once per
        refund (a refund already reversed, by any key, answers with that reversal),
        nothing where no refund was made, and an error, never a guess, when the outbox
        cannot tell."""
        _require_key(secret, REVERSE_REFUND)
        version = secret.version if secret else 0
        refund_eid = effect_id(call.workflow_id, REFUND, str(args["refund_idempotency_key"]))
        # Asked before the outbox: a refund still being made (a workflow cancelled while
        # its refund call ran) is not in the outbox yet, and "no refund was made" would
        # then be wrong for good. Its claim settles within its lease; retry until then.
        left = await in_flight(refund_eid)
        if left is not None:
            raise ToolError(
                "the refund to reverse is still being made: retry",
                reason="EFFECT_IN_FLIGHT",
                retry_after_s=round(min(max(left, 0.1), 1.0), 3),
            )
        found, unsure = await outbox.find(
            {"refund": (_MSG_ID, refund_eid), "reversal": (REVERSES_HEADER, refund_eid)},
            since=None,  # the refund may be as old as the workflow
        )
        if "reversal" in found:
            previous = await outbox.body(found["reversal"])
            log.info("refund_already_reversed", outbox_seq=found["reversal"])
            return {**(previous.get("result") or {}), "outbox_seq": found["reversal"]}
        if "refund" in found:
            refund = (await outbox.body(found["refund"])).get("effect") or {}
            effect = {
                "reversal_id": f"rv-{call.effect_id[:16]}",
                "refund_effect_id": refund_eid,
                "refund_id": refund.get("refund_id"),
                "customer_id": refund.get("customer_id"),
                "invoice_id": refund.get("invoice_id"),
                "amount": refund.get("amount"),
                "currency": refund.get("currency", "EUR"),
                "reason": str(args.get("reason", "")),
            }
            result = {
                **effect,
                "reversed": True,
                "status": "reversed",
                "credential_version": version,
            }
            return await outbox.record(
                call, REVERSE_REFUND, effect, result, headers={REVERSES_HEADER: refund_eid}
            )
        if unsure:
            # Not a ToolError: the call must fail (and the compensation be retried, then
            # reported), and its claim must not be released as if nothing could happen.
            raise Internal(
                f"{REVERSE_REFUND}: cannot tell whether the refund was made ({unsure})",
                reason="REFUND_OUTCOME_UNKNOWN",
                metadata={"tool": REVERSE_REFUND, "refund_effect_id": refund_eid},
            )
        return {"reversed": False, "reason": "no refund was made", "credential_version": version}

    async def send_email(
        args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        _require_key(secret, "email.send")
        message_id = f"<{call.effect_id[:24]}@mail.tessera.invalid>"
        effect = {
            "message_id": message_id,
            "to_digest": hashlib.sha256(str(args["to"]).encode()).hexdigest()[:16],
            "subject_length": len(str(args["subject"])),
        }
        result = {
            "message_id": message_id,
            "status": "queued",
            "credential_version": secret.version if secret else 0,
        }
        return await outbox.record(call, "email.send", effect, result)

    async def accept_offer(
        args: Mapping[str, Any], secret: ToolSecret | None, call: CallInfo
    ) -> dict[str, Any]:
        """Accept a supplier's offer (commits the workflow to pay ``price``). The policy
        decides first: policy/policies/30_procurement.cedar caps ``price`` at the
        workflow's ``max_budget``."""
        _require_key(secret, ACCEPT_OFFER)
        effect = {
            "acceptance_id": f"ac-{call.effect_id[:16]}",
            "supplier": args["supplier"],
            "price": args["price"],
            "currency": args.get("currency", "EUR"),
        }
        result = {
            **effect,
            "status": "accepted",
            "credential_version": secret.version if secret else 0,
        }
        return await outbox.record(call, ACCEPT_OFFER, effect, result)

    return [
        Tool(
            ToolSpec(
                name="crm.lookup_customer",
                description="Look a customer up by id: name, contact, tier, open tickets.",
                input_schema=_obj({"customer_id": _ID}, ["customer_id"]),
                side_effect=SideEffect.READ_ONLY,
                category="crm",
                pii=False,  # policy/40_pii.cedar: support agents need it
            ),
            _lookup_customer,
        ),
        Tool(
            ToolSpec(
                name="billing.get_invoices",
                description="List a customer's most recent invoices.",
                input_schema=_obj(
                    {
                        "customer_id": _ID,
                        "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                    },
                    ["customer_id"],
                ),
                side_effect=SideEffect.READ_ONLY,
                category="billing",
            ),
            _get_invoices,
        ),
        Tool(
            ToolSpec(
                name=REFUND,
                description="Refund (part of) an invoice. Moves money: never repeated.",
                input_schema=_obj(
                    {
                        "customer_id": _ID,
                        "invoice_id": _ID,
                        "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000},
                        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                        "reason": {"type": "string", "maxLength": 500},
                    },
                    ["customer_id", "invoice_id", "amount"],
                ),
                side_effect=SideEffect.EXTERNAL_ACTION,
                category="billing",
            ),
            issue_refund,
            outbox.lookup,
        ),
        Tool(
            ToolSpec(
                name=REVERSE_REFUND,
                description=(
                    "Reverse the refund this workflow made with an idempotency key (a "
                    "saga's compensation): once per refund; nothing if none was made."
                ),
                input_schema=_obj(
                    {
                        "refund_idempotency_key": {
                            "type": "string",
                            "pattern": "^[A-Za-z0-9._:@/+=-]{1,128}$",
                        },
                        "reason": {"type": "string", "maxLength": 500},
                    },
                    ["refund_idempotency_key"],
                ),
                side_effect=SideEffect.EXTERNAL_ACTION,
                category="billing",
            ),
            reverse_refund,
            outbox.lookup,
        ),
        Tool(
            ToolSpec(
                name="kb.search",
                description="Search the knowledge base.",
                input_schema=_obj(
                    {
                        "query": {"type": "string", "minLength": 1, "maxLength": 500},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
                    },
                    ["query"],
                ),
                side_effect=SideEffect.READ_ONLY,
                category="knowledge",
            ),
            _kb_search,
        ),
        Tool(
            ToolSpec(
                name="email.send",
                description="Send an e-mail to a customer. Never repeated.",
                input_schema=_obj(
                    {
                        "to": {"type": "string", "format": "email", "maxLength": 254},
                        "subject": {"type": "string", "minLength": 1, "maxLength": 200},
                        "body": {"type": "string", "maxLength": 10000},
                    },
                    ["to", "subject", "body"],
                ),
                side_effect=SideEffect.EXTERNAL_ACTION,
                category="communication",
                pii=False,
                secret_fields=frozenset({"to", "body"}),
            ),
            send_email,
            outbox.lookup,
        ),
        Tool(
            ToolSpec(
                name="credit.bureau_report",
                description="Fetch a customer's credit bureau report (PII).",
                input_schema=_obj(
                    {
                        "customer_id": _ID,
                        "ssn_last4": {"type": "string", "pattern": "^[0-9]{4}$"},
                    },
                    ["customer_id"],
                ),
                side_effect=SideEffect.READ_ONLY,
                category="credit",
                pii=True,
                secret_fields=frozenset({"ssn_last4"}),
            ),
            _bureau_report,
        ),
        Tool(
            ToolSpec(
                name=ACCEPT_OFFER,
                description=(
                    "Accept a supplier's offer for the whole order at `price` (major units). "
                    "Commits money: never repeated; never above the workflow's max_budget."
                ),
                input_schema=_obj(
                    {
                        "supplier": _ID,
                        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e12},
                        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                    },
                    ["supplier", "price"],
                ),
                side_effect=SideEffect.EXTERNAL_ACTION,
                category="procurement",
            ),
            accept_offer,
            outbox.lookup,
        ),
    ]
