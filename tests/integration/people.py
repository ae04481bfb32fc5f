"""People for tests: users and groups in a real OpenBao's identity store, their real
identity tokens, and the tokens an attacker could bring (forged, expired, for another
audience)."""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import hvac
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tessera.vault.humans import (
    HUMAN_POLICY,
    SIGNING_KEY,
    HumansSpec,
    apply_humans,
    issuer_of,
    login,
    password_file,
)
from tests.conftest import OpenBao

SHORT_ROLE = "human-short"
OTHER_AUDIENCE_ROLE = "human-other-audience"
SHORT_TTL_S = 3


@dataclass
class People:
    openbao: OpenBao
    secrets_dir: Path
    issuer: str
    audience: str
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def token(self, user: str, *, role: str = "human") -> str:
        key = (user, role)
        if key not in self._tokens:
            password = password_file(self.secrets_dir, user).read_text().strip()
            self._tokens[key] = login(self.openbao.addr, user, password, role=role)
        return self._tokens[key]

    def fresh_token(self, user: str, *, role: str = "human") -> str:
        password = password_file(self.secrets_dir, user).read_text().strip()
        return login(self.openbao.addr, user, password, role=role)

    def forged(self, user: str, groups: list[str]) -> str:
        """A well-formed token with the right issuer, audience and a real key id, signed
        by a key the issuer never had."""
        real_kid = json.loads(_b64d(self.token(user).split(".")[0]))["kid"]
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": real_kid}
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": secrets.token_hex(8),
            "preferred_username": user,
            "groups": groups,
            "iat": now,
            "exp": now + 600,
        }
        signing_input = f"{_b64e(json.dumps(header))}.{_b64e(json.dumps(claims))}"
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


def _b64e(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def claims(token: str) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(_b64d(token.split(".")[1]))
    return parsed


def start_people(openbao: OpenBao, secrets_dir: Path, spec: HumansSpec) -> People:
    """Apply ``spec`` to ``openbao`` (a private one: this rewrites its token roles), plus
    two roles attackers' tokens come from: one short-lived, one for another audience."""
    (secrets_dir / "humans").mkdir(parents=True, exist_ok=True, mode=0o700)
    client = hvac.Client(url=openbao.addr, token=openbao.root_token)
    try:
        apply_humans(
            client,
            spec,
            vault_addr=openbao.addr,
            secrets_dir=secrets_dir,
        )
        other = "someone-else"
        client.write(
            f"identity/oidc/key/{SIGNING_KEY}",
            allowed_client_ids=f"{spec.token.audience},{other}",
        )
        client.write(
            f"identity/oidc/role/{SHORT_ROLE}",
            key=SIGNING_KEY,
            ttl=f"{SHORT_TTL_S}s",
            client_id=spec.token.audience,
            template='{"preferred_username": {{identity.entity.name}}}',
        )
        client.write(
            f"identity/oidc/role/{OTHER_AUDIENCE_ROLE}",
            key=SIGNING_KEY,
            ttl="5m",
            client_id=other,
            template='{"preferred_username": {{identity.entity.name}}}',
        )
        client.sys.create_or_update_policy(
            HUMAN_POLICY, 'path "identity/oidc/token/*" {\n  capabilities = ["read"]\n}\n'
        )
    finally:
        client.adapter.close()
    return People(openbao, secrets_dir, issuer_of(openbao.addr), spec.token.audience)
