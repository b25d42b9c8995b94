"""deploy/k8s/ is what the topology gives; every rendered object passes strict validation for
the Kubernetes release we target; and the manifests hold what the mesh needs: probes on the
health port, a drain inside the grace period, exactly one NetworkPolicy per edge, non-root
read-only pods, and the image, user and modules the Containerfile provides."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from interceptors.policy import DEFAULT_POLICY_FILE, PolicyConfig
from services.mesh.topology import Topology
from services.tools import k8s_manifests as k8s
from services.tools.k8s_manifests import Manifest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "k8s"
TOPOLOGY = Topology(environ={})
LAYERS = ("base", "overlays/production")
APP = "app.kubernetes.io/name"


@functools.cache
def _rendered(layer: str) -> tuple[Manifest, ...]:
    return tuple(k8s.render(DEPLOY / layer))


def _of_kind(layer: str, kind: str) -> list[Manifest]:
    return [o for o in _rendered(layer) if o["kind"] == kind]


def _container(deployment: Manifest) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(deployment: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(deployment)["env"]}


def _app(selector: dict[str, Any]) -> str:
    app: str = selector["matchLabels"][APP]
    return app


def test_deploy_k8s_is_the_one_the_topology_gives() -> None:
    on_disk = {
        str(path.relative_to(DEPLOY)): path.read_text()
        for path in DEPLOY.rglob("*")
        if path.is_file()
    }

    assert on_disk == k8s.files(TOPOLOGY), "deploy/k8s/ is stale: run `make k8s` and commit it"


def test_writing_replaces_what_the_topology_no_longer_gives(tmp_path: Path) -> None:
    stale = tmp_path / "base" / "retired-service.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("kind: Deployment\n")

    written = k8s.write(tmp_path, TOPOLOGY)

    assert not stale.exists()
    assert {str(p.relative_to(tmp_path)) for p in written} == set(k8s.files(TOPOLOGY))


@pytest.mark.parametrize("layer", LAYERS)
def test_every_rendered_manifest_validates_strictly(layer: str) -> None:
    errors = []
    for manifest in _rendered(layer):
        try:
            kubernetes_validate.validate(manifest, k8s.KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {exc}")

    assert not errors
    assert {o["kind"] for o in _rendered(layer)} >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }


def test_strict_validation_refuses_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_of_kind("base", "Deployment")[0])
    _container(deployment)["livenessprobe"] = _container(deployment)["livenessProbe"]

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, k8s.KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("layer", LAYERS)
def test_renderer_builds_what_kubectl_kustomize_builds(layer: str) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / layer)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout

    def by_id(objects: Any) -> dict[tuple[str, str], str]:
        return {
            (o["kind"], o["metadata"]["name"]): json.dumps(o, sort_keys=True) for o in objects if o
        }

    assert by_id(_rendered(layer)) == by_id(yaml.safe_load_all(built))


def _ingress_edges(policies: list[Manifest]) -> set[tuple[str, str, int]]:
    edges = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", ()):
            for peer in rule.get("from", ()):
                for port in rule["ports"]:
                    callee = _app(policy["spec"]["podSelector"])
                    edges.add((_app(peer["podSelector"]), callee, port["port"]))
    return edges


def _egress_edges(policies: list[Manifest]) -> set[tuple[str, str, int]]:
    edges = set()
    for policy in policies:
        for rule in policy["spec"].get("egress", ()):
            for peer in rule.get("to", ()):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    for port in rule["ports"]:
                        caller = _app(policy["spec"]["podSelector"])
                        edges.add((caller, _app(peer["podSelector"]), port["port"]))
    return edges


def test_network_policies_mirror_the_topology_edges_exactly() -> None:
    policies = _of_kind("base", "NetworkPolicy")
    declared = {
        (caller.name, callee, TOPOLOGY.service(callee).port)
        for caller in TOPOLOGY.services
        for callee in caller.calls
    }
    edge_policies = [p for p in policies if "-from-" in p["metadata"]["name"]]

    assert _ingress_edges(policies) == declared
    assert _egress_edges(policies) == declared
    assert len(edge_policies) == len(declared)


def test_everything_not_an_edge_is_denied() -> None:
    policies = {p["metadata"]["name"]: p for p in _of_kind("base", "NetworkPolicy")}
    deny = policies["default-deny"]["spec"]

    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for policy in policies.values():
        for rule in policy["spec"].get("ingress", ()):
            if "from" in rule:
                continue
            # Open to any source only on the health port (kubelet probes from the node) and
            # the merchant-facing port, never on the mesh port.
            spec = TOPOLOGY.service(_app(policy["spec"]["podSelector"]))
            opened = {p["port"] for p in rule["ports"]}
            assert opened == {spec.health_port, *filter(None, (spec.public_port,))}


def test_only_partner_callers_reach_the_internet() -> None:
    for policy in _of_kind("base", "NetworkPolicy"):
        name = policy["spec"]["podSelector"].get("matchLabels", {}).get(APP)
        blocks = [
            peer["ipBlock"]
            for rule in policy["spec"].get("egress", ())
            for peer in rule.get("to", ())
            if "ipBlock" in peer
        ]
        if blocks:
            assert TOPOLOGY.service(name).partners
            assert all(set(b["except"]) == set(k8s.PRIVATE_RANGES) for b in blocks)


@pytest.mark.parametrize("layer", LAYERS)
def test_every_deployment_probes_its_plaintext_health_port(layer: str) -> None:
    deployments = _of_kind(layer, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {s.name for s in TOPOLOGY.services}
    for deployment in deployments:
        spec = TOPOLOGY.service(deployment["metadata"]["name"])
        container = _container(deployment)
        probes = {kind: container[kind]["grpc"] for kind in ("startupProbe", "livenessProbe")}
        readiness = container["readinessProbe"]["grpc"]

        # Liveness is the process (""), which a dependency never fails; readiness the
        # service's own name, which follows its database.
        assert all(p == {"port": spec.health_port, "service": ""} for p in probes.values())
        assert readiness == {"port": spec.health_port, "service": spec.proto_services[0]}
        assert _env(deployment)[f"{spec.env_prefix}_HEALTH_ADDR"] == f"0.0.0.0:{spec.health_port}"
        assert {"name": "health", "containerPort": spec.health_port} in container["ports"]


@pytest.mark.parametrize("layer", LAYERS)
def test_termination_grace_outlasts_the_prestop_wait_and_the_drain(layer: str) -> None:
    for deployment in _of_kind(layer, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        prestop = _container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain_grace_s = float(_env(deployment)["PAYMESH_GRACE_S"])

        assert pod["terminationGracePeriodSeconds"] > prestop + drain_grace_s


@pytest.mark.parametrize("layer", LAYERS)
def test_pods_run_non_root_on_a_read_only_root_without_capabilities(layer: str) -> None:
    for deployment in _of_kind(layer, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        context = container["securityContext"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}

        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == k8s.RUN_AS_UID
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert {k8s.VAR_DIR, "/tmp"} <= mounts
        assert writable == {"var", "tmp"}
        assert set(container["resources"]) == {"requests", "limits"}


@pytest.mark.parametrize("layer", LAYERS)
def test_callers_dial_each_callee_through_its_headless_service(layer: str) -> None:
    services = {s["metadata"]["name"]: s["spec"] for s in _of_kind(layer, "Service")}
    for deployment in _of_kind(layer, "Deployment"):
        spec = TOPOLOGY.service(deployment["metadata"]["name"])
        env = _env(deployment)
        dialed = {
            name: value
            for name, value in env.items()
            if name.endswith("_ADDR") and isinstance(value, str) and value.startswith("dns:///")
        }

        assert dialed == {
            TOPOLOGY.service(c).addr_var: k8s.dial_address(TOPOLOGY.service(c)) for c in spec.calls
        }
        assert env[f"{spec.env_prefix}_LISTEN_ADDR"] == f"0.0.0.0:{spec.port}"
        assert services[spec.name]["clusterIP"] == "None"
        assert ("grpc", spec.port) in {(p["name"], p["port"]) for p in services[spec.name]["ports"]}
        for value in dialed.values():
            host = re.match(r"dns:///([a-z-]+)\.", value)
            assert host is not None and host[1] in services


def test_base_keeps_one_replica_per_pod_local_database_and_scales_nothing() -> None:
    deployments = _of_kind("base", "Deployment")

    assert all(d["spec"]["replicas"] == 1 for d in deployments)
    assert all(d["spec"]["strategy"] == {"type": "Recreate"} for d in deployments)
    assert not _of_kind("base", "HorizontalPodAutoscaler")
    assert all("DATABASE_URL" not in _env(d) for d in deployments)


def test_production_puts_every_store_on_the_shared_database_and_autoscales_it() -> None:
    autoscalers = {
        h["metadata"]["name"]: h["spec"]
        for h in _of_kind("overlays/production", "HorizontalPodAutoscaler")
    }
    for deployment in _of_kind("overlays/production", "Deployment"):
        name = deployment["metadata"]["name"]
        env = _env(deployment)

        assert deployment["spec"]["replicas"] == k8s.PRODUCTION.replicas
        assert autoscalers[name]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert autoscalers[name]["minReplicas"] == k8s.PRODUCTION.replicas
        assert env["DATABASE_URL"] == {"secretKeyRef": {"name": k8s.DATABASE_SECRET, "key": "url"}}
        assert env["REDIS_URL"] == {"secretKeyRef": {"name": k8s.REDIS_SECRET, "key": "url"}}
        assert env["PAYMESH_ENV"] == "production"
        assert _container(deployment)["resources"]["requests"] == dict(k8s.PRODUCTION.requests)


def test_base_secrets_are_placeholders_and_production_never_applies_them() -> None:
    secrets = _of_kind("base", "Secret")
    referenced = {
        volume["secret"]["secretName"]
        for deployment in _of_kind("base", "Deployment")
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    }

    assert {s["metadata"]["name"] for s in secrets} == referenced
    assert all(set(s["stringData"].values()) == {k8s.PLACEHOLDER} for s in secrets)
    assert not _of_kind("overlays/production", "Secret")


def test_policy_config_map_is_the_policy_every_service_loads(tmp_path: Path) -> None:
    config = next(
        c for c in _of_kind("base", "ConfigMap") if c["metadata"]["name"] == "paymesh-policy"
    )
    path = tmp_path / "policy.toml"
    path.write_text(config["data"]["policy.toml"])
    targets = {s.name for s in TOPOLOGY.services} | {p.name for p in TOPOLOGY.partners}

    assert config["data"]["policy.toml"] == DEFAULT_POLICY_FILE.read_text()
    PolicyConfig.load(str(path), known_targets=targets)


def _containerfile() -> list[tuple[str, str]]:
    """The Containerfile's instructions (continuation lines joined), as (INSTRUCTION, rest)."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_containerfile_builds_the_user_and_entry_the_manifests_run() -> None:
    instructions = _containerfile()
    users = [rest for op, rest in instructions if op == "USER"]
    entrypoint = [json.loads(rest) for op, rest in instructions if op == "ENTRYPOINT"]
    copied = {rest.split()[0] for op, rest in instructions if op == "COPY"}

    assert users == [f"{k8s.RUN_AS_UID}:{k8s.RUN_AS_UID}"]
    assert any(f"--uid {k8s.RUN_AS_UID}" in rest for op, rest in instructions if op == "RUN")
    assert entrypoint == [["python", "-m"]]
    assert instructions[0][0] == "FROM" and "-slim" in instructions[0][1]
    assert {"services", "interceptors", "gen", "pyproject.toml"} <= copied
    for deployment in _of_kind("base", "Deployment"):
        container = _container(deployment)
        module = container["args"][0]

        assert container["image"] == k8s.image()
        assert container.get("command") is None  # the image's ENTRYPOINT runs the module
        assert (ROOT / module.replace(".", "/") / "__main__.py").is_file()
        assert module.split(".")[0] in copied


def test_image_is_named_by_the_project_version_the_makefile_builds() -> None:
    makefile = (ROOT / "Makefile").read_text()

    assert re.fullmatch(r"paymesh:\d+\.\d+\.\d+", k8s.image())
    assert "k8s_manifests import image" in makefile and "-f Containerfile" in makefile
