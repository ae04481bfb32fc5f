"""People's identity tokens on this machine: ``tessera login`` writes them, every CLI
command and the demo send them.

One file per person, ``<data dir>/sessions/<user>.jwt`` (0600, directory 0700), and
``current`` naming the person commands act as unless told otherwise (``--as``). A token is
a bearer credential: it is never printed or logged; ``tessera logout`` deletes it.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.runtime.private_files import write_private

__all__ = [
    "Session",
    "SessionMissing",
    "current_user",
    "load",
    "make_current",
    "remove",
    "save",
    "sessions_dir",
]

_CURRENT = "current"


class SessionMissing(Exception):
    """No usable login (none, or expired): the message says what to run."""


@dataclass(frozen=True)
class Session:
    user: str
    token: str
    claims: dict[str, Any]

    @property
    def expires_at(self) -> float:
        return float(self.claims.get("exp", 0))

    @property
    def groups(self) -> list[str]:
        groups = self.claims.get("groups") or []
        return [str(g) for g in groups] if isinstance(groups, list) else []


def sessions_dir(data_dir: Path) -> Path:
    return data_dir / "sessions"


def claims_of(token: str) -> dict[str, Any]:
    """The payload of ``token`` as sent (NOT verified: Envoy verifies it; this only shows
    the user what they hold)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, binascii.Error, ValueError) as exc:
        raise ValueError("not a JWT") from exc
    if not isinstance(claims, dict):
        raise ValueError("not a JWT")
    return claims


def save(data_dir: Path, user: str, token: str) -> Session:
    session = Session(user, token, claims_of(token))
    directory = sessions_dir(data_dir)
    write_private(directory / f"{user}.jwt", token)
    write_private(directory / _CURRENT, user)
    return session


def make_current(data_dir: Path, user: str) -> None:
    write_private(sessions_dir(data_dir) / _CURRENT, user)


def current_user(data_dir: Path) -> str | None:
    path = sessions_dir(data_dir) / _CURRENT
    return path.read_text().strip() or None if path.is_file() else None


def load(data_dir: Path, user: str | None = None) -> Session:
    """The login of ``user`` (default: the current one).

    Raises:
        SessionMissing: nobody logged in, or the token expired.
    """
    who = user or current_user(data_dir)
    if who is None:
        raise SessionMissing("nobody is logged in: run `tessera login <user>`")
    path = sessions_dir(data_dir) / f"{who}.jwt"
    if not path.is_file():
        raise SessionMissing(f"{who} is not logged in: run `tessera login {who}`")
    token = path.read_text().strip()
    try:
        session = Session(who, token, claims_of(token))
    except ValueError as exc:
        raise SessionMissing(
            f"the saved login of {who} is unreadable: run `tessera login {who}`"
        ) from exc
    if session.expires_at and session.expires_at <= time.time():
        raise SessionMissing(f"the login of {who} expired: run `tessera login {who}`")
    return session


def remove(data_dir: Path, user: str | None = None) -> str | None:
    """Forget ``user``'s login (default: the current one); who was logged out."""
    who = user or current_user(data_dir)
    if who is None:
        return None
    (sessions_dir(data_dir) / f"{who}.jwt").unlink(missing_ok=True)
    if current_user(data_dir) == who:
        (sessions_dir(data_dir) / _CURRENT).unlink(missing_ok=True)
    return who
