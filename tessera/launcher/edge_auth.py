"""How people pass the front door: Envoy's ``jwt_authn`` for identity tokens (bearer or the
console's session cookie), which paths need none, and what every answer tells a browser.

Used by :mod:`tessera.launcher.gateway`, which builds the rest of Envoy's configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessera.runtime.principal import CLAIMS_HEADER, SUBJECT_HEADER

__all__ = [
    "CONSOLE_PATH",
    "CONSOLE_SERVICE",
    "JWT_PROVIDER",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "HumanAuth",
    "identity_filters",
    "security_response_headers",
]

JWT_PROVIDER = "people"
_T = "type.googleapis.com/"
_JWT_AUTHN = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_HEADER_MUTATION = "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"

SESSION_COOKIE = "tessera_session"
"""The console's session cookie: jwt_authn reads a person's token from it as from an
``Authorization: Bearer`` header (services/console sets it, HttpOnly)."""

CONSOLE_PATH = "/console/"
CONSOLE_SERVICE = "tessera.v1.ConsoleService"
CARD_SERVICE = "tessera.v1.AgentCardService"
_GET = {"name": ":method", "string_match": {"exact": "GET"}}
# Reached without a token: the console's files (no data in them), logging in, and
# logging out (clearing a cookie needs no proof, and an expired session must be able to).
_NO_TOKEN_RULES: tuple[dict[str, Any], ...] = (
    {"match": {"prefix": CONSOLE_PATH}},
    {
        "match": {
            "path": "/v1/sessions",
            "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
        }
    },
    {
        "match": {
            "path": "/v1/sessions/current",
            "headers": [{"name": ":method", "string_match": {"exact": "DELETE"}}],
        }
    },
    {"match": {"path": f"/{CONSOLE_SERVICE}/GetAsset"}},
    {"match": {"path": f"/{CONSOLE_SERVICE}/CreateSession"}},
    {"match": {"path": f"/{CONSOLE_SERVICE}/DeleteSession"}},
    # A2A discovery: the agent cards and the key set that checks their signatures (no
    # workflow data in either; every A2A call itself needs a token).
    {"match": {"prefix": "/a2a/", "headers": [_GET]}},
    {"match": {"prefix": f"/{CARD_SERVICE}/"}},
)
# Every answer of the front door: what a browser may do with it. The console's pages load
# only their own scripts and styles, call only this origin, and cannot be framed.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
)


@dataclass(frozen=True)
class HumanAuth:
    """How Envoy verifies people at the front door (``jwt_authn``): tokens of ``issuer``
    for one of ``audiences``, signed by a key of ``jwks`` (the issuer's JSON Web Key Set,
    inlined: the control plane fetches it and pushes a new listener when keys rotate).
    ``subject_claim`` names the person (audit, ``decided_by``, rate limits)."""

    issuer: str
    audiences: tuple[str, ...]
    jwks: str
    subject_claim: str = "preferred_username"
    clock_skew_s: int = 30
    cookie: str = SESSION_COOKIE


def identity_filters(auth: HumanAuth, *, health_service: str) -> list[dict[str, Any]]:
    """Strip identity headers a client sent, then verify its token and set them (health
    checks of ``health_service`` stay anonymous: they say nothing about any workflow)."""
    strip = {
        "@type": _T + _HEADER_MUTATION,
        "mutations": {"request_mutations": [{"remove": CLAIMS_HEADER}, {"remove": SUBJECT_HEADER}]},
    }
    provider = {
        "issuer": auth.issuer,
        "audiences": list(auth.audiences),
        "local_jwks": {"inline_string": auth.jwks},
        # An API caller's bearer token, or the console's session cookie (set HttpOnly).
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "from_cookies": [auth.cookie],
        "forward": False,  # the token itself goes no further than Envoy
        "forward_payload_header": CLAIMS_HEADER,
        "claim_to_headers": [{"header_name": SUBJECT_HEADER, "claim_name": auth.subject_claim}],
        "clock_skew_seconds": auth.clock_skew_s,
    }
    verify = {
        "@type": _T + _JWT_AUTHN,
        "providers": {JWT_PROVIDER: provider},
        "rules": [
            {"match": {"prefix": f"/{health_service}/"}},
            *_NO_TOKEN_RULES,
            {"match": {"prefix": "/"}, "requires": {"provider_name": JWT_PROVIDER}},
        ],
    }
    return [
        {"name": "envoy.filters.http.header_mutation", "typed_config": strip},
        {"name": "envoy.filters.http.jwt_authn", "typed_config": verify},
    ]


def security_response_headers() -> list[dict[str, Any]]:
    """:data:`SECURITY_HEADERS` as a virtual host's ``response_headers_to_add``."""
    return [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in SECURITY_HEADERS
    ]
