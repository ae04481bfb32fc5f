"""What an audit record may say: credential-like values redacted, secret-bearing arguments
kept comparable as keyed HMACs (:func:`hmac_digest`).

The HMAC key is not per process: services read one key from Vault at start
(:func:`tessera.vault.audit_keys.read_hmac_key`), so two replicas, or one replica before
and after a restart, digest the same value to the same string.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any

from tessera.runtime.logging import REDACTED, is_sensitive_key

__all__ = ["HMAC_PREFIX", "hmac_digest", "is_sensitive_key", "scrub"]

HMAC_PREFIX = "hmac-sha256:"
# Beyond tessera.runtime.logging's rule (token, secret, password, authorization, …):
# names that carry credentials without one of those words.
# Compared with separators removed, so `X-Api-Key`, `api_key` and `apiKey` all match.
# Values that are credentials whatever their key: Vault/OpenBao tokens, bearer headers,
# PEM private keys.
_SECRET_VALUE = re.compile(
    r"^(?:hv[sbr]\.[A-Za-z0-9_-]{16,}|[sbr]\.[A-Za-z0-9]{20,}|bearer\s+\S+)$|"
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    re.IGNORECASE,
)


def hmac_digest(key: bytes, value: str) -> str:
    """``hmac-sha256:<hex>`` of ``value``: lets an auditor compare a secret-bearing argument
    against a known value without the record revealing it. Kept as-is by :func:`scrub`."""
    if not key:
        raise ValueError("hmac_digest needs a non-empty key")
    return HMAC_PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and value.startswith(HMAC_PREFIX)


@functools.lru_cache(maxsize=4096)
def _sensitive_str_key(key: str) -> bool:
    return is_sensitive_key(key)


def _sensitive(key: object) -> bool:
    # Records reuse a handful of keys: memoize the rule (a pure function of the key) for
    # short keys only, so argument names chosen by callers cannot grow the cache's memory.
    if type(key) is str and len(key) <= 64:
        return _sensitive_str_key(key)
    return is_sensitive_key(key)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): (v if _is_digest(v) else REDACTED) if _sensitive(k) else _scrub_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    if isinstance(value, str) and _SECRET_VALUE.search(value):
        return REDACTED
    return value


def scrub(details: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``details`` safe to write: at any depth, values of credential-like keys
    become ``"[redacted]"`` (unless already an :func:`hmac_digest`), and token-like string
    values are redacted whatever their key."""
    scrubbed: dict[str, Any] = _scrub_value(details)
    return scrubbed
