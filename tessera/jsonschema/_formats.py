"""Tessera's security formats: ``format`` values that are checks against hostile input,
not only syntax (they are asserted, never mere annotations).

* ``identifier``: ASCII ``[A-Za-z0-9._:@-]``, 1-128 characters (no look-alikes);
* ``path``: relative, no ``..`` segment, no backslash, no leading ``~``, no shell
  metacharacters;
* ``hostname``: a DNS name or public IP; no loopback, private, link-local, metadata or
  reserved targets, also when written as decimal/octal/hex integers;
* ``uri``/``url``: ``http``/``https`` only, no user-info, host as for ``hostname``;
* ``email``: ``local@domain`` without whitespace, CR/LF or shell metacharacters;
* ``date``/``date-time``: ISO-8601.

The library's own ``ipv4``, ``ipv6``, ``uuid`` and ``regex`` checks (standard library only,
so the answer does not depend on which optional packages an image carries) are kept for
the other standard names; any other format name is an annotation, as the draft allows.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from datetime import date, datetime
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker

__all__ = ["FormatProblem", "format_checker", "host_problem", "meta_format_checker"]

_SHELL_META = frozenset(";|&$`<>(){}[]*?!\\'\"\n\r\t ")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}$")
_BLOCKED_HOST_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".arpa")
_BLOCKED_HOSTS = frozenset(
    {"localhost", "localhost.localdomain", "metadata", "metadata.google.internal"}
)


def _parse_int_host(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton-style forms (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) as an address."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    nums: list[int] = []
    for part in parts:
        try:
            if part.lower().startswith("0x"):
                nums.append(int(part, 16))
            elif len(part) > 1 and part.startswith("0"):
                nums.append(int(part, 8))
            else:
                nums.append(int(part, 10))
        except ValueError:
            return None
    value = 0
    for index, num in enumerate(nums):
        remaining = 4 - index
        if index < len(nums) - 1:
            if num > 255:
                return None
            value |= num << (8 * (remaining - 1))
        else:
            if num >= 1 << (8 * remaining):
                return None
            value |= num
    return ipaddress.IPv4Address(value)


def _ip_problem(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or not addr.is_global
    ):
        return f"targets a non-public address ({addr})"
    return None


def host_problem(host: str) -> str | None:
    """Why ``host`` is not an acceptable outbound target (SSRF), or None."""
    raw = host.strip()
    if not raw or raw != host:
        return "empty or padded host"
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    try:
        return _ip_problem(ipaddress.ip_address(raw))
    except ValueError:
        pass
    as_int = _parse_int_host(raw)
    if as_int is not None:
        return _ip_problem(as_int) or "numeric host forms are not accepted"
    name = raw.lower().rstrip(".")
    if not name.isascii():
        return "non-ASCII host (use punycode)"
    if name in _BLOCKED_HOSTS or name.endswith(_BLOCKED_HOST_SUFFIXES):
        return "targets a local or internal name"
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_DNS_LABEL_RE.match(lb) for lb in labels):
        return "not a valid public DNS name"
    if labels[-1].isdigit():
        return "not a valid public DNS name"
    return None


def _format_problem(value: str, fmt: str) -> str | None:
    if fmt == "identifier":
        if not _IDENTIFIER_RE.match(value):
            return "must be an ASCII identifier [A-Za-z0-9._:@-]{1,128}"
        return None
    if fmt == "path":
        if not value or value.startswith(("/", "~")) or "\\" in value:
            return "must be a relative path"
        if any(seg in ("..", "") for seg in value.split("/")) and value not in (".",):
            return "must not contain '..' or empty segments"
        if any(ch in _SHELL_META for ch in value) or any(ord(ch) < 0x20 for ch in value):
            return "contains shell metacharacters"
        return None
    if fmt == "hostname":
        return host_problem(value)
    if fmt in ("uri", "url"):
        if any(ch.isspace() or ord(ch) < 0x20 for ch in value):
            return "contains whitespace or control characters"
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            return "not a valid URL"
        if parts.scheme not in ("http", "https"):
            return "scheme must be http or https"
        if "@" in parts.netloc:
            return "user-info in URLs is not accepted"
        if port is not None and not 0 < port < 65536:
            return "invalid port"
        return host_problem(parts.hostname or "")
    if fmt == "email":
        if not _EMAIL_RE.match(value):
            return "not a valid e-mail address"
        problem = host_problem(value.rsplit("@", 1)[1])
        return f"domain {problem}" if problem else None
    if fmt == "date":
        try:
            date.fromisoformat(value)
        except ValueError:
            return "not an ISO-8601 date"
        return None
    if fmt == "date-time":
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return "not an ISO-8601 date-time"
        return None
    return None


class FormatProblem(ValueError):
    """Why a string is not of its format; its text becomes the violation's description."""


def _checker(fmt: str) -> Callable[[object], bool]:
    def check(instance: object) -> bool:
        if isinstance(instance, str):
            problem = _format_problem(instance, fmt)
            if problem is not None:
                raise FormatProblem(problem)
        return True

    return check


_TESSERA_FORMATS = ("identifier", "path", "hostname", "uri", "url", "email", "date", "date-time")
_LIBRARY_FORMATS = ("ipv4", "ipv6", "uuid", "regex")


def format_checker() -> FormatChecker:
    """A checker asserting Tessera's formats (and the library's stdlib-only ones)."""
    checker = FormatChecker(formats=())
    library = Draft202012Validator.FORMAT_CHECKER.checkers
    for name in _LIBRARY_FORMATS:
        checker.checkers[name] = library[name]
    for name in _TESSERA_FORMATS:
        checker.checks(name, raises=FormatProblem)(_checker(name))
    return checker


def meta_format_checker() -> FormatChecker:
    """For checking schemas: ``pattern`` values must compile (the meta-schema's ``regex``)."""
    checker = FormatChecker(formats=())
    checker.checkers["regex"] = Draft202012Validator.FORMAT_CHECKER.checkers["regex"]
    return checker
