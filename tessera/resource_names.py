"""Resource names of the public API (AIP-122): ``workflows/{workflow}`` and
``workflows/{workflow}/gates/{gate}``, parsed in one place for every service that takes
them (a malformed name is INVALID_ARGUMENT with a field violation)."""

from __future__ import annotations

import re

from tessera.runtime.errors import InvalidArgument

__all__ = ["gate_name", "workflow_id"]

_WORKFLOW = re.compile(r"^workflows/([A-Za-z0-9_-]{1,64})$")
_GATE = re.compile(r"^workflows/([A-Za-z0-9_-]{1,64})/gates/([A-Za-z0-9_.~-]{1,128})$")


def workflow_id(name: str, field: str = "name") -> str:
    """``workflows/{id}`` → ``id``."""
    match = _WORKFLOW.match(name)
    if not match:
        raise InvalidArgument(
            f"{field} must look like workflows/{{workflow}}",
            field_violations=[(field, f"malformed workflow name {name!r}")],
        )
    return match.group(1)


def gate_name(name: str) -> tuple[str, str]:
    """``workflows/{id}/gates/{gate}`` → ``(id, gate)``."""
    match = _GATE.match(name)
    if not match:
        raise InvalidArgument(
            "name must look like workflows/{workflow}/gates/{gate}",
            field_violations=[("name", f"malformed gate name {name!r}")],
        )
    return match.group(1), match.group(2)
