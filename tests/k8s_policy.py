"""Policy checks on Kubernetes objects (plain dicts, as `kubectl kustomize` renders them or as
``to_dict`` makes a PyTorchJob): each returns the violations it finds as readable lines, an
empty list when there are none. tests/test_k8s.py applies them to what the project ships;
tests/test_k8s_policy.py shows that each one fails on a manifest that breaks its rule.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
from kubernetes_validate.utils import all_versions
from referencing import Registry, Resource

# A current Kubernetes minor (kubernetes-validate ships schemas per version).
K8S_VERSION = "1.33"
CRD_SCHEMA = Path(__file__).parent / "data" / "kubeflow.org_pytorchjobs.v1.schema.json"
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|AUTH_STRING", re.I)


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, pod spec)`` for every pod template in a workload or a PyTorchJob."""
    where = f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}"
    if obj["kind"] == "PyTorchJob":
        for rtype, spec in obj["spec"]["pytorchReplicaSpecs"].items():
            yield f"{where}[{rtype}]", spec["template"]["spec"]
    elif obj["kind"] in POD_KINDS:
        yield where, obj["spec"]["template"]["spec"]


def pod_problems(obj: dict[str, Any]) -> list[str]:
    """Policy violations of every pod in ``obj``: root, privilege, host namespaces and paths,
    missing CPU/memory requests and limits, untagged or ``:latest`` images."""
    problems = []
    for where, spec in pod_specs(obj):
        pod_sc = spec.get("securityContext", {})
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{where}: {key}")
        for vol in spec.get("volumes", []):
            if "hostPath" in vol:
                problems.append(f"{where}: hostPath volume {vol['name']}")
        for c in spec.get("initContainers", []) + spec["containers"]:
            at = f"{where}/{c['name']}"
            sc = c.get("securityContext", {})
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                problems.append(f"{at}: runAsNonRoot is not set")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                problems.append(f"{at}: runs as UID 0")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            if sc.get("allowPrivilegeEscalation", True):
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{at}: capabilities not dropped")
            if sc.get("capabilities", {}).get("add"):
                problems.append(f"{at}: adds capabilities")
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in resources.get(kind, {}):
                        problems.append(f"{at}: no {res} in resources.{kind}")
            image = c.get("image", "")
            if ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
                problems.append(f"{at}: image {image!r} has no tag")
            if image.endswith(":latest"):
                problems.append(f"{at}: image {image!r} uses :latest")
    return problems


def probe_problems(obj: dict[str, Any]) -> list[str]:
    """Long-running containers (not init containers) without a readiness or liveness probe."""
    return [
        f"{where}/{c['name']}: no {probe}"
        for where, spec in pod_specs(obj)
        for c in spec["containers"]
        for probe in ("readinessProbe", "livenessProbe")
        if probe not in c
    ]


def strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string value in a nested document, with its path."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def secret_problems(obj: dict[str, Any]) -> list[str]:
    """Literal credentials: Secret objects, secret-named ConfigMap keys and env values,
    passwords inside URLs."""
    where = f"{obj['kind']}/{obj['metadata'].get('name')}"
    if obj["kind"] == "Secret":
        return [f"{where}: Secret objects must be created by the operator, not shipped"]
    problems = []
    if obj["kind"] == "ConfigMap":
        problems += [
            f"{where}: key {k} looks secret" for k in obj.get("data", {}) if SECRET_NAME.search(k)
        ]
    for path, text in strings(obj):
        # `$(VAR)` references are expanded by Kubernetes from Secret-backed env vars.
        for user, password in re.findall(r"://([^/\s:@]+):([^/\s@]+)@", text):
            if not (
                re.fullmatch(r"\$\([A-Z_]+\)", user) and re.fullmatch(r"\$\([A-Z_]+\)", password)
            ):
                problems.append(f"{where}{path}: credentials in a URL")
    for _, spec in pod_specs(obj):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]) and "value" in env:
                    problems.append(f"{where}/{c['name']}: env {env['name']} has a literal value")
    return problems


def rbac_problems(objs: Iterable[dict[str, Any]], namespace: str) -> list[str]:
    """RBAC that reaches beyond ``namespace`` or grants more than it names: cluster-wide roles
    and bindings, ``*`` in a rule, non-resource URLs, bindings to anything but a Role, subjects
    other than ServiceAccounts of ``namespace``."""
    problems = []
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{where}: cluster-wide")
        if obj["kind"] == "Role":
            for rule in obj.get("rules", []):
                for key in ("apiGroups", "resources", "verbs"):
                    if "*" in rule.get(key, []):
                        problems.append(f"{where}: * in {key}")
                if rule.get("nonResourceURLs"):
                    problems.append(f"{where}: nonResourceURLs")
        if obj["kind"] == "RoleBinding":
            if obj["roleRef"]["kind"] != "Role":
                problems.append(f"{where}: binds a {obj['roleRef']['kind']}")
            for subject in obj.get("subjects", []):
                if subject["kind"] != "ServiceAccount":
                    problems.append(f"{where}: subject {subject['kind']} {subject['name']}")
                elif subject.get("namespace") != namespace:
                    problems.append(
                        f"{where}: ServiceAccount {subject['name']} of namespace "
                        f"{subject.get('namespace')!r}"
                    )
    return problems


def grants(objs: Iterable[dict[str, Any]]) -> dict[str, set[tuple[str, str, str]]]:
    """``{service account: {(apiGroup, resource, verb)}}`` that the RoleBindings grant."""
    objs = list(objs)
    roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Role"}
    out: dict[str, set[tuple[str, str, str]]] = {}
    for binding in (o for o in objs if o["kind"] == "RoleBinding"):
        rules = roles[binding["roleRef"]["name"]]["rules"]
        for subject in binding["subjects"]:
            out.setdefault(subject["name"], set()).update(
                (g, r, v)
                for rule in rules
                for g in rule["apiGroups"]
                for r in rule["resources"]
                for v in rule["verbs"]
            )
    return out


def subset_mismatches(declared: Any, actual: Any, path: str = "") -> list[str]:
    """Where ``actual`` differs from ``declared`` on the fields ``declared`` has."""
    if isinstance(declared, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a mapping, got {actual!r}"]
        out = []
        for key, value in declared.items():
            if key not in actual:
                out.append(f"{path}.{key}: missing from render-job output")
            else:
                out += subset_mismatches(value, actual[key], f"{path}.{key}")
        return out
    if isinstance(declared, list):
        if not isinstance(actual, list) or len(actual) != len(declared):
            return [f"{path}: expected {len(declared)} items, got {actual!r}"]
        return [
            m
            for i, (d, a) in enumerate(zip(declared, actual, strict=True))
            for m in subset_mismatches(d, a, f"{path}[{i}]")
        ]
    return (
        [] if declared == actual else [f"{path}: template has {declared!r}, render-job {actual!r}"]
    )


@functools.cache
def k8s_registry() -> tuple[Registry, dict[str, Any]]:
    """kubernetes-validate's strict core definitions, to resolve the CRD schema's $refs."""
    import importlib.resources

    version = max(
        (v for v in all_versions() if v.startswith(K8S_VERSION)),
        default=None,
    )
    assert version, f"kubernetes-validate has no schemas for {K8S_VERSION}"
    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((base / f"v{version}-local-strict" / "_definitions.json").read_text())
    crd = json.loads(CRD_SCHEMA.read_text())
    registry = Registry().with_resources(
        [
            ("https://kubernetes.io/api/_definitions.json", Resource.from_contents(defs)),
            (crd["$id"], Resource.from_contents(crd)),
        ]
    )
    return registry, crd


def crd_errors(job: dict[str, Any]) -> list[str]:
    """Violations of the PyTorchJob CRD schema, as ``path: message``."""
    registry, crd = k8s_registry()
    validator = jsonschema.Draft202012Validator(crd, registry=registry)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)
    ]
