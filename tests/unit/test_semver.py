"""Semantic versions and constraints: examples from the capability lookups, and properties."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.semver import Version, parse, parse_constraint, satisfies

numbers = st.integers(min_value=0, max_value=50)
releases = st.builds(Version, numbers, numbers, numbers)
identifiers = st.one_of(
    st.integers(min_value=0, max_value=99).map(str),
    st.from_regex(r"[a-z][a-z0-9-]{0,5}", fullmatch=True),
)
versions = st.builds(
    Version,
    numbers,
    numbers,
    numbers,
    st.lists(identifiers, max_size=3).map(tuple),
    st.lists(st.from_regex(r"[a-z0-9]{1,4}", fullmatch=True), max_size=2).map(tuple),
)


@pytest.mark.parametrize(
    ("version", "constraint", "expected"),
    [
        ("1.2.3", "1.2.3", True),
        ("1.2.4", "1.2.3", False),
        ("1.2.3", "=1.2.3", True),
        ("1.9.0", "^1.2", True),
        ("1.2.0", "^1.2", True),
        ("1.1.9", "^1.2", False),
        ("2.0.0", "^1.2", False),
        ("0.2.5", "^0.2", True),
        ("0.3.0", "^0.2", False),
        ("0.0.3", "^0.0.3", True),
        ("0.0.4", "^0.0.3", False),
        ("1.2.9", "~1.2", True),
        ("1.3.0", "~1.2", False),
        ("1.2.2", "~1.2.3", False),
        ("1.9.0", "~1", True),
        ("1.5.0", ">=1.0.0,<2.0.0", True),
        ("1.5.0", ">=1.0.0 <2.0.0", True),
        ("2.0.0", ">=1.0.0,<2.0.0", False),
        ("0.9.9", ">=1.0.0", False),
        ("3.1.4", "*", True),
        ("3.1.4", "", True),
        ("1.2.7", "1.2", True),
        ("1.2.7", "1.2.x", True),
        ("1.3.0", "1.2.x", False),
        ("1.0.0", "^1.0", True),
        ("2.0.0-rc.1", "^1.0", False),
        ("2.0.0-rc.1", "<2.0.0", False),
        ("1.0.0-beta.2", ">=1.0.0-beta", True),
        ("1.0.0-alpha", ">=1.0.0-beta", False),
        ("1.5.0", "^1.0 || ^3.0", True),
        ("3.5.0", "^1.0 || ^3.0", True),
        ("2.5.0", "^1.0 || ^3.0", False),
        ("1.2.3+build.7", "1.2.3", True),
        ("1.3.0", ">1.2", True),
        ("1.2.9", ">1.2", False),
        ("1.2.9", "<=1.2", True),
        ("1.3.0", "<=1.2", False),
        ("1.2.3", "!=1.2.3", False),
    ],
)
def test_satisfies_examples(version: str, constraint: str, expected: bool) -> None:
    assert satisfies(version, constraint) is expected


@pytest.mark.parametrize(
    "garbage",
    ["", "1", "1.2", "1.2.3.4", "01.2.3", "v1.2.3", "a.b.c", "1.2.3-", "1.2.3-01", "1.2.3+", " "],
)
def test_parse_refuses_garbage_with_a_clear_message(garbage: str) -> None:
    with pytest.raises(ValueError, match="invalid semantic version"):
        parse(garbage)


@pytest.mark.parametrize(
    "garbage", ["abc", ">>1.0", "^", "1.x.3", "~1.2.3.4", "1.0 ||", ">=1.0.0,<two", "!=1.2"]
)
def test_constraint_refuses_garbage_with_a_clear_message(garbage: str) -> None:
    with pytest.raises(ValueError, match="invalid version constraint"):
        parse_constraint(garbage)


def test_precedence_follows_the_semver_spec() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "2.0.0",
    ]
    parsed = [parse(v) for v in ordered]
    assert parsed == sorted(parsed)
    assert parse("1.0.0+a") == parse("1.0.0+b")


@given(versions)
def test_parse_round_trips(version: Version) -> None:
    parsed = parse(str(version))
    assert parsed == version
    assert str(parsed) == str(version)


@given(releases, releases)
def test_release_order_is_numeric_tuple_order(a: Version, b: Version) -> None:
    assert (a < b) == (a.core < b.core)
    assert (a == b) == (a.core == b.core)


@given(releases)
def test_a_release_satisfies_itself_and_the_wildcard(v: Version) -> None:
    assert satisfies(str(v), str(v))
    assert satisfies(str(v), "*")
    assert satisfies(str(v), "")
    assert satisfies(str(v), f">={v}")
    assert not satisfies(str(v), f"<{v}")


@given(releases, releases)
def test_caret_means_same_leftmost_nonzero_component(base: Version, v: Version) -> None:
    if base.major > 0:
        compatible = v.major == base.major
    elif base.minor > 0:
        compatible = v.major == 0 and v.minor == base.minor
    else:
        compatible = v.core == base.core
    assert satisfies(str(v), f"^{base}") is (v >= base and compatible)


@given(releases, releases)
def test_tilde_means_same_major_and_minor(base: Version, v: Version) -> None:
    expected = v >= base and (v.major, v.minor) == (base.major, base.minor)
    assert satisfies(str(v), f"~{base}") is expected


@given(releases, releases, releases)
def test_a_range_is_half_open(low: Version, high: Version, v: Version) -> None:
    assert satisfies(str(v), f">={low},<{high}") is (low <= v < high)


@given(versions.filter(lambda v: bool(v.prerelease)), releases)
def test_prereleases_never_sneak_into_release_ranges(pre: Version, base: Version) -> None:
    assert not satisfies(str(pre), f"^{base}")
    assert not satisfies(str(pre), "*")


@given(st.text(alphabet="abcxyz!@#$%&()[]{}<>=^~ .-+", min_size=1, max_size=12))
def test_garbage_raises_value_error_not_anything_else(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_constraint(text)
