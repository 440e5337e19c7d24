"""Build the Kubeflow ``PyTorchJob`` that trains one curriculum stage (pure: no cluster access).

The job follows the launch contract (``pipelines.launchers.contract``): every replica runs

    torchrun --nnodes $PET_NNODES --nproc-per-node $PET_NPROC_PER_NODE
             --rdzv-backend $PET_RDZV_BACKEND --rdzv-endpoint $PET_RDZV_ENDPOINT
             --rdzv-id $PET_RDZV_ID --max-restarts $PET_MAX_RESTARTS
             -m mardini.train --config C --stage S

The job is elastic: ``nnodes`` Worker replicas and an ``elasticPolicy`` (c10d rendezvous hosted
by the agent on ``<job>-worker-0``, ``minReplicas = maxReplicas = nnodes``, ``maxRestarts``).
When one rank dies, every node's torchrun restarts its workers and the group resumes from the
stage's ``latest`` checkpoint, with no container restart; a pod that is lost is recreated by
the operator (``restartPolicy: OnFailure``) and rejoins the rendezvous. Node ranks come from
the rendezvous, not from the pod names, which is fine: checkpoints live in the store and each
global rank loads its own partition from there.

The training operator (v1 API) injects the ``PET_*`` variables into the ``pytorch`` container of
every replica. We reference them with Kubernetes' own ``$(VAR)`` expansion in ``command`` rather
than through ``bash -c``: kubelet substitutes them before exec, so torchrun is PID 1 and receives
SIGTERM directly on eviction or preemption (no shell in between to swallow it), nothing needs
quoting, and the image needs no shell at all. A variable the operator did not set stays literal
(``$(PET_NNODES)``) and torchrun fails at once with a message naming it, instead of a shell
silently expanding it to an empty string.

What a GPU cluster needs comes from ``LaunchConfig`` (``MARDINI_K8S_*``): a scratch volume at
``/scratch`` (``TMPDIR``, where checkpoint partitions wait for their upload) requested as
``ephemeral-storage``; the node selector and tolerations of the GPU pool; and, for gang
scheduling, either a Kueue ``LocalQueue`` (label ``kueue.x-k8s.io/queue-name``) or a
``runPolicy.schedulingPolicy`` for the operator's gang scheduler (Volcano, scheduler-plugins).

``build_pytorchjob`` returns the kubeflow-training SDK model so the flow can hand it straight to
``TrainingClient.create_job``; ``to_yaml`` renders it for ``mardini k8s render-job`` and the docs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import yaml
from kubeflow.training.models import (
    KubeflowOrgV1ElasticPolicy,
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
    KubeflowOrgV1SchedulingPolicy,
)
from kubernetes.client import (
    ApiClient,
    V1Capabilities,
    V1ConfigMapEnvSource,
    V1Container,
    V1ContainerPort,
    V1EmptyDirVolumeSource,
    V1EnvFromSource,
    V1EnvVar,
    V1ObjectMeta,
    V1PodSecurityContext,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecretEnvSource,
    V1SecurityContext,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)
from kubernetes.utils import parse_quantity
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mardini.config import CurriculumConfig
from pipelines.launchers.contract import ELASTIC_ENV, contract_words

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
# The operator finds the training container by this name (it injects PET_* env and the port).
CONTAINER_NAME = "pytorch"
# The operator reads the master port from the container port with this name.
PORT_NAME = "pytorchjob-port"
GPU_RESOURCE = "nvidia.com/gpu"
# The non-root user baked into the Dockerfile (`USER 10001:10001`); the two must agree.
IMAGE_UID = 10001
LABEL_PREFIX = "mardini.io"
ENV_PREFIX = "MARDINI_K8S_"
# Where the scratch volume is mounted; TMPDIR points there, and every local file the trainer
# writes (checkpoint partitions before upload, rank 0's export, the MLflow spool) is a tempfile.
SCRATCH_PATH = "/scratch"
# Kueue admits a job whose metadata carries this label through the named LocalQueue.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# A label value, or the name part of a label key: 63 characters at most, alphanumeric at both ends.
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# The repository root when running from a checkout; the image copies it to /workspace.
CHECKOUT = Path(__file__).resolve().parents[2]


def _package_version() -> str:
    try:
        return version("mardini")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"


def _setting(field: str) -> str:
    """A LaunchConfig field with the variable that sets it, for error messages."""
    return f"{field} ({ENV_PREFIX}{field.upper()})"


def _label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key (``[prefix/]name``), or None if it is."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.fullmatch(prefix)):
        return f"its prefix {prefix!r} is not a DNS subdomain (e.g. nvidia.com)"
    if not LABEL_NAME.fullmatch(name):
        return f"its name {name!r} is not 1-63 of [A-Za-z0-9_.-], alphanumeric at both ends"
    return None


class Toleration(BaseModel):
    """A pod toleration as written in the overlay (camelCase JSON), checked as the API server
    checks it, so a typo fails at ``render-job`` instead of at submission."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # None with operator Exists: tolerate every taint.
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    # None: every effect of the matching taints.
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    # How long a pod stays on a node after a NoExecute taint appears; None: forever.
    toleration_seconds: int | None = Field(None, alias="tolerationSeconds")

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without key must have operator Exists")
        if self.key is not None and (problem := _label_key_problem(self.key)):
            raise ValueError(f"key {self.key!r} is not a taint key: {problem}")
        if self.operator == "Exists" and self.value:
            raise ValueError(f"operator Exists takes no value (got {self.value!r}); use Equal")
        if self.operator == "Equal" and self.value and not LABEL_NAME.fullmatch(self.value):
            raise ValueError(f"value {self.value!r} is not a valid taint value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class LaunchConfig(BaseModel):
    """Where and how big a stage's PyTorchJob is; cluster defaults come from ``MARDINI_K8S_*``."""

    model_config = ConfigDict(extra="forbid")

    # Pin a tag (or digest): `latest` makes a resumed stage run different code than it started on.
    image: str = Field(default_factory=lambda: f"mardini:{_package_version()}", min_length=1)
    image_pull_policy: str = "IfNotPresent"
    namespace: str = "mardini"
    nnodes: int = Field(1, ge=1)
    # Processes per pod; None means one per GPU (or 1 on CPU).
    nproc_per_node: int | None = Field(None, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    # Requests equal limits so training pods get the Guaranteed QoS class: they are the last to
    # be evicted under node memory pressure, and a 3B-parameter job should not be the first.
    cpu: str = "4"
    memory: str = "16Gi"
    # /dev/shm (DataLoader workers, NCCL) is tmpfs and counts against the memory limit above.
    shm_size: str = "2Gi"
    # Local disk at /scratch (TMPDIR) for this pod's checkpoint partitions on their way to the
    # store and rank 0's final export: an emptyDir of this size, and the pod's ephemeral-storage
    # request and limit (which also cover its logs), so the scheduler places it on a node with
    # that much disk and an overflow evicts this pod, not the node's other tenants. Size it to
    # 12 bytes x trained parameters / nnodes (fp32 weights and Adam moments) + 4 bytes x
    # parameters (the export), with room to spare.
    scratch_size: str = "50Gi"
    # Pods of the latent cache's Indexed Job (data.latents), one GPU and 1/gpus_per_node of a
    # training pod's CPU and memory each (pipelines.launchers.batch_job).
    latent_parts: int = Field(8, ge=1)
    # MARDINI_STORE for the job; None leaves it to ConfigMap mardini-config, the cluster's default.
    store: str | None = None
    # Short service name: the job runs in the namespace of the MLflow server (k8s/base).
    tracking_uri: str = "http://mlflow:5000"
    # Credentials come from these Secrets as environment variables (never from config files).
    secrets: list[str] = Field(default_factory=lambda: ["mardini-s3", "mardini-mlflow"])
    # Cluster-wide non-secret settings (S3 endpoint for MinIO, ...); None to leave it out.
    config_map: str | None = "mardini-config"
    service_account: str = "mardini-trainer"
    # Node labels the pod must match (a GPU pool) and taints it tolerates; default: any node.
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    # Pod priority (PriorityClass), also the gang's priority under Kueue or a gang scheduler.
    priority_class: str | None = None
    # Gang scheduling, so that no stage holds some GPUs while it waits for the rest: a Kueue
    # LocalQueue admits the whole job or none of it; or the training operator, started with
    # --gang-scheduler-name, makes a PodGroup from runPolicy.schedulingPolicy. One or neither.
    kueue_queue: str | None = None
    gang_scheduler: Literal["volcano", "scheduler-plugins"] | None = None
    # The Volcano queue of the PodGroup (volcano only; None: Volcano's default queue).
    gang_queue: str | None = None
    # Restarts of the worker group (all ranks, from the latest checkpoint) that torchrun makes
    # after a rank fails, inside the running pods (elasticPolicy.maxRestarts).
    max_restarts: int = Field(3, ge=0)
    # Container restarts (OnFailure) the job tolerates before it is marked Failed: a pod lost
    # or a torchrun that used up max_restarts.
    backoff_limit: int = Field(3, ge=0)
    # Keep finished pods and their logs for post-mortems, then let the operator collect them.
    ttl_seconds_after_finished: int | None = Field(3 * 24 * 3600, ge=0)
    active_deadline_seconds: int | None = Field(None, ge=1)
    master_port: int = Field(23456, ge=1, le=65535)
    # Time for torchrun to stop its workers and for an in-flight checkpoint upload to finish.
    termination_grace_seconds: int = Field(120, ge=0)

    @field_validator("cpu", "memory", "shm_size", "scratch_size")
    @classmethod
    def _quantity(cls, text: str) -> str:
        try:
            amount = parse_quantity(text)
        except ValueError:
            raise ValueError(
                f"{text!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi, 1.5Ti)"
            ) from None
        if amount <= 0:
            raise ValueError(f"{text!r} must be more than zero")
        return text

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, selector: dict[str, str]) -> dict[str, str]:
        for key, value in selector.items():
            if problem := _label_key_problem(key):
                raise ValueError(f"{key!r} is not a node label key: {problem}")
            if value and not LABEL_NAME.fullmatch(value):
                raise ValueError(f"{key}={value!r}: not a label value (63 of [A-Za-z0-9_.-])")
        return selector

    @field_validator("kueue_queue")
    @classmethod
    def _queue_name(cls, name: str | None) -> str | None:
        if name is not None and not (LABEL_NAME.fullmatch(name) and DNS_SUBDOMAIN.fullmatch(name)):
            raise ValueError(f"{name!r} is not a LocalQueue name (lower-case DNS name, 63 at most)")
        return name

    @model_validator(mode="after")
    def _one_gang_scheduler(self) -> LaunchConfig:
        if self.kueue_queue and self.gang_scheduler:
            raise ValueError(
                f"{_setting('kueue_queue')} and {_setting('gang_scheduler')} both schedule the "
                "job as a gang: set the one your cluster runs"
            )
        if self.gang_queue and self.gang_scheduler != "volcano":
            raise ValueError(
                f"{_setting('gang_queue')} names a Volcano queue and needs "
                f"{ENV_PREFIX}GANG_SCHEDULER=volcano; a Kueue LocalQueue is "
                f"{ENV_PREFIX}KUEUE_QUEUE"
            )
        return self

    @model_validator(mode="after")
    def _store_known(self) -> LaunchConfig:
        if self.store is None and self.config_map is None:
            raise ValueError("store is required when no config_map provides MARDINI_STORE")
        return self

    @model_validator(mode="after")
    def _procs_fit_gpus(self) -> LaunchConfig:
        if self.gpus_per_node and self.nproc_per_node and self.nproc_per_node > self.gpus_per_node:
            raise ValueError(
                f"nproc_per_node {self.nproc_per_node} > gpus_per_node {self.gpus_per_node}: "
                "every rank needs its own GPU; lower nproc_per_node or request more GPUs"
            )
        return self

    @property
    def procs(self) -> int:
        """Processes per pod: the explicit value, else one per GPU, else 1."""
        return self.nproc_per_node or self.gpus_per_node or 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> LaunchConfig:
        """Defaults from ``MARDINI_K8S_<FIELD>`` variables (JSON for lists/maps), then overrides.

        An empty variable leaves a setting whose default is None unset, so an overlay can clear
        what a base sets."""
        values: dict[str, Any] = {}
        names: dict[str, str] = {}
        for name, field in cls.model_fields.items():
            key = ENV_PREFIX + name.upper()
            if key not in environ:
                continue
            if overrides.get(name) is None:
                names[name] = key
            raw = environ[key]
            origin = getattr(field.annotation, "__origin__", None)
            if raw == "" and field.default is None:
                values[name] = None
                continue
            try:
                values[name] = json.loads(raw) if origin in (list, dict) else raw
            except json.JSONDecodeError as err:
                raise ValueError(f"{key}: not valid JSON ({err.msg}): {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ValueError(
                f"invalid launch settings (from {ENV_PREFIX}* or arguments):{_explain(err, names)}"
            ) from None


def _explain(err: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """One indented line per problem: ``setting: message`` (no setting for whole-model checks);
    ``names`` maps fields to what to call them (their environment variables)."""
    lines = []
    for e in err.errors():
        field, *rest = e["loc"] or [""]
        where = (names or {}).get(field, field) + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest
        )
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n  " + "\n  ".join(lines)


def dns_label(text: str, max_len: int) -> str:
    """Lower-case DNS-1035 label (services are named after the job): [a-z]([-a-z0-9]*[a-z0-9])?."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"mardini-{label}".strip("-")
    return label[:max_len].rstrip("-")


def _label_value(text: str) -> str:
    """A valid label value: at most 63 characters of [A-Za-z0-9_.-], alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.")


def image_config_path(path: str | Path) -> str:
    """A config's path inside the image, whose WORKDIR /workspace mirrors the source checkout."""
    path = Path(path)
    try:
        return path.resolve().relative_to(CHECKOUT).as_posix()
    except ValueError:
        if path.is_absolute():
            raise ValueError(
                f"{path} is outside the source checkout {CHECKOUT}, so its path inside the "
                "image is unknown: pass config_path (e.g. configs/paper.yaml)"
            ) from None
        return path.as_posix()  # already relative: taken as relative to /workspace


def job_name(curriculum: str, stage: str, attempt: int = 1) -> str:
    """Deterministic job name per (curriculum, stage, attempt): a second submission of the same
    attempt is refused (409), which is how a rerun finds the job to reattach to. The first
    attempt has no suffix; later ones end in ``-a{attempt}``."""
    # 50 leaves room for the "-worker-NNN" suffix of pod and service names (63 at most).
    suffix = f"-a{attempt}" if attempt > 1 else ""
    return dns_label(f"{curriculum}-{stage}", max_len=50 - len(suffix)) + suffix


def job_labels(cfg: CurriculumConfig, stage: str, run_id: str | None) -> dict[str, str]:
    """Labels tying the job and its pods to the curriculum, the stage and the MLflow run."""
    labels = {
        "app.kubernetes.io/name": "mardini",
        "app.kubernetes.io/component": "training",
        f"{LABEL_PREFIX}/curriculum": _label_value(cfg.name),
        f"{LABEL_PREFIX}/stage": _label_value(stage),
    }
    if run_id:
        labels[f"{LABEL_PREFIX}/mlflow-run-id"] = _label_value(run_id)
    return labels


def launch_command(config_path: str, stage: str) -> list[str]:
    """The launch contract as an exec-form command with Kubernetes ``$(VAR)`` references."""
    words = contract_words(config_path, stage)
    return [re.sub(r"^\$(PET_[A-Z_]+)$", r"$(\1)", w) for w in words]


def build_pytorchjob(
    cfg: CurriculumConfig,
    stage: str,
    *,
    run_id: str | None = None,
    config_path: str | None = None,
    name: str | None = None,
    launch: LaunchConfig | None = None,
    **overrides: Any,
) -> KubeflowOrgV1PyTorchJob:
    """The PyTorchJob for one stage: ``nnodes`` elastic Workers running the launch contract.

    ``launch`` gives the defaults and keyword ``overrides`` (any LaunchConfig field: ``image``,
    ``namespace``, ``nnodes``, ``nproc_per_node``, ``gpus_per_node``, ``cpu``, ``memory``,
    ``shm_size``, ``scratch_size``, ``store``, ``secrets``, ``node_selector``, ``tolerations``,
    ``kueue_queue``, ``gang_scheduler``, ...) replace them; an unknown keyword is an error.
    ``config_path`` is the config as the container sees it (relative to ``/workspace``);
    it defaults to ``cfg.source``.
    """
    cfg.stage(stage)  # fail here, naming the stages that exist, not in a pod an hour later
    base = launch or LaunchConfig()
    try:
        lc = LaunchConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as err:
        raise ValueError(f"invalid launch settings:{_explain(err)}") from None
    if config_path is None:
        if not cfg.source:
            raise ValueError(
                "config_path is required when the config was not loaded from a file "
                "(it is the path of the config inside the image, e.g. configs/paper.yaml)"
            )
        config_path = image_config_path(cfg.source)

    labels = job_labels(cfg, stage, run_id)
    command = launch_command(config_path, stage)

    def replica(count: int) -> KubeflowOrgV1ReplicaSpec:
        # A fresh template per replica type: the SDK models are mutable and must not be shared.
        return KubeflowOrgV1ReplicaSpec(
            replicas=count,
            restart_policy="OnFailure",
            template=V1PodTemplateSpec(
                metadata=V1ObjectMeta(labels=dict(labels)), spec=pod_spec(lc, command)
            ),
        )

    # Elastic jobs are Workers only (the operator's webhook requires them; the rendezvous is
    # hosted on worker-0). min = max: a stage's ZeRO-3 partitions need the same world size.
    name = name or job_name(cfg.name, stage)
    replicas = {"Worker": replica(lc.nnodes)}
    elastic = KubeflowOrgV1ElasticPolicy(
        rdzv_backend="c10d",
        rdzv_id=name,
        min_replicas=lc.nnodes,
        max_replicas=lc.nnodes,
        max_restarts=lc.max_restarts,
    )
    job_meta_labels = dict(labels)
    if lc.kueue_queue:
        # On the job only: Kueue admits (unsuspends) the job as a whole, pods need no label.
        job_meta_labels[KUEUE_QUEUE_LABEL] = lc.kueue_queue
    scheduling = None
    if lc.gang_scheduler:
        # The operator's PodGroup: all Workers or none (elastic min = max = nnodes).
        scheduling = KubeflowOrgV1SchedulingPolicy(
            min_available=lc.nnodes, queue=lc.gang_queue, priority_class=lc.priority_class
        )

    return KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=V1ObjectMeta(
            name=name,
            namespace=lc.namespace,
            labels=job_meta_labels,
            annotations={f"{LABEL_PREFIX}/config": config_path},
        ),
        spec=KubeflowOrgV1PyTorchJobSpec(
            elastic_policy=elastic,
            nproc_per_node=str(lc.procs),
            pytorch_replica_specs=replicas,
            run_policy=KubeflowOrgV1RunPolicy(
                backoff_limit=lc.backoff_limit,
                # Keep pods of a finished job so `kubectl logs` works for the post-mortem.
                clean_pod_policy="None",
                ttl_seconds_after_finished=lc.ttl_seconds_after_finished,
                active_deadline_seconds=lc.active_deadline_seconds,
                scheduling_policy=scheduling,
            ),
        ),
    )


def pod_spec(lc: LaunchConfig, command: list[str]) -> V1PodSpec:
    """The pod every replica runs: non-root, GPUs by resource name, secrets as env, /dev/shm,
    scratch disk, and where the cluster lets it run."""
    env = [
        V1EnvVar(name="MLFLOW_TRACKING_URI", value=lc.tracking_uri),
        # The trainer's local files are tempfiles: on the scratch volume, not the image's layer.
        V1EnvVar(name="TMPDIR", value=SCRATCH_PATH),
    ]
    if lc.store:
        env.insert(0, V1EnvVar(name="MARDINI_STORE", value=lc.store))
    # On SIGTERM torchrun passes the signal on and SIGKILLs its workers after this many seconds
    # (30 by default): leave them the pod's grace period, less 10 s, to finish the step and
    # save (mardini.train.engine.StopRequest).
    shutdown = max(1, lc.termination_grace_seconds - 10)
    env.append(V1EnvVar(name="TORCH_ELASTIC_SHUTDOWN_TIMEOUT", value=str(shutdown)))
    # A rendezvous store per restart round: shared across rounds, restarted ranks read the dead
    # ranks' addresses (pytorch/pytorch#135712); see pipelines.launchers.contract.
    env.extend(V1EnvVar(name=k, value=v) for k, v in ELASTIC_ENV.items())
    env_from = [
        V1EnvFromSource(secret_ref=V1SecretEnvSource(name=secret, optional=False))
        for secret in lc.secrets
    ]
    if lc.config_map:
        # First, so the explicit `env` above and the Secrets win over cluster defaults.
        env_from.insert(0, V1EnvFromSource(config_map_ref=V1ConfigMapEnvSource(name=lc.config_map)))

    amounts: dict[str, str] = {
        "cpu": lc.cpu,
        "memory": lc.memory,
        "ephemeral-storage": lc.scratch_size,
    }
    if lc.gpus_per_node:
        amounts[GPU_RESOURCE] = str(lc.gpus_per_node)
    tolerations = [V1Toleration(**t.model_dump()) for t in lc.tolerations]
    if lc.gpus_per_node and not any(t.key == GPU_RESOURCE for t in tolerations):
        # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule; harmless where not.
        tolerations.append(V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule"))

    container = V1Container(
        name=CONTAINER_NAME,
        image=lc.image,
        image_pull_policy=lc.image_pull_policy,
        command=command,
        env=env,
        env_from=env_from,
        ports=[V1ContainerPort(name=PORT_NAME, container_port=lc.master_port, protocol="TCP")],
        resources=V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts)),
        volume_mounts=[
            V1VolumeMount(name="dshm", mount_path="/dev/shm"),
            V1VolumeMount(name="scratch", mount_path=SCRATCH_PATH),
        ],
        security_context=V1SecurityContext(
            allow_privilege_escalation=False,
            privileged=False,
            capabilities=V1Capabilities(drop=["ALL"]),
        ),
    )
    return V1PodSpec(
        service_account_name=lc.service_account,
        # Training talks to S3 and MLflow, never to the Kubernetes API.
        automount_service_account_token=False,
        security_context=V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=IMAGE_UID,
            run_as_group=IMAGE_UID,
            fs_group=IMAGE_UID,
            seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
        ),
        containers=[container],
        # The container runtime's default /dev/shm is 64 MiB: NCCL and DataLoader workers die
        # with bus errors on it. A Memory emptyDir gives a tmpfs of the size asked for.
        volumes=[
            V1Volume(
                name="dshm",
                empty_dir=V1EmptyDirVolumeSource(medium="Memory", size_limit=lc.shm_size),
            ),
            # Node disk, removed with the pod: checkpoints are durable only in the store.
            V1Volume(name="scratch", empty_dir=V1EmptyDirVolumeSource(size_limit=lc.scratch_size)),
        ],
        node_selector=lc.node_selector or None,
        tolerations=tolerations or None,
        priority_class_name=lc.priority_class,
        termination_grace_period_seconds=lc.termination_grace_seconds,
    )


def to_dict(job: KubeflowOrgV1PyTorchJob) -> dict[str, Any]:
    """The job as the plain JSON-able dict the API server receives (None fields dropped)."""
    return ApiClient().sanitize_for_serialization(job)


def to_yaml(job: KubeflowOrgV1PyTorchJob) -> str:
    """The job as YAML, keys in the order the SDK declares them."""
    return yaml.safe_dump(to_dict(job), sort_keys=False)
