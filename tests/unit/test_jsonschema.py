"""tessera.jsonschema as draft 2020-12 (the jsonschema library) under Tessera's limits: the
one validator behind the tool proxy's argument check and the coordinator's output check."""

from __future__ import annotations

import time
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from services.coordinator.contracts import contract_problems
from services.tool_proxy.tools.registry import SideEffect, ToolSpec
from tessera.jsonschema import Limits, SchemaError, check_schema, schema_problems, validate
from tessera.v1 import agent_pb2, common_pb2


def problems(value: Any, schema: dict[str, Any], **kw: Any) -> list[str]:
    return [str(v) for v in validate(value, schema, path="arguments", **kw)]


# -- keywords the home-made validators ignored ------------------------------------------


@pytest.mark.parametrize(
    ("schema", "good", "bad", "expected"),
    [
        (
            {"prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
            ["a", 1],
            ["a", "b", 3],
            ["arguments[1]: expected integer", "arguments: at most 2 items allowed"],
        ),
        (
            {
                "allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}],
                "unevaluatedProperties": False,
            },
            {"a": 1, "b": 2},
            {"a": 1, "c": 3},
            ["arguments.c: unknown field"],
        ),
        (
            {
                "$defs": {"amount": {"type": "number", "exclusiveMinimum": 0}},
                "properties": {"amount": {"$ref": "#/$defs/amount"}},
            },
            {"amount": 5},
            {"amount": 0},
            ["arguments.amount: must be above 0"],
        ),
        (
            {"dependentRequired": {"card": ["billing_address"]}},
            {"card": "x", "billing_address": "y"},
            {"card": "x"},
            ["arguments.billing_address: required when 'card' is present"],
        ),
        (
            {"properties": {"kind": {"const": "refund"}}},
            {"kind": "refund"},
            {"kind": "charge"},
            ["arguments.kind: must be 'refund'"],
        ),
        (
            {"if": {"properties": {"kind": {"const": "email"}}}, "then": {"required": ["to"]}},
            {"kind": "sms"},
            {"kind": "email"},
            ["arguments.to: required"],
        ),
        (
            {"propertyNames": {"pattern": "^[a-z_]+$"}},
            {"ok_key": 1},
            {"Bad": 1},
            ["arguments.Bad: property name does not match '^[a-z_]+$'"],
        ),
        (
            {"contains": {"const": "x"}, "minContains": 2},
            ["x", "x"],
            ["x", "y"],
            ["arguments: fewer than 2 items match 'contains'"],
        ),
    ],
)
def test_draft_2020_12_keywords_are_enforced(
    schema: dict[str, Any], good: Any, bad: Any, expected: list[str]
) -> None:
    assert problems(good, schema) == []
    assert problems(bad, schema) == expected


def test_descriptions_do_not_echo_the_offending_value() -> None:
    schema = {
        "properties": {
            "token": {"anyOf": [{"type": "integer"}, {"pattern": "^tok_"}]},
            "pin": {"enum": ["0000"]},
            "code": {"oneOf": [{"type": "string"}, {"minLength": 1}]},
        }
    }
    found = problems({"token": "s3cr3t-value", "pin": "s3cr3t-pin", "code": "s3cr3t"}, schema)
    assert len(found) == 3
    assert not any("s3cr3t" in p for p in found)
    assert found[0].startswith("arguments.token: matches none of the 'anyOf' schemas")


def test_formats_are_asserted_as_security_checks() -> None:
    schema = {"properties": {"u": {"format": "url"}, "ip": {"format": "ipv4"}}}
    assert problems({"u": "https://example.com/a", "ip": "8.8.8.8"}, schema) == []
    assert problems({"u": "http://169.254.169.254/", "ip": "300.1.1.1"}, schema) == [
        "arguments.u: targets a non-public address (169.254.169.254)",
        "arguments.ip: not a valid ipv4",
    ]


# -- the hostile-input limits come first -------------------------------------------------


def test_limits_fire_before_the_library_sees_the_value() -> None:
    schema = {"properties": {"t": {"type": "integer"}}, "required": ["missing"]}
    # Only the limit problem: the schema problems of a hostile value are not worked out.
    assert problems({"t": "a\u202eb"}, schema) == [
        "arguments.t: contains a bidirectional control character U+202E"
    ]
    deep: Any = 1
    for _ in range(12):
        deep = [deep]
    assert problems(deep, {"type": "string"}) == [
        "arguments" + "[0]" * 9 + ": nested deeper than 8 levels"
    ]
    assert problems(list(range(50)), {"maxItems": 100}, limits=Limits(max_items=10)) == [
        "arguments: more than 10 items"
    ]


def test_a_backtracking_pattern_never_runs_on_a_string_maxlength_refuses() -> None:
    schema = {"type": "string", "pattern": "^(a+)+$", "maxLength": 20}
    started = time.monotonic()
    assert problems("a" * 40 + "!", schema) == ["arguments: longer than 20 characters"]
    assert problems("a" * 9000, {"pattern": "^(a+)+$"}) == [
        "arguments: longer than 8192 characters"
    ]
    assert time.monotonic() - started < 1.0


def test_schemas_that_multiply_the_work_are_cut_off() -> None:
    defs: dict[str, Any] = {"a0": {"type": "integer"}}
    for i in range(1, 40):  # 2**39 evaluations if nothing metered them
        ref = {"$ref": f"#/$defs/a{i - 1}"}
        defs[f"a{i}"] = {"allOf": [ref, ref]}
    schema = {"$defs": defs, "$ref": "#/$defs/a39"}
    assert problems(1, schema, limits=Limits(max_evaluations=2000)) == [
        "arguments: too costly to check (over 2000 evaluations)"
    ]


# -- schemas are checked too -------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"properties": {"n": {"minimum": "1"}}}, "schema.properties.n.minimum: expected number"),
        ({"pattern": "(unclosed"}, "schema.pattern: not a valid regex"),
        ({"required": "id"}, "schema.required: expected array"),
        ({"$ref": "#/$defs/missing"}, "schema.$ref: '#/$defs/missing' does not resolve"),
        ({"$ref": "https://169.254.169.254/x.json"}, "never fetched"),
        ({"properties": {"k\u200by": {}}}, "schema.properties.'k\\u200by': key contains"),
    ],
)
def test_an_unusable_schema_is_named_precisely(schema: dict[str, Any], expected: str) -> None:
    with pytest.raises(SchemaError) as raised:
        check_schema(schema)
    assert expected in str(raised.value)
    with pytest.raises(SchemaError):
        validate({}, schema)


def test_a_ref_cycle_is_a_schema_error_not_a_crash() -> None:
    with pytest.raises(SchemaError, match=r"\$ref cycle"):
        validate("x", {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})


def test_a_tool_cannot_be_declared_with_an_unusable_schema() -> None:
    with pytest.raises(SchemaError, match=r"t\.x\.input_schema\.type"):
        ToolSpec(
            name="t.x",
            description="",
            input_schema={"type": "strnig"},
            side_effect=SideEffect.READ_ONLY,
            category="test",
        )


# -- the coordinator's output check has the tool proxy's strength ------------------------

STRICT = {
    "type": "object",
    "required": ["reply"],
    "properties": {
        "reply": {"type": "string", "maxLength": 20},
        "to": {"type": "string", "format": "email"},
    },
    "additionalProperties": False,
}


def answer(output: dict[str, Any]) -> agent_pb2.ExecuteTaskResponse:
    response = agent_pb2.ExecuteTaskResponse()
    json_format.ParseDict(output, response.output.json)
    return response


def contract(schema: dict[str, Any]) -> common_pb2.CapabilityContract:
    out = common_pb2.CapabilityContract(name="support.synthesis", version="1.0.0")
    out.output_schema.CopyFrom(json_format.ParseDict(schema, struct_pb2.Struct()))
    return out


def test_the_coordinator_refuses_what_its_old_subset_let_through() -> None:
    # type, required and properties were all the old coordinator looked at: this passed.
    output = {"reply": "r" * 30, "to": "ops@localhost", "debug": {"prompt": "..."}}
    expected = [
        "output.debug: unknown field",
        "output.reply: longer than 20 characters",
        "output.to: domain targets a local or internal name",
    ]
    # (A Struct does not keep key order, so neither does the order of the problems.)
    assert sorted(contract_problems(contract(STRICT), answer(output))) == expected
    # The same words as the tool proxy's check of the same value against the same schema.
    assert sorted(schema_problems(output, STRICT)) == expected
    assert contract_problems(contract(STRICT), answer({"reply": "ok"})) == []


def test_an_unusable_output_schema_fails_the_answer_with_its_location() -> None:
    found = contract_problems(contract({"required": "reply"}), answer({"reply": "x"}))
    assert found == ["output_schema: schema.required: expected array"]


def test_outputs_meet_the_same_hostile_input_rules() -> None:
    found = contract_problems(contract(STRICT), answer({"reply": "ok\u202e"}))
    assert found == ["output.reply: contains a bidirectional control character U+202E"]


_KEYWORDS = st.sampled_from(
    [
        "type",
        "properties",
        "items",
        "prefixItems",
        "$ref",
        "$defs",
        "$id",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "if",
        "then",
        "pattern",
        "propertyNames",
        "required",
        "enum",
        "dependentRequired",
        "unevaluatedProperties",
        "additionalProperties",
        "contains",
        "format",
        "minimum",
        "maxLength",
        "a",
    ]
)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.sampled_from(["#", "#/$defs/a", "a", "string", "integer", "http://x/y", "^a+$", "("])
)


@given(
    st.dictionaries(
        _KEYWORDS,
        st.recursive(_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(_KEYWORDS, c)),
        max_size=4,
    ),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from("ax"), c),
        max_leaves=10,
    ),
)
def test_any_schema_gives_violations_or_a_schema_error_never_a_crash(
    schema: dict[str, Any], value: Any
) -> None:
    try:
        found = validate(value, schema)
    except SchemaError as exc:
        assert exc.violations and all(v.path.startswith("schema") for v in exc.violations)
    else:
        assert all(v.description for v in found)
