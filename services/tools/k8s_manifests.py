"""The Kubernetes manifests of the mesh (``deploy/k8s/``), written from the topology.

``make k8s`` (``python -m services.tools.k8s_manifests``) writes a kustomize base and a
production overlay: per service a Deployment, a headless Service, a PodDisruptionBudget and a
NetworkPolicy per edge of the call graph; a unit test fails when the files and the topology
disagree. :func:`render` builds a kustomization as ``kubectl kustomize`` would (the subset of
strategic merge the overlay uses), so the rendered objects can be validated without kubectl.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from interceptors.policy import DEFAULT_POLICY_FILE
from services.merchant_auth.pepper import PEPPER_FILE_VAR
from services.mesh import bootstrap, tls
from services.mesh.page_tokens import KEY_FILE_VAR as PAGE_TOKEN_KEY_FILE_VAR
from services.mesh.topology import (
    HTTPS_PORT,
    POSTGRESQL_PORT,
    REDIS_PORT,
    ServiceSpec,
    Target,
    Topology,
)
from services.notification.config import SECRETS_KEY_FILE_VAR

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "deploy" / "k8s"
#: The Kubernetes release the manifests are written and validated for (native gRPC probes
#: are GA since 1.27; the preStop ``sleep`` action is on by default since 1.30).
KUBERNETES_VERSION = "1.30"
NAMESPACE = "paymesh"
CLUSTER_DOMAIN = "cluster.local"
#: The user the Containerfile creates; the pods run as it (never root).
RUN_AS_UID = 10001
#: What a pod waits in preStop before it gets SIGTERM: long enough for the endpoints to drop it
#: and for callers to re-resolve, so no new call is sent to a process already draining.
PRESTOP_S = 5
#: Room after the drain's grace period for closing stores, clients and flushing spans.
SHUTDOWN_MARGIN_S = 10
VAR_DIR = "/var/lib/paymesh"
TLS_DIR = "/etc/paymesh/tls"
POLICY_DIR = "/etc/paymesh/policy"
KEYS_DIR = "/etc/paymesh/keys"
POLICY_CONFIGMAP = "paymesh-policy"
PARTNERS_CONFIGMAP = "paymesh-partners"
KEYS_SECRET = "paymesh-keys"
DATABASE_SECRET = "paymesh-database"
REDIS_SECRET = "paymesh-redis"
#: Written into every placeholder Secret: too short to pass for a key, not PEM, so a pod
#: started on it stops at once naming the file, and nobody mistakes it for a real key.
PLACEHOLDER = "replace me"
#: Private ranges: partners are on the internet, never on the cluster's own networks.
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")

Manifest = dict[str, Any]


class FileMode(int):
    """A file mode, written in octal (``0440``) as people read modes."""


#: Mode of mounted Secret files: the pod's group (fsGroup) reads them, nobody else.
SECRET_MODE = FileMode(0o440)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizing:
    """Replicas and container resources of one layer (the base or an overlay)."""

    replicas: int
    """Replicas of every Deployment (the HPA's minimum where there is one)."""
    requests: Mapping[str, str]
    """Container resource requests."""
    limits: Mapping[str, str]
    """Container resource limits."""


BASE = Sizing(replicas=1, requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "256Mi"})
PRODUCTION = Sizing(
    replicas=2, requests={"cpu": "250m", "memory": "256Mi"}, limits={"memory": "512Mi"}
)
PRODUCTION_MAX_REPLICAS = 6
PRODUCTION_CPU_UTILIZATION = 70


def image() -> str:
    """The image the Deployments run: ``paymesh:<version of pyproject.toml>``."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]
    return f"paymesh:{version}"


def termination_grace_s(grace_s: float = bootstrap.DEFAULT_GRACE_S) -> int:
    """``terminationGracePeriodSeconds``: the preStop wait, the drain's grace for calls in
    flight (``PAYMESH_GRACE_S``) and the time to close, so SIGKILL never cuts a drain short."""
    return PRESTOP_S + math.ceil(grace_s) + SHUTDOWN_MARGIN_S


def dial_address(spec: ServiceSpec, namespace: str = NAMESPACE) -> str:
    """What callers dial in the cluster: the headless Service's name, every replica behind it."""
    return f"dns:///{spec.name}.{namespace}.svc.{CLUSTER_DOMAIN}:{spec.port}"


def readiness_service(spec: ServiceSpec) -> str:
    """The health name kubelet's readiness probe asks: the service's own (it follows its
    database); liveness asks ``""``, the process, which a dependency never fails."""
    return spec.proto_services[0]


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "paymesh"}


def _selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name}


def _meta(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, "labels": _labels(name), **extra}


def tls_secret_name(spec: ServiceSpec) -> str:
    """The Secret of a service's mesh certificate (``ca.crt``, ``tls.crt``, ``tls.key``, as
    cert-manager writes them)."""
    return f"{spec.name}-mesh-tls"


def _key_files(spec: ServiceSpec) -> dict[str, str]:
    """Variable -> key of the keys Secret, for the key files the service reads: shared by all
    its replicas, which is why none may be generated in a pod."""
    files = {PAGE_TOKEN_KEY_FILE_VAR: "page-token.key"}
    if spec.name == Target.MERCHANT_AUTH:
        files[PEPPER_FILE_VAR] = "merchant-auth-pepper"
    if spec.name == Target.NOTIFICATION:
        files[SECRETS_KEY_FILE_VAR] = "notification-secrets.key"
    return files


def _env(spec: ServiceSpec, topology: Topology) -> list[dict[str, Any]]:
    prefix = spec.env_prefix
    env: list[dict[str, Any]] = [
        {"name": tls.NAMESPACE_VAR, "value": NAMESPACE},
        {"name": "PAYMESH_VAR_DIR", "value": VAR_DIR},
        {"name": "PAYMESH_POLICY_FILE", "value": f"{POLICY_DIR}/policy.toml"},
        {"name": "PAYMESH_GRACE_S", "value": f"{bootstrap.DEFAULT_GRACE_S:g}"},
        {"name": tls.CA_FILE_VAR, "value": f"{TLS_DIR}/ca.crt"},
        {"name": tls.CERT_FILE_VAR, "value": f"{TLS_DIR}/tls.crt"},
        {"name": tls.KEY_FILE_VAR, "value": f"{TLS_DIR}/tls.key"},
        *({"name": var, "value": f"{KEYS_DIR}/{key}"} for var, key in _key_files(spec).items()),
        {"name": f"{prefix}_LISTEN_ADDR", "value": f"0.0.0.0:{spec.port}"},
        {"name": f"{prefix}_HEALTH_ADDR", "value": f"0.0.0.0:{spec.health_port}"},
    ]
    if spec.public_port is not None:
        env.append({"name": f"{prefix}_PUBLIC_ADDR", "value": f"0.0.0.0:{spec.public_port}"})
    for target in spec.calls:
        callee = topology.service(target)
        env.append({"name": callee.addr_var, "value": dial_address(callee)})
    for name in spec.partners:
        partner = next(p for p in topology.partners if p.name == name)
        ref = {"configMapKeyRef": {"name": PARTNERS_CONFIGMAP, "key": partner.name}}
        env.append({"name": partner.url_var, "valueFrom": ref})
    return env


def _grpc_probe(spec: ServiceSpec, service: str, **timing: int) -> dict[str, Any]:
    return {"grpc": {"port": spec.health_port, "service": service}, **timing}


def deployment(spec: ServiceSpec, topology: Topology) -> Manifest:
    """The service's Deployment: one container, non-root on a read-only root, probed on its
    plaintext health port, draining on stop."""
    ports = [
        {"name": "grpc", "containerPort": spec.port},
        {"name": "health", "containerPort": spec.health_port},
    ]
    if spec.public_port is not None:
        ports.append({"name": "public", "containerPort": spec.public_port})
    container = {
        "name": spec.name,
        "image": image(),
        "args": [spec.module],
        "ports": ports,
        "env": _env(spec, topology),
        "resources": {"requests": dict(BASE.requests), "limits": dict(BASE.limits)},
        "startupProbe": _grpc_probe(spec, "", periodSeconds=2, failureThreshold=30),
        "livenessProbe": _grpc_probe(spec, "", periodSeconds=10, timeoutSeconds=2),
        "readinessProbe": _grpc_probe(
            spec, readiness_service(spec), periodSeconds=5, timeoutSeconds=2, failureThreshold=2
        ),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S}}},
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "var", "mountPath": VAR_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "mesh-tls", "mountPath": TLS_DIR, "readOnly": True},
            {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
            {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
        ],
    }
    keys = [{"key": key, "path": key} for key in _key_files(spec).values()]
    pod = {
        "metadata": {"labels": _labels(spec.name)},
        "spec": {
            # No Kubernetes API calls, and no *_SERVICE_* variables in the service's environment.
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": termination_grace_s(),
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RUN_AS_UID,
                "runAsGroup": RUN_AS_UID,
                "fsGroup": RUN_AS_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [
                {"name": "var", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                {
                    "name": "mesh-tls",
                    "secret": {"secretName": tls_secret_name(spec), "defaultMode": SECRET_MODE},
                },
                {"name": "policy", "configMap": {"name": POLICY_CONFIGMAP}},
                {
                    "name": "keys",
                    "secret": {
                        "secretName": KEYS_SECRET,
                        "items": keys,
                        "defaultMode": SECRET_MODE,
                    },
                },
            ],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(spec.name),
        "spec": {
            "replicas": BASE.replicas,
            "selector": {"matchLabels": _selector(spec.name)},
            # Each base pod keeps its SQLite file on its own emptyDir: never two at once.
            "strategy": {"type": "Recreate"},
            "template": pod,
        },
    }


def service(spec: ServiceSpec) -> Manifest:
    """The headless Service: its DNS name resolves to every ready replica, for the callers'
    round_robin (a cluster IP would hide the replicas behind one connection)."""
    ports = [{"name": "grpc", "port": spec.port, "targetPort": "grpc", "appProtocol": "grpc"}]
    if spec.public_port is not None:
        ports.append({"name": "public", "port": spec.public_port, "targetPort": "public"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec.name),
        "spec": {"clusterIP": "None", "selector": _selector(spec.name), "ports": ports},
    }


def disruption_budget(spec: ServiceSpec) -> Manifest:
    """At most one replica evicted at a time (a node drain still proceeds with one replica)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(spec.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(spec.name)}},
    }


def autoscaler(spec: ServiceSpec) -> Manifest:
    """CPU-driven replicas of a service whose state is outside its pods (the overlay's)."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(spec.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
            "minReplicas": PRODUCTION.replicas,
            "maxReplicas": PRODUCTION_MAX_REPLICAS,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": PRODUCTION_CPU_UTILIZATION,
                        },
                    },
                }
            ],
        },
    }


def _policy(name: str, pod: str | None, **spec: Any) -> Manifest:
    selector = {"matchLabels": _selector(pod)} if pod else {}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": _labels(pod or "paymesh")},
        "spec": {"podSelector": selector, **spec},
    }


def network_policies(topology: Topology) -> list[Manifest]:
    """Default deny, then exactly the topology's edges: ingress to each service from each of
    its callers on its mesh port, egress from each to its callees, DNS, partners, databases.
    The health port is open to the probes (kubelet connects from the node) and a public port
    to merchants; nothing else reaches a pod."""
    dns_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
    policies = [
        _policy("default-deny", None, policyTypes=["Ingress", "Egress"]),
        _policy(
            "allow-dns",
            None,
            policyTypes=["Egress"],
            egress=[
                {
                    "to": [dns_peer],
                    "ports": [{"protocol": p, "port": 53} for p in ("UDP", "TCP")],
                }
            ],
        ),
    ]
    for spec in topology.services:
        for caller in topology.services:
            if spec.name in caller.calls:
                policies.append(
                    _policy(
                        f"{spec.name}-from-{caller.name}",
                        spec.name,
                        policyTypes=["Ingress"],
                        ingress=[
                            {
                                "from": [{"podSelector": {"matchLabels": _selector(caller.name)}}],
                                "ports": [{"protocol": "TCP", "port": spec.port}],
                            }
                        ],
                    )
                )
        open_ports = [spec.health_port, *filter(None, (spec.public_port,))]
        policies.append(
            _policy(
                f"{spec.name}-probes-and-public",
                spec.name,
                policyTypes=["Ingress"],
                ingress=[{"ports": [{"protocol": "TCP", "port": p} for p in open_ports]}],
            )
        )
        egress = [
            {
                "to": [{"podSelector": {"matchLabels": _selector(callee)}}],
                "ports": [{"protocol": "TCP", "port": topology.service(callee).port}],
            }
            for callee in spec.calls
        ]
        if spec.partners:
            internet = {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(PRIVATE_RANGES)}}
            egress.append({"to": [internet], "ports": [{"protocol": "TCP", "port": HTTPS_PORT}]})
        # PostgreSQL and Redis wherever the operator runs them (in the cluster or managed).
        egress.append(
            {"ports": [{"protocol": "TCP", "port": p} for p in (POSTGRESQL_PORT, REDIS_PORT)]}
        )
        policies.append(
            _policy(f"{spec.name}-egress", spec.name, policyTypes=["Egress"], egress=egress)
        )
    return policies


def namespace() -> Manifest:
    """The namespace, held to the restricted Pod Security Standard the pods meet."""
    labels = {
        "app.kubernetes.io/part-of": "paymesh",
        "pod-security.kubernetes.io/enforce": "restricted",
    }
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": labels},
    }


def config_maps(topology: Topology) -> list[Manifest]:
    """The policy file every service loads, and the partners' base URLs (to be set)."""
    partners = {p.name: f"https://{p.name}.partners.invalid" for p in topology.partners}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(POLICY_CONFIGMAP),
            "data": {"policy.toml": DEFAULT_POLICY_FILE.read_text()},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(PARTNERS_CONFIGMAP),
            "data": partners,
        },
    ]


def placeholder_secrets(topology: Topology) -> list[Manifest]:
    """A Secret per service's mesh certificate and the shared keys, holding placeholders only:
    the real ones are made from ``var/pki`` or by cert-manager (README, Kubernetes)."""
    secrets = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(tls_secret_name(spec)),
            "type": "Opaque",
            "stringData": dict.fromkeys(("ca.crt", "tls.crt", "tls.key"), PLACEHOLDER),
        }
        for spec in topology.services
    ]
    keys = sorted({k for spec in topology.services for k in _key_files(spec).values()})
    secrets.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(KEYS_SECRET),
            "type": "Opaque",
            "stringData": dict.fromkeys(keys, PLACEHOLDER),
        }
    )
    return secrets


def production_patch(spec: ServiceSpec) -> Manifest:
    """What production changes in a Deployment: replicas, resources, rolling updates, and
    every store on the shared PostgreSQL and Redis (URLs from Secrets), so any replica may
    serve any call and the HPA may add more."""
    secret_env = [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": "url"}}}
        for name, secret in (("DATABASE_URL", DATABASE_SECRET), ("REDIS_URL", REDIS_SECRET))
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": spec.name, "namespace": NAMESPACE},
        "spec": {
            "replicas": PRODUCTION.replicas,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "spec": {
                    # Replicas on different nodes where the cluster has them.
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": _selector(spec.name)},
                        }
                    ],
                    "containers": [
                        {
                            "name": spec.name,
                            "env": [{"name": tls.ENV_VAR, "value": "production"}, *secret_env],
                            "resources": {
                                "requests": dict(PRODUCTION.requests),
                                "limits": dict(PRODUCTION.limits),
                            },
                        }
                    ],
                }
            },
        },
    }


def _delete_patch(manifest: Manifest) -> Manifest:
    meta = manifest["metadata"]
    return {
        "apiVersion": manifest["apiVersion"],
        "kind": manifest["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "$patch": "delete",
    }


def _kustomization(resources: Iterable[str], patches: Iterable[str] = (), comment: str = "") -> str:
    data: Manifest = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(resources),
    }
    if patches:
        data["patches"] = [{"path": path} for path in patches]
    return comment + dump([data])


HEADER = (
    "# Generated from services/mesh/topology.py by `make k8s` "
    "(python -m services.tools.k8s_manifests); do not edit.\n"
)


def files(topology: Topology) -> dict[str, str]:
    """Every file of ``deploy/k8s/`` by its path there."""
    out: dict[str, str] = {}
    base: list[str] = ["namespace.yaml", "config.yaml", "secrets.yaml", "network-policies.yaml"]
    out["base/namespace.yaml"] = HEADER + dump([namespace()])
    out["base/config.yaml"] = HEADER + dump(config_maps(topology))
    out["base/secrets.yaml"] = (
        HEADER
        + "# PLACEHOLDERS, not keys: create the real Secrets (README, Kubernetes); a pod on these\n"
        + "# stops at start naming the file.\n"
        + dump(placeholder_secrets(topology))
    )
    out["base/network-policies.yaml"] = HEADER + dump(network_policies(topology))
    for spec in topology.services:
        path = f"{spec.name}.yaml"
        base.append(path)
        manifests = [deployment(spec, topology), service(spec), disruption_budget(spec)]
        out[f"base/{path}"] = HEADER + dump(manifests)
    out["base/kustomization.yaml"] = _kustomization(base, comment=HEADER)
    out["overlays/production/deployments.yaml"] = HEADER + dump(
        production_patch(spec) for spec in topology.services
    )
    # Production's Secrets are made outside kustomize (cert-manager, a vault): an apply of the
    # overlay must never overwrite them with the base's placeholders.
    # One file each: kustomize 5.5 fails on several deletions in one patch file.
    patches = ["deployments.yaml"]
    for secret in placeholder_secrets(topology):
        path = f"no-placeholder/{secret['metadata']['name']}.yaml"
        patches.append(path)
        out[f"overlays/production/{path}"] = HEADER + dump([_delete_patch(secret)])
    out["overlays/production/autoscalers.yaml"] = HEADER + dump(
        [autoscaler(spec) for spec in topology.services]
    )
    out["overlays/production/kustomization.yaml"] = _kustomization(
        ["../../base", "autoscalers.yaml"], patches, comment=HEADER
    )
    return out


def _mode(dumper: yaml.SafeDumper, value: FileMode) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:int", f"0{value:o}")


class _Dumper(yaml.SafeDumper):
    """Block style, keys in the order written, multi-line text as a literal block."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_multi_representer(str, _text)  # mesh names are str enums
_Dumper.add_representer(FileMode, _mode)


def dump(manifests: Iterable[Manifest]) -> str:
    """Manifests as YAML documents, in order."""
    return yaml.dump_all(
        list(manifests), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100
    )


def load(path: Path) -> list[Manifest]:
    """The YAML documents of ``path`` (empty ones skipped)."""
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def render(directory: Path) -> list[Manifest]:
    """The objects of the kustomization in ``directory``, as ``kubectl kustomize`` builds them:
    resources (files, or directories with their own kustomization) in order, then each patch
    applied as a strategic merge patch (maps merged, lists of named items merged by name,
    ``$patch: delete`` removes the object)."""
    kustomization = load(directory / "kustomization.yaml")[0]
    objects: list[Manifest] = []
    for resource in kustomization.get("resources", ()):
        path = directory / resource
        objects += render(path) if path.is_dir() else load(path)
    for patch_ref in kustomization.get("patches", ()):
        for patch in load(directory / patch_ref["path"]):
            objects = _apply(objects, patch)
    return objects


def _key(manifest: Manifest) -> tuple[str, str, str]:
    meta = manifest["metadata"]
    return manifest["kind"], meta.get("namespace", ""), meta["name"]


def _apply(objects: list[Manifest], patch: Manifest) -> list[Manifest]:
    matches = [o for o in objects if _key(o) == _key(patch)]
    if len(matches) != 1:
        raise ValueError(f"patch {_key(patch)} matches {len(matches)} objects")
    if patch.get("$patch") == "delete":
        return [o for o in objects if o is not matches[0]]
    merged = _merge(matches[0], patch)
    return [merged if o is matches[0] else o for o in objects]


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if _named(base) and _named(patch):
        by_name = {item["name"]: item for item in patch}
        kept = [_merge(item, by_name.pop(item["name"], {})) for item in base]
        # New items go first, as kustomize puts them.
        return [copy.deepcopy(item) for item in by_name.values()] + kept
    return copy.deepcopy(patch)


def _named(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def write(out: Path, topology: Topology) -> list[Path]:
    """Write every file under ``out`` and remove generated ones no longer written; the paths."""
    wanted = files(topology)
    for old in out.rglob("*.yaml") if out.exists() else ():
        if str(old.relative_to(out)) not in wanted:
            old.unlink()
    written = []
    for relative, text in wanted.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Write ``deploy/k8s/`` from the declared topology (environment overrides are not
    applied: addresses in the cluster are its DNS names, not this machine's)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="directory to write (deploy/k8s)")
    args = parser.parse_args(argv)
    written = write(args.out, Topology(environ={}))
    print(f"wrote {len(written)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
