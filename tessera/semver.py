"""Semantic versions (semver 2.0.0) and the version constraints capability lookups use.

Constraint syntax (npm-like, the subset Tessera needs):

* ``""`` or ``"*"``: any release version;
* ``1.2.3`` / ``=1.2.3``: exactly that version; a partial ``1.2`` or ``1`` (also ``1.2.x``,
  ``1.*``) means any version with that prefix;
* ``^1.2`` / ``^1.2.3``: compatible (same left-most non-zero component);
* ``~1.2`` / ``~1.2.3``: same major and minor (``~1``: same major);
* ``>=1.0.0``, ``>1.0``, ``<=2``, ``<2.0.0``, ``!=1.3.0``: comparisons, partial versions padded
  with zeros;
* comparators joined by ``,`` or spaces must all hold (``>=1.0.0,<2.0.0``); alternatives are
  joined by ``||``.

Pre-release versions (``2.0.0-rc.1``) satisfy a constraint only when one of its
comparators names a pre-release of the same ``major.minor.patch``, as in npm: ``^1.0`` does
not pick up ``2.0.0-rc.1`` (nor ``1.5.0-beta``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import total_ordering

__all__ = ["Constraint", "Version", "parse", "parse_constraint", "satisfies"]

_NUM = r"0|[1-9]\d*"
_IDENT = r"[0-9A-Za-z-]+"
_VERSION_RE = re.compile(
    rf"^(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?"
    rf"(?:\+(?P<build>{_IDENT}(?:\.{_IDENT})*))?$"
)
_PARTIAL_RE = re.compile(
    rf"^v?(?P<major>{_NUM}|[xX*])(?:\.(?P<minor>{_NUM}|[xX*]))?(?:\.(?P<patch>{_NUM}|[xX*]))?"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?"
    rf"(?:\+(?P<build>{_IDENT}(?:\.{_IDENT})*))?$"
)
_COMPARATOR_RE = re.compile(r"^(?P<op>\^|~|>=|<=|>|<|==|=|!=)?\s*(?P<version>\S+)$")
_WILDCARDS = frozenset({"x", "X", "*"})


@total_ordering
@dataclass(frozen=True)
class Version:
    """A semantic version; ordered by semver precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = field(default=(), compare=False)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    @property
    def core(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after all of its pre-releases; numeric identifiers sort before
        # alphanumeric ones and compare as numbers.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()


def parse(version: str) -> Version:
    """Parse a full ``MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]`` version.

    Raises ``ValueError`` naming the input when it is not a semantic version.
    """
    if not isinstance(version, str):
        raise ValueError(f"invalid semantic version {version!r}: expected a string")
    m = _VERSION_RE.match(version.strip())
    if m is None:
        raise ValueError(
            f"invalid semantic version {version!r}: expected MAJOR.MINOR.PATCH"
            "[-PRERELEASE][+BUILD] with numbers without leading zeros, e.g. 1.2.3"
        )
    pre = tuple(m["pre"].split(".")) if m["pre"] else ()
    for ident in pre:
        if ident.isdigit() and len(ident) > 1 and ident.startswith("0"):
            raise ValueError(
                f"invalid semantic version {version!r}: numeric pre-release identifier "
                f"{ident!r} has a leading zero"
            )
    return Version(
        int(m["major"]),
        int(m["minor"]),
        int(m["patch"]),
        pre,
        tuple(m["build"].split(".")) if m["build"] else (),
    )


Test = Callable[[Version], bool]


@dataclass(frozen=True)
class _Comparator:
    test: Test
    prerelease_core: tuple[int, int, int] | None
    """``major.minor.patch`` of the pre-release this comparator names, if any."""


@dataclass(frozen=True)
class Constraint:
    """A parsed constraint; ``constraint.allows(version)``. Build with :func:`parse_constraint`."""

    text: str
    _alternatives: tuple[tuple[_Comparator, ...], ...] = field(repr=False)

    def allows(self, version: Version) -> bool:
        for comparators in self._alternatives:
            if not all(c.test(version) for c in comparators):
                continue
            if not version.prerelease or any(
                c.prerelease_core == version.core for c in comparators
            ):
                return True
        return False


def _bad(constraint: str, why: str) -> ValueError:
    return ValueError(
        f"invalid version constraint {constraint!r}: {why} (expected e.g. '1.2.3', '^1.2', "
        "'~1.2', '>=1.0.0,<2.0.0' or '*')"
    )


def _partial(text: str, constraint: str) -> tuple[list[int | None], tuple[str, ...]]:
    m = _PARTIAL_RE.match(text)
    if m is None:
        raise _bad(constraint, f"{text!r} is not a version")
    parts: list[int | None] = []
    seen_wildcard = False
    for name in ("major", "minor", "patch"):
        raw = m[name]
        if raw is None or raw in _WILDCARDS:
            seen_wildcard = True
            parts.append(None)
        elif seen_wildcard:
            raise _bad(constraint, f"{text!r} has a number after a wildcard")
        else:
            parts.append(int(raw))
    pre = tuple(m["pre"].split(".")) if m["pre"] else ()
    if pre and None in parts:
        raise _bad(constraint, f"{text!r} has a pre-release on a partial version")
    return parts, pre


def _comparator(op: str, text: str, constraint: str) -> list[_Comparator]:
    parts, pre = _partial(text, constraint)
    major, minor, patch = parts
    low = Version(major or 0, minor or 0, patch or 0, pre)
    pre_core = low.core if pre else None

    def cmp(test: Test) -> list[_Comparator]:
        return [_Comparator(test, pre_core)]

    def between(lo: Version, hi: Version | None) -> list[_Comparator]:
        if hi is None:
            return cmp(lambda v: v >= lo)
        return cmp(lambda v: lo <= v < _floor(hi))

    if major is None:  # "*", "x"
        return (
            cmp(lambda v: True)
            if op in ("", "=", "==", ">=", "<=", "^", "~")
            else cmp(lambda v: False)
        )
    if op in ("", "=", "=="):
        if patch is not None:
            return cmp(lambda v: v == low)
        hi = Version(major + 1, 0, 0) if minor is None else Version(major, minor + 1, 0)
        return between(low, hi)
    if op == "!=":
        if patch is None:
            raise _bad(constraint, "'!=' needs a full version")
        return cmp(lambda v: v != low)
    if op == "^":
        if major > 0 or minor is None:
            hi = Version(major + 1, 0, 0)
        elif minor > 0 or patch is None:
            hi = Version(0, minor + 1, 0)
        else:
            hi = Version(0, 0, patch + 1)
        return between(low, hi)
    if op == "~":
        hi = Version(major + 1, 0, 0) if minor is None else Version(major, minor + 1, 0)
        return between(low, hi)
    if op == ">=":
        return cmp(lambda v: v >= low)
    if op == "<":
        return cmp(lambda v: v < low)
    if op == ">":
        if patch is not None:
            return cmp(lambda v: v > low)
        nxt = Version(major + 1, 0, 0) if minor is None else Version(major, minor + 1, 0)
        return cmp(lambda v: v >= nxt)
    if op == "<=":
        if patch is not None:
            return cmp(lambda v: v <= low)
        nxt = Version(major + 1, 0, 0) if minor is None else Version(major, minor + 1, 0)
        return cmp(lambda v: v < _floor(nxt))
    raise _bad(constraint, f"unknown operator {op!r}")  # pragma: no cover - regex bound


def _floor(v: Version) -> Version:
    """The lowest version of ``v``'s core (its first pre-release), so ``< 2.0.0`` bounds
    exclude ``2.0.0-rc.1`` as well."""
    return Version(v.major, v.minor, v.patch, ("0",)) if not v.prerelease else v


def parse_constraint(constraint: str) -> Constraint:
    """Parse a constraint (see the module docstring); ``ValueError`` on garbage."""
    if not isinstance(constraint, str):
        raise ValueError(f"invalid version constraint {constraint!r}: expected a string")
    alternatives: list[tuple[_Comparator, ...]] = []
    for alternative in constraint.split("||"):
        # Allow "op version" with a space ("> = 1" is not allowed, ">= 1" is).
        normalized = re.sub(r"(\^|~|>=|<=|>|<|==|!=|=)\s+", r"\1", alternative.strip())
        tokens = [t for t in re.split(r"[,\s]+", normalized) if t]
        if not tokens:
            if constraint.strip() and "||" in constraint:
                raise _bad(constraint, "empty alternative around '||'")
            tokens = ["*"]
        comparators: list[_Comparator] = []
        for token in tokens:
            m = _COMPARATOR_RE.match(token)
            if m is None:
                raise _bad(constraint, f"cannot read {token!r}")
            comparators.extend(_comparator(m["op"] or "", m["version"], constraint))
        alternatives.append(tuple(comparators))
    return Constraint(constraint, tuple(alternatives))


def satisfies(version: str, constraint: str) -> bool:
    """Whether ``version`` (a full semantic version) meets ``constraint``.

    Raises ``ValueError`` when either is malformed.
    """
    return parse_constraint(constraint).allows(parse(version))
