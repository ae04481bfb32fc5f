"""The one JSON Schema validator for untrusted JSON: tool arguments at the tool proxy and
agent outputs at the coordinator (docs/decisions.md, "One JSON Schema validator").

Schemas mean what draft 2020-12 says (the maintained ``jsonschema`` library,
``Draft202012Validator``): ``$defs``/``$ref``, ``prefixItems``, ``unevaluatedProperties``,
``dependentRequired``, ``if``/``then``/``else`` and the rest. Around the library:

1. :class:`Limits` run first, on every value whatever the schema says: nesting depth,
   string length, key and item counts, and, in every string and key, NUL and other control
   characters (tab, CR and LF are allowed in values), bidirectional overrides ("Trojan
   Source") and zero-width characters in keys. A value that breaks them is refused with
   those problems only; the library never sees it.
2. ``format`` is asserted, and Tessera's formats are security checks (``identifier``,
   ``path``, ``hostname``, ``uri``/``url``, ``email``, ``date``/``date-time``; see
   ``_formats.py``).
3. Schemas are checked too (meta-schema, ``$ref`` targets, size): an unusable one raises
   :class:`SchemaError` naming where it is wrong; references are never fetched.

Every problem of a value is a :class:`Violation` (path like ``arguments.items[2].name``,
description); descriptions do not repeat the offending value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tessera.jsonschema._formats import host_problem
from tessera.jsonschema._limits import DEFAULT_LIMITS, Limits, Violation
from tessera.jsonschema._validator import SchemaError, check_schema, iter_violations

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "SchemaError",
    "Violation",
    "check_schema",
    "host_problem",
    "schema_problems",
    "validate",
]


def validate(
    value: Any,
    schema: Mapping[str, Any] | bool,
    *,
    path: str = "",
    limits: Limits = DEFAULT_LIMITS,
) -> list[Violation]:
    """Every problem of ``value`` against ``schema`` and ``limits`` (at most 100); empty
    when valid.

    Paths start at ``path`` (``""`` gives ``.field`` style paths without a root name). The
    work is bounded by ``limits`` whatever the value and the schema. Raises
    :class:`SchemaError` only when the schema itself is unusable; a bad value never raises.
    """
    return iter_violations(value, schema, path=path, limits=limits)


def schema_problems(
    value: Any,
    schema: Mapping[str, Any] | bool,
    path: str = "output",
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> list[str]:
    """``validate`` as ``"<path>: <problem>"`` strings (the coordinator's historic API)."""
    return [str(v) for v in validate(value, schema, path=path, limits=limits)]
