"""A compact, dependency-free JSON Schema validator with hostile-input checks.

Shared by every service that validates untrusted JSON (the coordinator's output contracts,
the tool proxy's tool arguments). It implements the subset Tessera's schemas use:

``type`` (a name or a list), ``enum``, ``const``, ``required``, ``properties``,
``additionalProperties`` (bool or schema; open by default, as in JSON Schema),
``items``, ``minItems``/``maxItems``, ``minLength``/``maxLength``, ``pattern``,
``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, ``minProperties``/
``maxProperties`` and ``format``.

On top of the schema, :class:`Limits` bounds nesting depth, string length, the number of
object keys and array items, and refuses, in every string and key: NUL and other control
characters (tab, CR and LF are allowed in values), bidirectional overrides ("Trojan
Source") everywhere, zero-width characters in keys and identifiers.

Formats are security checks, not just syntax:

* ``identifier``: ASCII ``[A-Za-z0-9._:@-]``, 1-128 characters (no look-alikes);
* ``path``: relative, no ``..`` segment, no backslash, no leading ``~``, no shell
  metacharacters;
* ``hostname``: a DNS name or public IP; no loopback, private, link-local, metadata or
  reserved targets, also when written as decimal/octal/hex integers;
* ``uri``/``url``: ``http``/``https`` only, no user-info, host as for ``hostname``;
* ``email``: ``local@domain`` without whitespace, CR/LF or shell metacharacters;
* ``date``/``date-time``: ISO-8601.

Every problem is a :class:`Violation` (field path, description); nothing raises.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from urllib.parse import urlsplit

__all__ = ["DEFAULT_LIMITS", "Limits", "Violation", "schema_problems", "validate"]


@dataclass(frozen=True, slots=True)
class Violation:
    """One problem: ``path`` like ``arguments.items[2].name`` and what is wrong."""

    path: str
    description: str

    def __str__(self) -> str:
        return f"{self.path}: {self.description}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to every value, whatever the schema says."""

    max_depth: int = 8
    max_string_length: int = 8192
    max_keys: int = 256
    max_items: int = 1024
    max_key_length: int = 128


DEFAULT_LIMITS = Limits()

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}

_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad")
_ALLOWED_CONTROLS = frozenset("\t\n\r")
_SHELL_META = frozenset(";|&$`<>(){}[]*?!\\'\"\n\r\t ")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}$")
_BLOCKED_HOST_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".arpa")
_BLOCKED_HOSTS = frozenset(
    {"localhost", "localhost.localdomain", "metadata", "metadata.google.internal"}
)


def _type_ok(value: Any, expected: str) -> bool:
    if expected not in _JSON_TYPES:
        return True  # unknown type names are the schema author's problem, not the caller's
    if isinstance(value, bool) and expected in ("number", "integer"):
        return False
    if not isinstance(value, _JSON_TYPES[expected]):
        return False
    if expected == "integer" and isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    return not (isinstance(value, float) and not math.isfinite(value))


def _char_problem(text: str, *, key: bool) -> str | None:
    for ch in text:
        if ch in _BIDI:
            return f"contains a bidirectional control character U+{ord(ch):04X}"
        if ch == "\x00":
            return "contains a NUL character"
        if key and ch in _ZERO_WIDTH:
            return f"contains a zero-width character U+{ord(ch):04X}"
        cat = unicodedata.category(ch)
        if cat == "Cc" and (key or ch not in _ALLOWED_CONTROLS):
            return f"contains a control character U+{ord(ch):04X}"
        if cat in ("Cs", "Co", "Cn") and key:
            return f"contains a non-character U+{ord(ch):04X}"
    return None


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


def _number_problems(value: float, schema: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    if "minimum" in schema and value < schema["minimum"]:
        problems.append(f"below minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        problems.append(f"above maximum {schema['maximum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        problems.append(f"must be above {schema['exclusiveMinimum']}")
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        problems.append(f"must be below {schema['exclusiveMaximum']}")
    return problems


def _string_problems(value: str, schema: Mapping[str, Any], limits: Limits) -> list[str]:
    cap = min(int(schema.get("maxLength", limits.max_string_length)), limits.max_string_length)
    if len(value) > cap:
        return [f"longer than {cap} characters"]
    problems: list[str] = []
    chars = _char_problem(value, key=False)
    if chars:
        problems.append(chars)
    if "minLength" in schema and len(value) < int(schema["minLength"]):
        problems.append(f"shorter than {schema['minLength']} characters")
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and re.search(pattern, value) is None:
        problems.append(f"does not match {pattern!r}")
    fmt = schema.get("format")
    if isinstance(fmt, str) and not problems:
        problem = _format_problem(value, fmt)
        if problem:
            problems.append(problem)
    return problems


def _walk(
    value: Any, schema: Any, path: str, depth: int, limits: Limits, out: list[Violation]
) -> None:
    if depth > limits.max_depth:
        out.append(Violation(path, f"nested deeper than {limits.max_depth} levels"))
        return
    if schema is False:
        out.append(Violation(path, "not allowed"))
        return
    if not isinstance(schema, Mapping):
        schema = {}

    expected = schema.get("type")
    if isinstance(expected, str):
        if not _type_ok(value, expected):
            out.append(Violation(path, f"expected {expected}"))
            return
    elif (
        isinstance(expected, list)
        and expected
        and not any(_type_ok(value, t) for t in expected if isinstance(t, str))
    ):
        out.append(Violation(path, f"expected one of {expected}"))
        return
    if isinstance(value, float) and not math.isfinite(value):
        out.append(Violation(path, "not a finite number"))
        return

    if "enum" in schema and value not in schema["enum"]:
        out.append(Violation(path, f"not one of {schema['enum']}"))
    if "const" in schema and value != schema["const"]:
        out.append(Violation(path, f"must be {schema['const']!r}"))

    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        out.extend(Violation(path, p) for p in _number_problems(value, schema))
    elif isinstance(value, str):
        out.extend(Violation(path, p) for p in _string_problems(value, schema, limits))
    elif isinstance(value, dict):
        _walk_object(value, schema, path, depth, limits, out)
    elif isinstance(value, list):
        _walk_array(value, schema, path, depth, limits, out)
    else:
        out.append(Violation(path, f"not a JSON value ({type(value).__name__})"))


def _walk_object(
    value: dict[Any, Any],
    schema: Mapping[str, Any],
    path: str,
    depth: int,
    limits: Limits,
    out: list[Violation],
) -> None:
    if len(value) > limits.max_keys:
        out.append(Violation(path, f"more than {limits.max_keys} keys"))
        return
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    for key in schema.get("required", []):
        if key not in value:
            out.append(Violation(f"{path}.{key}", "required"))
    if "minProperties" in schema and len(value) < int(schema["minProperties"]):
        out.append(Violation(path, f"fewer than {schema['minProperties']} keys"))
    if "maxProperties" in schema and len(value) > int(schema["maxProperties"]):
        out.append(Violation(path, f"more than {schema['maxProperties']} keys"))
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if not isinstance(key, str):
            out.append(Violation(path, "object keys must be strings"))
            continue
        shown = key if key.isprintable() and len(key) <= limits.max_key_length else repr(key)[:40]
        sub_path = f"{path}.{shown}"
        if len(key) > limits.max_key_length:
            out.append(Violation(sub_path, f"key longer than {limits.max_key_length}"))
            continue
        problem = _char_problem(key, key=True)
        if problem:
            out.append(Violation(sub_path, f"key {problem}"))
            continue
        if key in props:
            _walk(item, props[key], sub_path, depth + 1, limits, out)
        elif extra is False:
            out.append(Violation(sub_path, "unknown field"))
        else:
            _walk(
                item, extra if isinstance(extra, Mapping) else {}, sub_path, depth + 1, limits, out
            )


def _walk_array(
    value: list[Any],
    schema: Mapping[str, Any],
    path: str,
    depth: int,
    limits: Limits,
    out: list[Violation],
) -> None:
    if len(value) > limits.max_items:
        out.append(Violation(path, f"more than {limits.max_items} items"))
        return
    if "minItems" in schema and len(value) < int(schema["minItems"]):
        out.append(Violation(path, f"fewer than {schema['minItems']} items"))
    if "maxItems" in schema and len(value) > int(schema["maxItems"]):
        out.append(Violation(path, f"more than {schema['maxItems']} items"))
    items = schema.get("items")
    for index, item in enumerate(value):
        _walk(
            item,
            items if isinstance(items, Mapping) else {},
            f"{path}[{index}]",
            depth + 1,
            limits,
            out,
        )


def validate(
    value: Any, schema: Mapping[str, Any], *, path: str = "", limits: Limits = DEFAULT_LIMITS
) -> list[Violation]:
    """Every problem of ``value`` against ``schema`` and ``limits``; empty when valid.

    Paths start at ``path`` (``""`` gives ``.field`` style paths without a root name).
    Stops descending where a value has the wrong type or is nested too deep, so the work is
    bounded by the size of ``value``.
    """
    out: list[Violation] = []
    _walk(value, schema, path, 0, limits, out)
    return out


def schema_problems(
    value: Any,
    schema: Mapping[str, Any],
    path: str = "output",
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> list[str]:
    """``validate`` as ``"<path>: <problem>"`` strings (the coordinator's historic API)."""
    return [str(v) for v in validate(value, schema, path=path, limits=limits)]
