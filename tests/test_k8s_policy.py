"""The Kubernetes policy checks (tests/k8s_policy.py) fail on what they exist to catch.

tests/test_k8s.py asserts that the shipped manifests and the built PyTorchJob have no
violations; that proves something only if each check finds the violation it names. Each test
here starts from a small hand-written manifest that passes every check, breaks one rule, and
expects that check, and only that rule of it, to fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.k8s_policy import (
    crd_errors,
    grants,
    pod_problems,
    probe_problems,
    rbac_problems,
    secret_problems,
    subset_mismatches,
)

NAMESPACE = "team"


def container(name: str = "app", image: str = "registry.example.com:5000/app:1.2") -> dict:
    return {
        "name": name,
        "image": image,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "resources": {
            "requests": {"cpu": "1", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}},
        "env": [
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}},
            {"name": "DB_URL", "value": "postgresql://$(DB_USER):$(DB_PASSWORD)@db:5432/app"},
        ],
    }


def deployment() -> dict[str, Any]:
    """A Deployment that passes every check: non-root, no privilege, bounded, tagged, probed,
    credentials only by reference."""
    init = container("init", image="busybox@sha256:" + "0" * 64)  # a digest pins it too
    del init["readinessProbe"], init["livenessProbe"]  # init containers take no probes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NAMESPACE},
        "spec": {
            "template": {
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                    "initContainers": [init],
                    "containers": [container()],
                }
            }
        },
    }


def pytorchjob() -> dict[str, Any]:
    """A minimal PyTorchJob that the CRD schema and the pod checks accept."""
    pod = deployment()["spec"]["template"]["spec"]
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "train", "namespace": NAMESPACE},
        "spec": {
            "pytorchReplicaSpecs": {
                "Worker": {"replicas": 2, "restartPolicy": "OnFailure", "template": {"spec": pod}}
            }
        },
    }


def pod(obj: dict) -> dict:
    """The pod spec of a Deployment, or of a PyTorchJob's Worker."""
    if obj["kind"] == "PyTorchJob":
        return obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def main(obj: dict) -> dict:
    return pod(obj)["containers"][0]


def changed(obj: dict, edit: Callable[[dict], Any]) -> dict:
    obj = copy.deepcopy(obj)
    edit(obj)
    return obj


def only(problems: list[str], expected: str) -> None:
    """The check failed, and for the one rule broken."""
    assert problems, f"nothing found; expected {expected!r}"
    assert all(expected in p for p in problems), problems


# ----------------------------------------------------------------------------- pods


def test_the_good_manifests_pass_every_check() -> None:
    for obj in (deployment(), pytorchjob()):
        assert pod_problems(obj) == []
        assert probe_problems(obj) == []
        assert secret_problems(obj) == []
    assert crd_errors(pytorchjob()) == []
    # Objects without pods have nothing for the pod checks to find.
    service = {"kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": []}}
    assert pod_problems(service) == probe_problems(service) == []


SC = "securityContext"
POD_RULES = [
    ("hostNetwork", lambda o: pod(o).update(hostNetwork=True)),
    ("hostPID", lambda o: pod(o).update(hostPID=True)),
    ("hostIPC", lambda o: pod(o).update(hostIPC=True)),
    ("hostPath volume root", lambda o: pod(o)["volumes"].append({"name": "root", "hostPath": {"path": "/"}})),
    # Unset on the pod: both containers lack it; false on one container overrides the pod.
    ("runAsNonRoot is not set", lambda o: pod(o)[SC].pop("runAsNonRoot")),
    ("app: runAsNonRoot is not set", lambda o: main(o)[SC].update(runAsNonRoot=False)),
    ("runs as UID 0", lambda o: pod(o)[SC].update(runAsUser=0)),
    ("app: runs as UID 0", lambda o: main(o)[SC].update(runAsUser=0)),
    ("app: privileged", lambda o: main(o)[SC].update(privileged=True)),
    ("init: privileged", lambda o: pod(o)["initContainers"][0][SC].update(privileged=True)),
    ("allowPrivilegeEscalation is not false", lambda o: main(o)[SC].pop("allowPrivilegeEscalation")),
    ("capabilities not dropped", lambda o: main(o)[SC]["capabilities"].update(drop=["NET_RAW"])),
    ("adds capabilities", lambda o: main(o)[SC]["capabilities"].update(add=["NET_ADMIN"])),
    ("no cpu in resources.requests", lambda o: main(o)["resources"]["requests"].pop("cpu")),
    ("no memory in resources.requests", lambda o: main(o)["resources"]["requests"].pop("memory")),
    ("no cpu in resources.limits", lambda o: main(o)["resources"]["limits"].pop("cpu")),
    ("no memory in resources.limits", lambda o: main(o)["resources"]["limits"].pop("memory")),
    ("has no tag", lambda o: main(o).update(image="busybox")),
    ("has no tag", lambda o: main(o).update(image="registry.example.com:5000/busybox")),  # a port
    ("uses :latest", lambda o: main(o).update(image="busybox:latest")),
]  # fmt: skip


@pytest.mark.parametrize(("expected", "edit"), POD_RULES, ids=[f"{i}-{r[0]}" for i, r in enumerate(POD_RULES)])  # fmt: skip
@pytest.mark.parametrize("make", [deployment, pytorchjob], ids=["Deployment", "PyTorchJob"])
def test_each_pod_rule_fails_its_violation(make, expected: str, edit) -> None:
    bad = changed(make(), edit)
    only(pod_problems(bad), expected)
    if make is pytorchjob:  # found in the replica's pod template, and said where
        assert all("PyTorchJob/train[Worker]" in p for p in pod_problems(bad))


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_a_container_without_a_probe_fails(probe: str) -> None:
    bad = changed(deployment(), lambda o: main(o).pop(probe))
    assert probe_problems(bad) == [f"Deployment/web/app: no {probe}"]


# ----------------------------------------------------------------------------- secrets


SECRET_RULES = [
    ("Secret objects must be created by the operator",
     lambda o: o.update(kind="Secret", data={"pw": "aHVudGVyMg=="})),
    ("env API_TOKEN has a literal value",
     lambda o: main(o)["env"].append({"name": "API_TOKEN", "value": "t0ken"})),
    ("env AWS_SECRET_ACCESS_KEY has a literal value",
     lambda o: pod(o)["initContainers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "k"})),
    ("credentials in a URL",
     lambda o: main(o)["env"][1].update(value="postgresql://admin:hunter2@db:5432/app")),
    # A reference for the user does not excuse a literal password.
    ("credentials in a URL",
     lambda o: main(o).update(args=["--db", "postgresql://$(DB_USER):hunter2@db/app"])),
]  # fmt: skip


@pytest.mark.parametrize(("expected", "edit"), SECRET_RULES, ids=[f"{i}-{r[0][:20]}" for i, r in enumerate(SECRET_RULES)])  # fmt: skip
def test_each_secret_rule_fails_its_violation(expected: str, edit) -> None:
    only(secret_problems(changed(deployment(), edit)), expected)


def test_a_configmap_may_not_hold_secret_named_keys() -> None:
    config = {
        "kind": "ConfigMap",
        "metadata": {"name": "cfg"},
        "data": {"S3_ENDPOINT": "http://s3"},
    }
    assert secret_problems(config) == []
    config["data"]["MLFLOW_TRACKING_PASSWORD"] = "hunter2"
    assert secret_problems(config) == ["ConfigMap/cfg: key MLFLOW_TRACKING_PASSWORD looks secret"]
    config["data"] = {"S3_ENDPOINT": "http://minio:minio123@s3:9000"}
    only(secret_problems(config), "credentials in a URL")


# ----------------------------------------------------------------------------- RBAC


def rbac() -> list[dict[str, Any]]:
    """A Role and its RoleBinding to a ServiceAccount of the namespace: passes."""
    return [
        {
            "kind": "Role",
            "metadata": {"name": "reader", "namespace": NAMESPACE},
            "rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]}],
        },
        {
            "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": NAMESPACE}],
        },
    ]


def role(objs: list[dict]) -> dict:
    return objs[0]["rules"][0]


def binding(objs: list[dict]) -> dict:
    return objs[1]


RBAC_RULES = [
    ("ClusterRole/admin: cluster-wide",
     lambda o: o.append({"kind": "ClusterRole", "metadata": {"name": "admin"}, "rules": []})),
    ("ClusterRoleBinding/admin: cluster-wide",
     lambda o: o.append({"kind": "ClusterRoleBinding", "metadata": {"name": "admin"}})),
    ("Role/reader: * in verbs", lambda o: role(o).update(verbs=["*"])),
    ("Role/reader: * in resources", lambda o: role(o).update(resources=["*"])),
    ("Role/reader: * in apiGroups", lambda o: role(o).update(apiGroups=["*"])),
    ("Role/reader: nonResourceURLs", lambda o: role(o).update(nonResourceURLs=["/metrics"])),
    ("RoleBinding/reader: binds a ClusterRole", lambda o: binding(o)["roleRef"].update(kind="ClusterRole")),
    ("RoleBinding/reader: subject User alice",
     lambda o: binding(o)["subjects"].append({"kind": "User", "name": "alice"})),
    ("ServiceAccount bot of namespace 'kube-system'",
     lambda o: binding(o)["subjects"][0].update(namespace="kube-system")),
]  # fmt: skip


def test_the_good_rbac_passes_and_grants_what_it_names() -> None:
    assert rbac_problems(rbac(), NAMESPACE) == []
    assert grants(rbac()) == {"bot": {("", "pods", "get"), ("", "pods/log", "get")}}


@pytest.mark.parametrize(("expected", "edit"), RBAC_RULES, ids=[r[0] for r in RBAC_RULES])
def test_each_rbac_rule_fails_its_violation(expected: str, edit) -> None:
    bad = rbac()
    edit(bad)
    only(rbac_problems(bad, NAMESPACE), expected)


def test_grants_follow_each_binding_to_its_role() -> None:
    objs = rbac()
    binding(objs)["subjects"].append(
        {"kind": "ServiceAccount", "name": "ci", "namespace": NAMESPACE}
    )
    role(objs)["verbs"].append("list")
    objs[0]["rules"].append({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create"]})
    assert (
        grants(objs)["ci"]
        == grants(objs)["bot"]
        == {("", r, v) for r in ("pods", "pods/log") for v in ("get", "list")}
        | {("batch", "jobs", "create")}
    )
    assert grants(objs[:1]) == {}  # a Role nobody is bound to grants nothing


# ----------------------------------------------------------------------------- documents


def test_subset_mismatches_finds_each_kind_of_difference() -> None:
    declared = {"spec": {"replicas": 2, "args": ["a", "b"], "labels": {"app": "x"}}}
    superset = {"spec": {"replicas": 2, "args": ["a", "b"], "labels": {"app": "x"}, "more": 1}}
    assert subset_mismatches(declared, superset) == []  # fields the template leaves out: fine
    cases = [
        ({"spec": {"args": ["a", "b"], "labels": {"app": "x"}}}, ".spec.replicas: missing"),
        ({**superset, "spec": {**superset["spec"], "replicas": 3}}, ".spec.replicas: template has 2, render-job 3"),
        ({**superset, "spec": {**superset["spec"], "args": ["a"]}}, ".spec.args: expected 2 items"),
        ({**superset, "spec": {**superset["spec"], "args": ["a", "c"]}}, ".spec.args[1]: template has 'b'"),
        ({**superset, "spec": {**superset["spec"], "labels": "x"}}, ".spec.labels: expected a mapping"),
    ]  # fmt: skip
    for actual, expected in cases:
        (mismatch,) = subset_mismatches(declared, actual)
        assert mismatch.startswith(expected), (expected, mismatch)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"), "'two' is not of type 'integer'"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"), "'Sometimes' is not one of"),
        (lambda j: j["spec"].update(runPolicy={"backofLimit": 3}), "'backofLimit' was unexpected"),
        (lambda j: main(j).update(resource={}), "'resource' was unexpected"),
    ],
)  # fmt: skip
def test_crd_errors_finds_what_the_schema_forbids(edit, expected: str) -> None:
    job = changed(pytorchjob(), edit)
    errors = crd_errors(job)
    assert errors and any(expected in e for e in errors), errors
