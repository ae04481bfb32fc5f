"""Hostile-input limits, checked on every value before the JSON Schema library sees it.

The library recurses per nesting level, runs ``pattern`` on whole strings and walks every
key and item; bounding depth, sizes and characters first keeps its work (and its stack)
bounded by these limits, whatever the schema says.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_LIMITS",
    "SCHEMA_LIMITS",
    "Limits",
    "Violation",
    "limit_violations",
    "shown_key",
]


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
    max_evaluations: int = 25_000
    """Schema keywords evaluated for one value: ``$ref`` chains and nested ``allOf`` can
    make the work grow much faster than the value, so it is metered as well. An evaluation
    costs the library some 4-10 µs, so this bounds one check to a few tenths of a second;
    a valid 1,024-item array of small objects needs about 10,000."""


DEFAULT_LIMITS = Limits()

SCHEMA_LIMITS = Limits(max_depth=32, max_string_length=16_384, max_keys=1024)
"""A schema nests about twice as deep as the values it describes (``properties`` then the
property), and carries descriptions; it is still untrusted when an MCP server or an agent's
contract supplies it."""

MAX_VIOLATIONS = 100
"""Problems reported for one value at most (a caller needs the first ones, not all)."""

_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad")
_ALLOWED_CONTROLS = frozenset("\t\n\r")


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


def shown_key(key: str, limits: Limits) -> str:
    """``key`` as it may appear in a path: escaped and cut when it could mislead a reader."""
    if key.isprintable() and len(key) <= limits.max_key_length:
        return key
    return repr(key)[:40]


def limit_violations(value: Any, path: str, limits: Limits) -> list[Violation]:
    """What in ``value`` breaks ``limits`` (and is not JSON at all); empty when nothing."""
    out: list[Violation] = []
    _scan(value, path, 0, limits, out)
    return out[:MAX_VIOLATIONS]


def _scan(value: Any, path: str, depth: int, limits: Limits, out: list[Violation]) -> None:
    if len(out) >= MAX_VIOLATIONS:
        return
    if depth > limits.max_depth:
        out.append(Violation(path, f"nested deeper than {limits.max_depth} levels"))
    elif value is None or isinstance(value, bool | int):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            out.append(Violation(path, "not a finite number"))
    elif isinstance(value, str):
        if len(value) > limits.max_string_length:
            out.append(Violation(path, f"longer than {limits.max_string_length} characters"))
            return
        problem = _char_problem(value, key=False)
        if problem:
            out.append(Violation(path, problem))
    elif isinstance(value, dict):
        _scan_object(value, path, depth, limits, out)
    elif isinstance(value, list):
        if len(value) > limits.max_items:
            out.append(Violation(path, f"more than {limits.max_items} items"))
            return
        for index, item in enumerate(value):
            _scan(item, f"{path}[{index}]", depth + 1, limits, out)
    else:
        out.append(Violation(path, f"not a JSON value ({type(value).__name__})"))


def _scan_object(
    value: dict[Any, Any], path: str, depth: int, limits: Limits, out: list[Violation]
) -> None:
    if len(value) > limits.max_keys:
        out.append(Violation(path, f"more than {limits.max_keys} keys"))
        return
    for key, item in value.items():
        if not isinstance(key, str):
            out.append(Violation(path, "object keys must be strings"))
            continue
        sub_path = f"{path}.{shown_key(key, limits)}"
        if len(key) > limits.max_key_length:
            out.append(Violation(sub_path, f"key longer than {limits.max_key_length}"))
            continue
        problem = _char_problem(key, key=True)
        if problem:
            out.append(Violation(sub_path, f"key {problem}"))
            continue
        _scan(item, sub_path, depth + 1, limits, out)
