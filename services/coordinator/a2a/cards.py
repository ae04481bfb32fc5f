"""The A2A face's agent cards: one per workflow template the planner serves, signed (JWS,
``EdDSA``) with the Transit key ``agent-cards`` (:mod:`tessera.vault.card_keys`).

A card says where the A2A face is (the front door's gRPC binding, the template as the
tenant of every request), how to authenticate (a bearer identity token,
what the front door's ``jwt_authn`` checks) and what the template does (one skill, its
inputs). Cards and the key set are cached for ``_TTL_S``: a Transit round trip per card
request would make discovery cost as much as a start.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from a2a.types import a2a_pb2
from a2a.utils.constants import PROTOCOL_VERSION_1_0, TransportProtocol
from a2a.utils.signing import _canonicalize_agent_card

from tessera.runtime.errors import FailedPrecondition, NotFound, Unavailable
from tessera.v1 import planner_pb2, planner_pb2_grpc
from tessera.vault.card_keys import CardKeys, key_id
from tessera.vault.errors import VaultError

__all__ = ["JWKS_PATH", "AgentCards", "card_path"]

JWKS_PATH = "/a2a/.well-known/jwks.json"
SCHEME = "bearer"
_TTL_S = 60.0
_PLANNER_TIMEOUT_S = 5.0


def card_path(template: str) -> str:
    return f"/a2a/{template}/.well-known/agent-card.json"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _skill_description(summary: planner_pb2.TemplateSummary) -> str:
    inputs = "; ".join(
        f"{i.name} ({i.type}{', required' if i.required else ''}): {i.description}".rstrip(": ")
        for i in summary.inputs
    )
    text = summary.description
    if inputs:
        text += f" Inputs, as one JSON object in a data part: {inputs}."
    if summary.has_approval_step:
        text += " Runs can wait on a person's approval (task state input-required)."
    return text


def build_card(summary: planner_pb2.TemplateSummary, public_url: str) -> a2a_pb2.AgentCard:
    """The unsigned card of one template, the front door at ``public_url``."""
    base = public_url.rstrip("/")
    grpc_target = urlsplit(base).netloc
    card = a2a_pb2.AgentCard(
        name=f"tessera-{summary.name}",
        description=summary.description,
        version="1.0.0",
        provider=a2a_pb2.AgentProvider(organization="Tessera", url=base),
        capabilities=a2a_pb2.AgentCapabilities(
            streaming=True, push_notifications=False, extended_agent_card=True
        ),
        default_input_modes=["application/json", "text/plain"],
        default_output_modes=["application/json"],
        # gRPC only: the front door also transcodes A2A's HTTP+JSON routes, but answers
        # streams as newline-delimited JSON, not the binding's server-sent events, so a
        # card naming that binding would promise streams it cannot keep.
        supported_interfaces=[
            a2a_pb2.AgentInterface(
                url=grpc_target,
                protocol_binding=TransportProtocol.GRPC,
                tenant=summary.name,
                protocol_version=PROTOCOL_VERSION_1_0,
            ),
        ],
        skills=[
            a2a_pb2.AgentSkill(
                id=summary.name,
                name=summary.name,
                description=_skill_description(summary),
                tags=["tessera", "workflow"],
                examples=list(summary.examples),
                input_modes=["application/json", "text/plain"],
                output_modes=["application/json"],
            )
        ],
    )
    card.security_schemes[SCHEME].http_auth_security_scheme.CopyFrom(
        a2a_pb2.HTTPAuthSecurityScheme(
            scheme="Bearer",
            bearer_format="JWT",
            description="A person's identity token from Tessera's issuer, checked at the "
            "front door; Cedar then decides what they may start and read.",
        )
    )
    card.security_requirements.add().schemes[SCHEME].SetInParent()
    return card


@dataclass
class _Cached:
    value: Any
    until: float


class AgentCards:
    """Signed cards and the key set, from the planner's templates and the card key."""

    def __init__(
        self,
        planner: planner_pb2_grpc.PlannerServiceStub,
        keys: CardKeys | None,
        public_url: str,
    ) -> None:
        self._planner = planner
        self._keys = keys
        self._public_url = public_url
        self._templates: _Cached | None = None
        self._cards: dict[str, _Cached] = {}
        self._jwks: _Cached | None = None

    def _require_url(self) -> str:
        if not self._public_url:
            raise FailedPrecondition(
                "the A2A face has no public URL: set TESSERA_PUBLIC_URL to the front door",
                reason="A2A_PUBLIC_URL_UNSET",
            )
        return self._public_url

    async def templates(self) -> dict[str, planner_pb2.TemplateSummary]:
        now = time.monotonic()
        if self._templates is None or self._templates.until < now:
            response = await self._planner.ListTemplates(
                planner_pb2.ListTemplatesRequest(), timeout=_PLANNER_TIMEOUT_S
            )
            self._templates = _Cached({t.name: t for t in response.templates}, now + _TTL_S)
        templates: dict[str, planner_pb2.TemplateSummary] = self._templates.value
        return templates

    async def template(self, name: str) -> planner_pb2.TemplateSummary:
        """The served template ``name``; NOT_FOUND (``TEMPLATE_NOT_FOUND``) otherwise."""
        summary = (await self.templates()).get(name)
        if summary is None:
            raise NotFound(
                f"no workflow template {name!r}: the A2A tenant is a template's name",
                reason="TEMPLATE_NOT_FOUND",
                metadata={"tenant": name[:128]},
            )
        return summary

    async def card(self, template: str) -> a2a_pb2.AgentCard:
        """The signed card of ``template``."""
        url = self._require_url()
        now = time.monotonic()
        cached = self._cards.get(template)
        if cached is not None and cached.until >= now:
            out = a2a_pb2.AgentCard()
            out.CopyFrom(cached.value)
            return out
        card = build_card(await self.template(template), url)
        await self._sign(card, url)
        self._cards[template] = _Cached(card, now + _TTL_S)
        out = a2a_pb2.AgentCard()
        out.CopyFrom(card)
        return out

    async def _sign(self, card: a2a_pb2.AgentCard, url: str, *, again: bool = True) -> None:
        if self._keys is None:  # plaintext debug coordinator: no Vault, unsigned cards
            return
        # The canonical form (RFC 8785 of the card without signatures) is the a2a-sdk's,
        # so the SDK's verifier recomputes exactly these bytes (pinned a2a-sdk version).
        payload = _canonicalize_agent_card(card).encode()
        version = await self._latest_version()
        protected = {
            "alg": "EdDSA",
            "typ": "JOSE",
            "kid": key_id(version),
            "jku": url.rstrip("/") + JWKS_PATH,
        }
        header = _b64url(json.dumps(protected, separators=(",", ":")).encode())
        try:
            signature = await self._keys.sign(f"{header}.{_b64url(payload)}".encode())
        except VaultError as exc:  # discovery waits; nothing of Vault's answer leaks
            raise Unavailable("cannot sign the agent card now", reason="CARD_SIGNING") from exc
        if key_id(signature.key_version) != protected["kid"]:
            # Rotated between reading the version and signing: once more, named right.
            self._jwks = None
            if not again:
                raise Unavailable("the card signing key is rotating", reason="CARD_SIGNING")
            return await self._sign(card, url, again=False)
        card.signatures.append(
            a2a_pb2.AgentCardSignature(protected=header, signature=_b64url(signature.signature))
        )

    async def _latest_version(self) -> int:
        keys = (await self.jwks()).get("keys") or []
        if not keys:
            raise Unavailable("the card signing key has no version", reason="CARD_SIGNING")
        return max(int(str(k["kid"]).rsplit("-v", 1)[1]) for k in keys)

    async def jwks(self) -> dict[str, Any]:
        """The card key's public versions as a JWK Set (``{"keys": []}`` unsigned)."""
        if self._keys is None:
            return {"keys": []}
        now = time.monotonic()
        if self._jwks is None or self._jwks.until < now:
            try:
                self._jwks = _Cached(await self._keys.jwks(), now + _TTL_S)
            except VaultError as exc:
                raise Unavailable(
                    "cannot read the card signing keys now", reason="CARD_SIGNING"
                ) from exc
        keys: dict[str, Any] = self._jwks.value
        return keys
