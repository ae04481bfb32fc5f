"""Cedar policy sets: load + validate once, evaluate many times. Pure logic, no I/O besides
reading the policy directory in :func:`load_policy_dir`.

A policy directory holds ``schema.cedarschema`` and ``policies/*.cedar``. Loading parses the
schema and every file, validates the whole set against the schema and checks Tessera's own
rules (every policy has a unique ``@id``; ``@approval("required")`` only on permits; no
templates). The result, :class:`LoadedPolicySet`, keeps pre-parsed cedarpy ``PolicySet`` and
``Schema`` handles, so a decision never re-parses anything.

Decisions (:func:`evaluate`) fail closed: only a Cedar Allow with no evaluation error allows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    import cedarpy

# cedarpy (~55 ms of CPU to import) is imported inside the functions that parse or evaluate
# Cedar: a tool proxy in remote policy mode imports this module for its types only, and
# its start-up time is its restart time. A missing cedarpy still fails the first policy
# load, before anything serves.

__all__ = [
    "CONTEXT_DEFAULTS",
    "CheckInput",
    "Fingerprint",
    "LoadedPolicySet",
    "PolicyInfo",
    "PolicyLoadError",
    "RequestInvalid",
    "Verdict",
    "evaluate",
    "fingerprint",
    "load_policy_dir",
]

SCHEMA_FILE = "schema.cedarschema"
POLICIES_DIR = "policies"
APPROVAL_REQUIRED = "required"
# Context values the service supplies when the caller leaves them out (safe defaults).
CONTEXT_DEFAULTS: Mapping[str, Mapping[str, Any]] = {"call_tool": {"approval": "none"}}
APPROVAL_VALUES = ("none", "approved")
# Context keys the service accepts but never hands to Cedar (no `any` type in Cedar).
OPAQUE_CONTEXT_KEYS = ("arguments",)
# Set by the service from its own clock; a caller-supplied value is ignored.
SERVER_CONTEXT_KEYS = ("hour",)
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_REQUEST_ERRORS = ("failed to parse entities", "failed to build request")
_MAX_CACHED_ENTITY_SETS = 4096
_MAX_CACHED_VERDICTS = 4096
_V = TypeVar("_V")

Decision = Literal["allow", "deny", "approval_required"]
Fingerprint = tuple[tuple[str, int, int], ...]


class PolicyLoadError(Exception):
    """A policy directory that must not serve. ``errors`` are (subject, description)
    pairs: the subject is a file, or ``<file>#<policy @id>``."""

    def __init__(self, errors: Sequence[tuple[str, str]]) -> None:
        self.errors: tuple[tuple[str, str], ...] = tuple(errors)
        super().__init__("; ".join(f"{s}: {d}" for s, d in self.errors))


class RequestInvalid(Exception):
    """The request cannot be evaluated; ``violations`` are (field path, description)."""

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations: tuple[tuple[str, str], ...] = tuple(violations)
        super().__init__("; ".join(f"{f}: {d}" for f, d in self.violations))


@dataclass(frozen=True)
class PolicyInfo:
    id: str
    """The ``@id`` annotation (what responses and audit records name)."""
    effect: str
    file: str
    approval_required: bool = False
    reason: str = ""
    quorum: int = 1
    """``@quorum("N")`` on a permit: the action needs N distinct principals to agree
    (gate approvals; the coordinator counts them)."""


MAX_QUORUM = 10


@dataclass(frozen=True)
class LoadedPolicySet:
    version: str
    """Content hash of the schema and policy files (``sha256:`` + 16 hex digits)."""
    policy_set: cedarpy.PolicySet = field(repr=False)
    schema: cedarpy.Schema = field(repr=False)
    policies: Mapping[str, PolicyInfo] = field(repr=False)
    """Cedar's positional id (``policy0``…) → what we know about that policy."""
    load_time: datetime
    fingerprint: Fingerprint = ()
    sources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    """Cedar's positional id → that policy's JSON form (EST), so one policy can be
    evaluated alone (``tessera policy test`` coverage); never used to decide."""
    schema_text: str = field(default="", repr=False)
    files: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """The texts it was built from, ``(path, Cedar text)`` in load order: what the policy
    service distributes (tessera/policy/distribution.py)."""
    entities: OrderedDict[str, cedarpy.Entities] = field(
        default_factory=OrderedDict, repr=False, compare=False
    )
    """Entity sets parsed against this schema, by their JSON (DESIGN.md, Hot path: entities
    are parsed once and reused): a caller's principal and tool entities repeat."""
    verdicts: OrderedDict[str, Verdict] = field(
        default_factory=OrderedDict, repr=False, compare=False
    )
    """Verdicts by the JSON of their Cedar request and entities. Cedar is a pure function
    of the policy set, the schema, the entities and the request (time reaches it only as
    ``context.hour``), and a reload builds a new set: a verdict can be reused as long as
    this set serves. A task token's calls of one tool repeat the same request (arguments
    are opaque to Cedar; amounts and prices are in the key)."""

    @property
    def policy_ids(self) -> tuple[str, ...]:
        return tuple(sorted(p.id for p in self.policies.values()))

    def parsed_entities(self, entities_json: str) -> cedarpy.Entities | None:
        """Entities (their :func:`canonical_json`) parsed and validated against the schema
        (cached), or None when they do not parse (the caller then lets Cedar report why)."""
        import cedarpy

        parsed = _lru_get(self.entities, entities_json)
        if parsed is not None:
            return parsed
        try:
            parsed = cedarpy.Entities.from_json_str(entities_json, self.schema)
        except ValueError:
            return None
        _lru_put(self.entities, entities_json, parsed, _MAX_CACHED_ENTITY_SETS)
        return parsed


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _lru_get(cache: OrderedDict[str, _V], key: str) -> _V | None:
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _lru_put(cache: OrderedDict[str, _V], key: str, value: _V, limit: int) -> None:
    cache[key] = value
    while len(cache) > limit:
        cache.popitem(last=False)


@dataclass(frozen=True)
class CheckInput:
    """A request in Python values (from the proto or a test case)."""

    principal_type: str
    principal_id: str
    action: str
    resource_type: str
    resource_id: str
    principal_attrs: Mapping[str, Any] = field(default_factory=dict)
    resource_attrs: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    principal_groups: tuple[str, ...] = ()
    """``Group`` entities the principal is in (a person's groups, from their token)."""


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    determining_policies: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    approval_reason: str = ""
    quorum: int = 1
    """The largest ``@quorum`` of the permits that allowed it."""


# -- loading -------------------------------------------------------------------------------


def _policy_files(root: Path) -> list[Path]:
    return sorted((root / POLICIES_DIR).glob("*.cedar"))


def fingerprint(root: Path) -> Fingerprint:
    """(name, mtime_ns, size) of every input file: cheap enough to poll every second."""
    out: list[tuple[str, int, int]] = []
    for path in [root / SCHEMA_FILE, *_policy_files(root)]:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out.append((str(path.relative_to(root)), st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_policy_dir(root: Path) -> LoadedPolicySet:
    """Parse and validate ``root``; raises :class:`PolicyLoadError` listing every problem."""
    before = fingerprint(root)
    schema_path = root / SCHEMA_FILE
    try:
        schema_text = schema_path.read_text()
    except OSError as exc:
        raise PolicyLoadError([(SCHEMA_FILE, f"cannot read: {exc.strerror}")]) from exc
    files = [(str(p.relative_to(root)), p.read_text()) for p in _policy_files(root)]
    loaded = build_policy_set(schema_text, files)
    return LoadedPolicySet(
        version=loaded.version,
        policy_set=loaded.policy_set,
        schema=loaded.schema,
        policies=loaded.policies,
        load_time=loaded.load_time,
        fingerprint=before,
        sources=loaded.sources,
        schema_text=loaded.schema_text,
        files=loaded.files,
    )


def _annotation(annotations: Mapping[str, str], key: str) -> str | None:
    value = annotations.get(key)
    return None if value is None else str(value)


def build_policy_set(schema_text: str, files: Sequence[tuple[str, str]]) -> LoadedPolicySet:
    """Build a set from schema text and ``(file name, Cedar text)`` pairs (in order)."""
    import cedarpy

    errors: list[tuple[str, str]] = []
    try:
        schema = cedarpy.Schema.from_str(schema_text)
    except ValueError as exc:
        raise PolicyLoadError([(SCHEMA_FILE, f"invalid schema: {exc}")]) from exc
    if not files:
        raise PolicyLoadError([(POLICIES_DIR, "no *.cedar files: refusing an empty policy set")])

    owners: list[str] = []  # positional policy index -> file
    for name, text in files:
        try:
            count = len(cedarpy.PolicySet.from_str(text))
        except ValueError as exc:
            errors.append((name, f"parse error: {exc}"))
            continue
        owners.extend([name] * count)
    if errors:
        raise PolicyLoadError(errors)

    combined = "\n".join(text for _, text in files)
    policy_set = cedarpy.PolicySet.from_str(combined)
    est = json.loads(cedarpy.policies_to_json_str(combined))
    if est.get("templates"):
        errors.append((POLICIES_DIR, "templates are not supported: link them in the files"))
    static: dict[str, Any] = est.get("staticPolicies", {})
    policies: dict[str, PolicyInfo] = {}
    seen: dict[str, str] = {}
    for cedar_id, body in static.items():
        index = int(cedar_id.removeprefix("policy"))
        owner = owners[index] if index < len(owners) else POLICIES_DIR
        annotations: dict[str, str] = body.get("annotations") or {}
        policy_id = _annotation(annotations, "id")
        if not policy_id:
            errors.append((owner, f'{cedar_id} (policy #{index + 1}) has no @id("...")'))
            continue
        if policy_id in seen:
            errors.append((f"{owner}#{policy_id}", f"@id also used in {seen[policy_id]}"))
        seen[policy_id] = owner
        approval = _annotation(annotations, "approval")
        if approval is not None and approval != APPROVAL_REQUIRED:
            errors.append((f"{owner}#{policy_id}", f'@approval must be "{APPROVAL_REQUIRED}"'))
        if approval is not None and body.get("effect") != "permit":
            errors.append((f"{owner}#{policy_id}", "@approval only makes sense on a permit"))
        quorum_text = _annotation(annotations, "quorum")
        quorum = 1
        if quorum_text is not None:
            if not quorum_text.isdigit() or not 1 <= int(quorum_text) <= MAX_QUORUM:
                errors.append((f"{owner}#{policy_id}", f'@quorum must be "1" to "{MAX_QUORUM}"'))
            elif body.get("effect") != "permit":
                errors.append((f"{owner}#{policy_id}", "@quorum only makes sense on a permit"))
            else:
                quorum = int(quorum_text)
        policies[cedar_id] = PolicyInfo(
            id=policy_id,
            effect=str(body.get("effect", "")),
            file=owner,
            approval_required=approval == APPROVAL_REQUIRED,
            reason=_annotation(annotations, "reason") or "",
            quorum=quorum,
        )

    validation = cedarpy.validate_policies(combined, schema)
    for error in validation.errors:
        info = policies.get(error.policy_id)
        subject = f"{info.file}#{info.id}" if info else (error.policy_id or POLICIES_DIR)
        errors.append((subject, error.error))
    if errors:
        raise PolicyLoadError(errors)

    digest = hashlib.sha256(schema_text.encode())
    for name, text in files:
        digest.update(b"\0" + name.encode() + b"\0" + text.encode())
    return LoadedPolicySet(
        version="sha256:" + digest.hexdigest()[:16],
        policy_set=policy_set,
        schema=schema,
        policies=policies,
        load_time=datetime.now(UTC),
        sources={cedar_id: static[cedar_id] for cedar_id in policies},
        schema_text=schema_text,
        files=tuple(files),
    )


# -- evaluation ----------------------------------------------------------------------------


def to_cedar(value: Any, path: str, violations: list[tuple[str, str]]) -> Any:
    """A JSON-like value (from a protobuf Struct) as a Cedar JSON value.

    Cedar has no floats and no null: integral numbers become Longs, anything else is a
    violation. Objects become records, lists become sets. Keys starting with ``__`` are
    refused (Cedar's JSON reserves ``__entity``/``__extn`` escapes).
    """
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if not math.isfinite(value) or value != int(value):
            violations.append((path, f"must be a whole number (no decimals in Cedar): {value}"))
            return None
        number = int(value)
        if not _LONG_MIN <= number <= _LONG_MAX:
            violations.append((path, "out of the 64-bit integer range"))
            return None
        return number
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if str(key).startswith("__"):
                violations.append((f"{path}.{key}", "keys starting with '__' are reserved"))
                continue
            out[str(key)] = to_cedar(item, f"{path}.{key}", violations)
        return out
    if isinstance(value, list | tuple):
        return [to_cedar(item, f"{path}[{i}]", violations) for i, item in enumerate(value)]
    if value is None:
        violations.append((path, "null is not a Cedar value"))
        return None
    violations.append((path, f"unsupported value of type {type(value).__name__}"))
    return None


def _entity(
    type_: str, id_: str, attrs: Mapping[str, Any], groups: Sequence[str] = ()
) -> dict[str, Any]:
    parents = [{"type": "Group", "id": g} for g in groups]
    return {"uid": {"type": type_, "id": id_}, "attrs": dict(attrs), "parents": parents}


def prepare(req: CheckInput, *, hour: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Cedar request and entities for ``req``; raises :class:`RequestInvalid`."""
    violations: list[tuple[str, str]] = []
    for path, value in (
        ("principal.type", req.principal_type),
        ("principal.id", req.principal_id),
        ("action", req.action),
        ("resource.type", req.resource_type),
        ("resource.id", req.resource_id),
    ):
        if not value:
            violations.append((path, "required"))
    principal_attrs = to_cedar(dict(req.principal_attrs), "principal.attributes", violations)
    resource_attrs = to_cedar(dict(req.resource_attrs), "resource.attributes", violations)
    if req.resource_type == "Tool":
        name = resource_attrs.get("name", req.resource_id)
        if name != req.resource_id:
            violations.append(("resource.attributes.name", "must equal resource.id (or be unset)"))
        resource_attrs["name"] = req.resource_id
    context: dict[str, Any] = dict(CONTEXT_DEFAULTS.get(req.action, {}))
    for key, value in req.context.items():
        if key in OPAQUE_CONTEXT_KEYS:
            if not isinstance(value, Mapping):
                violations.append((f"context_attributes.{key}", "must be an object"))
            continue
        if key in SERVER_CONTEXT_KEYS:
            continue
        context[key] = to_cedar(value, f"context_attributes.{key}", violations)
    context["hour"] = hour
    if req.action == "call_tool" and context.get("approval") not in APPROVAL_VALUES:
        violations.append(
            ("context_attributes.approval", f"must be one of {', '.join(APPROVAL_VALUES)}")
        )
    if violations:
        raise RequestInvalid(violations)
    request = {
        "principal": {"type": req.principal_type, "id": req.principal_id},
        "action": {"type": "Action", "id": req.action},
        "resource": {"type": req.resource_type, "id": req.resource_id},
        "context": context,
    }
    groups = sorted(set(req.principal_groups))
    entities = [
        _entity(req.principal_type, req.principal_id, principal_attrs, groups),
        _entity(req.resource_type, req.resource_id, resource_attrs),
    ]
    entities += [_entity("Group", g, {}) for g in groups]
    return request, entities


def _diagnose(
    ps: LoadedPolicySet, entities: list[dict[str, Any]], errors: Sequence[str]
) -> RequestInvalid:
    """Turn Cedar's request errors into field violations (only on the error path)."""
    import cedarpy

    violations: list[tuple[str, str]] = []
    for label, entity in zip(("principal", "resource"), entities[:2], strict=True):
        try:
            cedarpy.Entities.from_json_str(json.dumps([entity]), ps.schema)
        except ValueError:
            uid = f'{entity["uid"]["type"]}::"{entity["uid"]["id"]}"'
            detail = next((e for e in errors if uid in e), "does not conform to the schema")
            violations.append((label, detail.rsplit("]: ", 1)[-1]))
    if not violations:
        for error in errors:
            detail = error.removeprefix("failed to build request: ")
            target = "action" if detail.startswith("action") or "action `" in detail[:20] else ""
            violations.append((target or "context_attributes", detail))
    return RequestInvalid(violations)


def evaluate(ps: LoadedPolicySet, req: CheckInput, *, hour: int) -> Verdict:
    """Decide ``req``. Only an explicit Allow without evaluation errors allows; a Deny
    names the forbids that matched (none: default deny). Raises :class:`RequestInvalid`
    for a request Cedar cannot evaluate against the schema (wrong types, unknown action)."""
    request, entities = prepare(req, hour=hour)
    entities_json = canonical_json(entities)
    key = entities_json + canonical_json(request)
    verdict = _lru_get(ps.verdicts, key)
    if verdict is None:
        verdict = _evaluate(ps, request, entities, entities_json)
        _lru_put(ps.verdicts, key, verdict, _MAX_CACHED_VERDICTS)
    return verdict


def _evaluate(
    ps: LoadedPolicySet,
    request: dict[str, Any],
    entities: list[dict[str, Any]],
    entities_json: str,
) -> Verdict:
    import cedarpy

    parsed = ps.parsed_entities(entities_json)
    result = cedarpy.is_authorized(
        request, ps.policy_set, entities if parsed is None else parsed, schema=ps.schema
    )
    errors = tuple(result.diagnostics.errors)
    reasons = [ps.policies[r] for r in result.diagnostics.reasons if r in ps.policies]
    ids = tuple(p.id for p in reasons)
    if result.decision == cedarpy.Decision.NoDecision:
        if errors and all(e.startswith(_REQUEST_ERRORS) for e in errors):
            raise _diagnose(ps, entities, errors)
        return Verdict("deny", ids, errors or ("no decision",))
    if result.decision != cedarpy.Decision.Allow:
        return Verdict("deny", ids, errors)
    if errors:
        # A policy that failed to evaluate is skipped by Cedar; if it was a forbid, the
        # Allow might be wrong. Fail closed.
        return Verdict("deny", ids, errors)
    approvals = [p for p in reasons if p.approval_required]
    if approvals:
        reason = next((p.reason for p in approvals if p.reason), "approval required")
        return Verdict("approval_required", ids, (), reason)
    quorum = max((p.quorum for p in reasons if p.effect == "permit"), default=1)
    return Verdict("allow", ids, quorum=quorum)
