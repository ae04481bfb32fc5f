"""Who a control-plane call speaks for (tessera.runtime.principal) and how the front door
is configured to say it (jwt_authn in tessera.launcher.gateway)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tessera.identity.names import WorkloadName
from tessera.launcher.gateway import HumanAuth, build_resources
from tessera.runtime import grpc_authz
from tessera.runtime.errors import PermissionDenied, Unauthenticated
from tessera.runtime.principal import (
    CLAIMS_HEADER,
    SUBJECT_HEADER,
    Principal,
    encode_claims,
    principal_of,
)


class _Context:
    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata


@pytest.fixture
def caller() -> Iterator[Any]:
    tokens = []

    def be(name: WorkloadName | None) -> None:
        tokens.append(grpc_authz._PEER.set(name))

    yield be
    for token in reversed(tokens):
        grpc_authz._PEER.reset(token)


def claims_header(**claims: Any) -> list[tuple[str, str]]:
    return [(CLAIMS_HEADER, encode_claims(claims))]


def test_envoy_speaks_for_the_person_its_token_names(caller: Any) -> None:
    caller(WorkloadName("service", "gateway"))
    context = _Context(claims_header(preferred_username="ann", groups=["finance-approvers"]))
    assert principal_of(context) == Principal("user", "ann", frozenset({"finance-approvers"}))  # type: ignore[arg-type]


def test_envoy_without_claims_is_a_misconfigured_front_door(caller: Any) -> None:
    caller(WorkloadName("service", "gateway"))
    with pytest.raises(Unauthenticated):
        principal_of(_Context([]))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "claims",
    [
        {"groups": ["x"]},  # no subject
        {"preferred_username": "", "groups": []},
        {"preferred_username": "ann", "groups": "not-a-list-is-one-group"},
    ],
)
def test_claims_without_a_usable_subject_are_refused(caller: Any, claims: dict[str, Any]) -> None:
    caller(WorkloadName("service", "gateway"))
    context = _Context(claims_header(**claims))
    if claims.get("preferred_username"):
        assert principal_of(context).groups == frozenset({"not-a-list-is-one-group"})  # type: ignore[arg-type]
    else:
        with pytest.raises(Unauthenticated):
            principal_of(context)  # type: ignore[arg-type]


def test_unreadable_or_huge_claims_are_refused(caller: Any) -> None:
    caller(WorkloadName("service", "gateway"))
    for raw in ("%%%not-base64", "a" * 20_000, encode_claims({"x": 1})[:-3] + "!!!"):
        with pytest.raises(Unauthenticated):
            principal_of(_Context([(CLAIMS_HEADER, raw)]))  # type: ignore[arg-type]


def test_any_other_workload_asserting_a_person_is_refused(caller: Any) -> None:
    caller(WorkloadName("service", "operator"))
    context = _Context(claims_header(preferred_username="ceo", groups=["operators"]))
    with pytest.raises(PermissionDenied) as info:
        principal_of(context)  # type: ignore[arg-type]
    assert info.value.reason == "CLAIMS_NOT_FROM_GATEWAY"


def test_a_workload_without_claims_acts_in_its_own_name(caller: Any) -> None:
    caller(WorkloadName("service", "operator"))
    assert principal_of(_Context([])) == Principal("workload", "service/operator")  # type: ignore[arg-type]


def test_a_plaintext_debug_server_says_it_verified_nothing(caller: Any) -> None:
    caller(None)
    assert principal_of(_Context([])).kind == "unverified"  # type: ignore[arg-type]
    said = principal_of(_Context(claims_header(preferred_username="ann")))  # type: ignore[arg-type]
    assert said == Principal("unverified", "ann")


def _filters(auth: HumanAuth | None) -> list[dict[str, Any]]:
    edge = {"rate_limit": {"per_caller": {"max_tokens": 5}, "anonymous": {"max_tokens": 9}}}
    resources = build_resources(
        edge, listen="127.0.0.1:1", access_log="/dev/null", upstreams=[], human_auth=auth
    )
    hcm = resources.listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["http_filters"])


def test_the_front_door_strips_identity_headers_then_verifies_the_token() -> None:
    auth = HumanAuth(issuer="https://idp", audiences=("tessera",), jwks='{"keys":[]}')
    filters = _filters(auth)
    names = [f["name"] for f in filters]
    strip = names.index("envoy.filters.http.header_mutation")
    verify = names.index("envoy.filters.http.jwt_authn")
    limit = names.index("envoy.filters.http.local_ratelimit")
    assert strip < verify < limit  # nobody's own header survives to be believed
    removed = {
        m["remove"] for m in filters[strip]["typed_config"]["mutations"]["request_mutations"]
    }
    assert removed == {CLAIMS_HEADER, SUBJECT_HEADER}
    jwt = filters[verify]["typed_config"]
    provider = jwt["providers"]["people"]
    assert provider["forward"] is False  # the bearer token goes no further than Envoy
    assert provider["forward_payload_header"] == CLAIMS_HEADER
    assert jwt["rules"][-1] == {"match": {"prefix": "/"}, "requires": {"provider_name": "people"}}
    by = filters[limit]["typed_config"]["rate_limits"][0]["actions"][0]["request_headers"]
    assert by["header_name"] == SUBJECT_HEADER  # one bucket per verified person


def test_without_human_auth_there_is_no_token_check() -> None:
    names = [f["name"] for f in _filters(None)]
    assert "envoy.filters.http.jwt_authn" not in names


def test_people_reach_the_registry_s_freeze_switch_and_nothing_else_of_it() -> None:
    from tessera.launcher import topology
    from tessera.launcher.gateway import REGISTRY_PUBLIC_METHODS, Upstream

    registry = topology.load().service("registry")
    # The local mesh's static routes and the control plane's come from the same list.
    assert registry.public_methods == REGISTRY_PUBLIC_METHODS and not registry.public
    upstream = Upstream(
        "registry", "127.0.0.1:2", ("tessera.v1.RegistryService",), REGISTRY_PUBLIC_METHODS
    )
    resources = build_resources(
        {}, listen="127.0.0.1:1", access_log="/dev/null", upstreams=[upstream]
    )
    routes = resources.route_configs[0]["virtual_hosts"][0]["routes"]
    to_registry = [
        r["match"] for r in routes if r.get("route", {}).get("cluster", "").endswith("registry")
    ]
    assert to_registry == [{"path": f"/{m}", "grpc": {}} for m in REGISTRY_PUBLIC_METHODS]
