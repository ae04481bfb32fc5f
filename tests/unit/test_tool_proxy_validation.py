"""Argument validation (tessera.jsonschema) against hostile input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.tool_proxy.settings import ToolProxySettings
from tessera.jsonschema import Limits, host_problem, schema_problems, validate

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "identifier"},
        "path": {"type": "string", "format": "path"},
        "url": {"type": "string", "format": "url"},
        "host": {"type": "string", "format": "hostname"},
        "n": {"type": "integer", "minimum": 1, "maximum": 10},
        "text": {"type": "string", "maxLength": 100},
        "any": {},
    },
    "required": ["id"],
    "additionalProperties": False,
}


def paths(value: Any, schema: dict[str, Any] = SCHEMA, **kw: Any) -> list[str]:
    return [v.path for v in validate(value, schema, path="arguments", **kw)]


def test_valid_arguments_pass() -> None:
    ok = {
        "id": "c-1",
        "path": "reports/q1.csv",
        "url": "https://example.com/x",
        "host": "api.example.com",
        "n": 3.0,
        "text": "line\nnext\ttab",
    }
    assert validate(ok, SCHEMA) == []


@pytest.mark.parametrize(
    ("args", "path"),
    [
        ({}, "arguments.id"),
        ({"id": "c-1", "extra": 1}, "arguments.extra"),
        ({"id": "c 1"}, "arguments.id"),
        ({"id": "c\u200b1"}, "arguments.id"),
        ({"id": "\u0441-1"}, "arguments.id"),  # Cyrillic look-alike
        ({"id": "c-1", "text": "abc\u202edef"}, "arguments.text"),
        ({"id": "c-1", "text": "a\x00b"}, "arguments.text"),
        ({"id": "c-1", "text": "a\x1bb"}, "arguments.text"),
        ({"id": "c-1", "text": "x" * 101}, "arguments.text"),
        ({"id": "c-1", "path": "../etc/passwd"}, "arguments.path"),
        ({"id": "c-1", "path": "/etc/passwd"}, "arguments.path"),
        ({"id": "c-1", "path": "a/b;rm -rf"}, "arguments.path"),
        ({"id": "c-1", "path": "a\\..\\b"}, "arguments.path"),
        ({"id": "c-1", "url": "file:///etc/passwd"}, "arguments.url"),
        ({"id": "c-1", "url": "http://169.254.169.254/latest"}, "arguments.url"),
        ({"id": "c-1", "url": "http://2130706433/"}, "arguments.url"),
        ({"id": "c-1", "url": "http://0x7f.1/"}, "arguments.url"),
        ({"id": "c-1", "url": "http://0177.0.0.1/"}, "arguments.url"),
        ({"id": "c-1", "url": "http://[::ffff:127.0.0.1]/"}, "arguments.url"),
        ({"id": "c-1", "url": "http://user@example.com/"}, "arguments.url"),
        ({"id": "c-1", "host": "localhost"}, "arguments.host"),
        ({"id": "c-1", "host": "db.internal"}, "arguments.host"),
        ({"id": "c-1", "host": "10.0.0.1"}, "arguments.host"),
        ({"id": "c-1", "n": 2.5}, "arguments.n"),
        ({"id": "c-1", "n": True}, "arguments.n"),
        ({"id": "c-1", "n": 11}, "arguments.n"),
        ({"id": "c-1", "any": {"k\u200bey": 1}}, "arguments.any.'k\\u200bey'"),
    ],
)
def test_hostile_arguments_are_named(args: dict[str, Any], path: str) -> None:
    assert path in paths(args)


def test_depth_and_size_limits() -> None:
    nested: Any = 1
    for _ in range(20):
        nested = {"a": nested}
    assert any(
        "nested deeper" in v.description for v in validate({"id": "x", "any": nested}, SCHEMA)
    )
    many = {"id": "x", "any": list(range(5000))}
    assert paths(many, limits=Limits(max_items=100)) == ["arguments.any"]


def test_public_hosts_are_accepted() -> None:
    assert host_problem("api.example.com") is None
    assert host_problem("8.8.8.8") is None


def test_schema_problems_keeps_the_coordinators_format() -> None:
    schema = {"type": "object", "required": ["a"], "properties": {"b": {"enum": [1, 2]}}}
    assert schema_problems({"b": 3}, schema) == [
        "output.a: required",
        "output.b: not one of [1, 2]",
    ]


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=30,
    )
)
def test_validation_never_raises(value: Any) -> None:
    validate({"id": "x", "any": value}, SCHEMA)


@pytest.mark.parametrize(
    ("vault_addr", "configured", "expected"),
    [
        ("http://127.0.0.1:8200", "auto", "127.0.0.2"),
        ("http://localhost:8200", "auto", "127.0.0.2"),
        ("https://vault.internal:8200", "auto", ""),
        ("http://10.0.0.5:8200", "auto", ""),
        ("http://127.0.0.1:8200", "", ""),
        ("http://10.0.0.5:8200", "10.1.2.3", "10.1.2.3"),
    ],
)
def test_vault_source_address_matches_the_task_token_binding(
    vault_addr: str, configured: str, expected: str
) -> None:
    settings = ToolProxySettings(vault_addr=vault_addr, vault_source_address=configured)
    assert settings.resolved_vault_source_address() == expected
