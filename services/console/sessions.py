"""Browser sessions: a person's identity token, carried only in an HttpOnly cookie.

The cookie is ``HttpOnly`` (no page script reads it, so a script injected into any page
cannot steal it), ``SameSite=Strict`` (no other site's page can make the browser send
it: the cross-site request forgery defence for the console's POSTs), ``Path=/`` (the
API and the pages share one origin) and lasts exactly as long as the token. Envoy's
jwt_authn verifies it on every request like a bearer token; the console never keeps
one.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["FailedLogins", "clear_cookie", "session_cookie"]


def session_cookie(name: str, token: str, *, expire_time: float, secure: bool) -> str:
    """The ``set-cookie`` value that hands ``token`` to the browser until it expires."""
    max_age = max(0, int(expire_time - time.time()))
    return _cookie(name, token, max_age, secure)


def clear_cookie(name: str, *, secure: bool) -> str:
    """The ``set-cookie`` value that ends the session in the browser."""
    return _cookie(name, "", 0, secure)


def _cookie(name: str, value: str, max_age: int, secure: bool) -> str:
    parts = [f"{name}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


@dataclass
class FailedLogins:
    """Failed logins per user name within a sliding window: a bound on password guessing
    that does not depend on the caller's address (Envoy's per-caller limits cannot key
    on a person before they are one). Per replica; the issuer's own limits are behind it.
    """

    limit: int
    window_s: float
    max_names: int = 10_000
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def blocked(self, user: str, now: float | None = None) -> float:
        """Seconds until ``user`` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        failures = self._prune(user, now)
        if failures is None or len(failures) < self.limit:
            return 0.0
        return max(0.0, failures[0] + self.window_s - now)

    def failed(self, user: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        failures = self._prune(user, now)
        if failures is None:
            if len(self._failures) >= self.max_names:
                # Forget the name whose last failure is oldest: memory stays bounded
                # whatever names a guesser makes up.
                oldest = min(self._failures, key=lambda k: self._failures[k][-1])
                del self._failures[oldest]
            failures = self._failures[user] = deque(maxlen=self.limit)
        failures.append(now)

    def succeeded(self, user: str) -> None:
        self._failures.pop(user, None)

    def _prune(self, user: str, now: float) -> deque[float] | None:
        failures = self._failures.get(user)
        if failures is None:
            return None
        while failures and failures[0] + self.window_s <= now:
            failures.popleft()
        if not failures:
            del self._failures[user]
            return None
        return failures
