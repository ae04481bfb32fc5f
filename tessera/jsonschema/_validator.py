"""Draft 2020-12 validation with the ``jsonschema`` library, fenced for hostile input.

The library decides what a schema means. Around it, this module:

* checks each schema once (meta-schema, ``$ref`` targets, its own size) and caches the
  compiled validator by the schema's JSON text;
* resolves ``$ref`` only inside the schema and against the draft meta-schemas: the
  library's default would fetch remote ``http(s)`` references (SSRF);
* meters keyword evaluations per value and never runs ``pattern`` on a string the same
  schema already refuses as too long (``maxLength``), as the home-made validator did;
* turns library errors into :class:`Violation` paths and descriptions that name what is
  wrong without echoing the value (library messages start with the value's ``repr``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any
from urllib.parse import urljoin

import referencing.exceptions
from jsonschema import Draft202012Validator, ValidationError, validators

# Private, but the only way to know which properties the other keywords evaluated; the
# exact pin in pyproject.toml and the unevaluatedProperties tests guard it.
from jsonschema._utils import find_evaluated_property_keys_by_schema
from jsonschema.exceptions import best_match
from jsonschema_specifications import REGISTRY as SPECIFICATIONS
from referencing.jsonschema import DRAFT202012

from tessera.jsonschema._formats import FormatProblem, format_checker, meta_format_checker
from tessera.jsonschema._limits import (
    MAX_VIOLATIONS,
    SCHEMA_LIMITS,
    Limits,
    Violation,
    limit_violations,
)

__all__ = ["SchemaError", "check_schema", "iter_violations"]

Keyword = Callable[[Any, Any, Any, Mapping[str, Any]], Iterator[ValidationError] | None]


class SchemaError(ValueError):
    """The schema itself is unusable: not draft 2020-12, a ``$ref`` that does not resolve
    (or loops without consuming the value), or too large. Not the value's fault."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(str(v) for v in self.violations))


class _OverBudget(Exception):
    pass


class _Budget:
    __slots__ = ("left",)

    def __init__(self, evaluations: int) -> None:
        self.left = evaluations


_BUDGET: ContextVar[_Budget | None] = ContextVar("tessera_jsonschema_budget", default=None)


def _metered(keyword: Keyword) -> Keyword:
    def run(
        validator: Any, value: Any, instance: Any, schema: Mapping[str, Any]
    ) -> Iterator[ValidationError] | None:
        budget = _BUDGET.get()
        if budget is not None:
            budget.left -= 1
            if budget.left < 0:
                raise _OverBudget
        return keyword(validator, value, instance, schema)

    return run


# The overrides below report one violation per offending property, at that property's
# path: a gRPC field violation per field, where the library reports one message per object.


def _required(
    validator: Any, required: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "object"):
        for name in required:
            if name not in instance:
                yield ValidationError("required", path=[name])


def _dependent_required(
    validator: Any, dependent: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "object"):
        for present, names in dependent.items():
            if present in instance:
                for name in names:
                    if name not in instance:
                        yield ValidationError(f"required when {present!r} is present", path=[name])


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    for name in instance:
        if name in known or any(re.search(p, name) for p in patterns):
            continue
        if additional is False:
            yield ValidationError("unknown field", path=[name])
        else:
            yield from validator.descend(instance[name], additional, path=name)


def _unevaluated_properties(
    validator: Any, unevaluated: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    evaluated = find_evaluated_property_keys_by_schema(validator, instance, schema)
    for name in instance:
        if name in evaluated:
            continue
        if unevaluated is False:
            yield ValidationError("unknown field", path=[name])
        else:
            yield from validator.descend(instance[name], unevaluated, path=name, schema_path=name)


_LIBRARY_KEYWORDS: dict[str, Keyword] = dict(Draft202012Validator.VALIDATORS)


def _pattern(
    validator: Any, pattern: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError] | None:
    limit = schema.get("maxLength")
    if isinstance(instance, str) and isinstance(limit, int | float) and len(instance) > limit:
        return None  # maxLength refuses it; a regex on it would only be a backtracking risk
    return _LIBRARY_KEYWORDS["pattern"](validator, pattern, instance, schema)


_OVERRIDES: dict[str, Keyword] = {
    "required": _required,
    "dependentRequired": _dependent_required,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
    "pattern": _pattern,
}

_Validator = validators.extend(
    Draft202012Validator,
    validators={
        name: _metered(_OVERRIDES.get(name, keyword)) for name, keyword in _LIBRARY_KEYWORDS.items()
    },
)
_FORMATS = format_checker()
_META = Draft202012Validator(
    Draft202012Validator.META_SCHEMA, format_checker=meta_format_checker(), registry=SPECIFICATIONS
)


# -- describing errors ------------------------------------------------------------------

_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "dependentSchemas", "dependentRequired"}
)


def _render(base: str, path: Sequence[Any]) -> str:
    parts = [base]
    for part in path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts)


def _about_a_key(error: ValidationError) -> bool:
    schema_path = list(error.schema_path)
    return any(
        part == "propertyNames" and (i == 0 or schema_path[i - 1] not in _SCHEMA_MAPS)
        for i, part in enumerate(schema_path)
    )


def _closest(error: ValidationError, base: str) -> str:
    if not error.context:
        return ""
    best = best_match(error.context)
    return f" (closest: {_render(base, best.absolute_path)}: {_describe(best, base)})"


def _describe(error: ValidationError, base: str) -> str:
    keyword, v = error.validator, error.validator_value
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    simple: dict[str, Callable[[], str]] = {
        "type": lambda: f"expected {v}" if isinstance(v, str) else f"expected one of {list(v)}",
        "enum": lambda: f"not one of {v}",
        "const": lambda: f"must be {v!r}",
        "required": lambda: error.message,
        "dependentRequired": lambda: error.message,
        "additionalProperties": lambda: error.message,
        "unevaluatedProperties": lambda: error.message,
        "unevaluatedItems": lambda: "unevaluated items are not allowed",
        "items": lambda: f"at most {len(schema.get('prefixItems', []))} items allowed",
        "minLength": lambda: f"shorter than {v} characters",
        "maxLength": lambda: f"longer than {v} characters",
        "pattern": lambda: f"does not match {v!r}",
        "format": lambda: (
            str(error.cause) if isinstance(error.cause, FormatProblem) else f"not a valid {v}"
        ),
        "minimum": lambda: f"below minimum {v}",
        "maximum": lambda: f"above maximum {v}",
        "exclusiveMinimum": lambda: f"must be above {v}",
        "exclusiveMaximum": lambda: f"must be below {v}",
        "multipleOf": lambda: f"not a multiple of {v}",
        "minItems": lambda: f"fewer than {v} items",
        "maxItems": lambda: f"more than {v} items",
        "uniqueItems": lambda: "items are not unique",
        "contains": lambda: f"fewer than {schema.get('minContains', 1)} items match 'contains'",
        "minContains": lambda: f"fewer than {v} items match 'contains'",
        "maxContains": lambda: f"more than {v} items match 'contains'",
        "minProperties": lambda: f"fewer than {v} keys",
        "maxProperties": lambda: f"more than {v} keys",
        "not": lambda: "must not match the 'not' schema",
        "anyOf": lambda: "matches none of the 'anyOf' schemas" + _closest(error, base),
        "oneOf": lambda: (
            "matches none of the 'oneOf' schemas" + _closest(error, base)
            if error.context
            else "matches more than one of the 'oneOf' schemas"
        ),
    }
    if keyword is None:
        text = "not allowed"  # the false schema
    elif keyword in simple:
        text = simple[keyword]()
    else:
        text = f"fails {keyword!r}"
    return f"property name {text}" if _about_a_key(error) else text


def _violation(error: ValidationError, base: str) -> Violation:
    where = list(error.absolute_path)
    if _about_a_key(error) and isinstance(error.instance, str):
        where.append(error.instance)  # the key itself is what fails (already screened)
    return Violation(_render(base, where), _describe(error, base))


# -- checking schemas --------------------------------------------------------------------

_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _unresolved_refs(schema: Any, base: str) -> list[Violation]:
    """``$ref`` values that resolve neither inside ``schema`` nor to a draft meta-schema."""
    if not isinstance(schema, dict):
        return []
    root = DRAFT202012.create_resource(schema)
    registry = SPECIFICATIONS.with_resource(root.id() or "", root).crawl()
    out: list[Violation] = []

    def walk(node: Any, path: list[Any], uri: str) -> None:
        if isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, [*path, index], uri)
            return
        if not isinstance(node, dict):
            return
        if isinstance(node.get("$id"), str):
            uri = urljoin(uri, node["$id"])
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                registry.resolver(base_uri=uri).lookup(ref)
            except referencing.exceptions.Unresolvable:
                out.append(
                    Violation(
                        _render(base, [*path, "$ref"]),
                        f"{ref!r} does not resolve (only references inside the schema are "
                        "followed, never fetched)",
                    )
                )
        for key, item in node.items():
            if key not in _DATA_KEYWORDS:
                walk(item, [*path, key], uri)

    walk(schema, [], root.id() or "")
    return out


class _Compiled:
    __slots__ = ("problems", "validator")

    def __init__(self, validator: Any, problems: Sequence[Violation]) -> None:
        self.validator = validator
        self.problems = tuple(problems)


def _schema_text(schema: Any, path: str) -> str:
    """The schema's JSON text: the cache key, and the only form the library is given (a
    snapshot, so a caller mutating its dict afterwards cannot desynchronise the cache)."""

    def plain(node: Any) -> Any:
        if isinstance(node, Mapping):
            return dict(node)
        raise TypeError(type(node).__name__)

    try:
        return json.dumps(schema, default=plain, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SchemaError([Violation(path, f"not JSON ({type(exc).__name__})")]) from None


_ROOT = "schema"


def _integral(text: str) -> float | int:
    number = float(text)
    return int(number) if number.is_integer() else number


@functools.lru_cache(maxsize=512)
def _compile(text: str) -> _Compiled:
    # A schema that crossed a protobuf Struct has only floats: 20.0 means 20 to the draft,
    # and reads as 20 in a description ("longer than 20 characters").
    schema = json.loads(text, parse_float=_integral)
    problems = limit_violations(schema, _ROOT, SCHEMA_LIMITS)
    if not problems:
        problems = list(dict.fromkeys(_violation(e, _ROOT) for e in _META.iter_errors(schema)))
        problems = problems[:MAX_VIOLATIONS]
    if not problems:
        problems = _unresolved_refs(schema, _ROOT)
    if problems:
        return _Compiled(None, problems)
    return _Compiled(_Validator(schema, format_checker=_FORMATS, registry=SPECIFICATIONS), [])


def _compiled(schema: Any, path: str) -> _Compiled:
    compiled = _compile(_schema_text(schema, path))
    if compiled.problems:
        raise SchemaError(
            [Violation(path + v.path[len(_ROOT) :], v.description) for v in compiled.problems]
        )
    return compiled


def check_schema(schema: Mapping[str, Any] | bool, *, path: str = "schema") -> None:
    """Raise :class:`SchemaError` (every problem, at its path under ``path``) unless
    ``schema`` is a usable draft 2020-12 schema. Cached: cheap to call again."""
    _compiled(schema, path)


def iter_violations(
    value: Any, schema: Mapping[str, Any] | bool, *, path: str, limits: Limits
) -> list[Violation]:
    """See :func:`tessera.jsonschema.validate`."""
    compiled = _compiled(schema, "schema")
    found = limit_violations(value, path, limits)
    if found:
        return found
    token = _BUDGET.set(_Budget(limits.max_evaluations))
    try:
        for error in compiled.validator.iter_errors(value):
            violation = _violation(error, path)
            if violation not in found:  # allOf branches can repeat one problem
                found.append(violation)
            if len(found) >= MAX_VIOLATIONS:
                break
    except _OverBudget:
        found.append(
            Violation(path, f"too costly to check (over {limits.max_evaluations} evaluations)")
        )
    except RecursionError:
        raise SchemaError([Violation("schema", "a $ref cycle that never descends")]) from None
    except referencing.exceptions.Unresolvable as exc:
        raise SchemaError([Violation("schema", f"unresolvable reference ({exc})")]) from None
    finally:
        _BUDGET.reset(token)
    return found
