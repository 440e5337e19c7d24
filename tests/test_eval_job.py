"""A stage's evaluation and its latent cache as jobs: the Kubernetes Job specs field by field
(validated strictly against Kubernetes' own schema), the wait loop against a stand-in API (no
cluster here), and the local subprocess path's errors. The local paths end to end run in
test_curriculum_flow (and the parts of a latent cache in test_latents)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from mardini.config import load_config
from pipelines.launchers.batch_job import run_job, run_local
from pipelines.launchers.contract import LaunchError
from pipelines.launchers.eval_job import build_eval_job, eval_command, eval_job_name
from pipelines.launchers.latents_job import build_latents_job, latents_command, latents_key
from pipelines.launchers.pytorchjob import KUEUE_QUEUE_LABEL, LaunchConfig
from tests.conftest import CONFIGS

K8S_VERSION = "1.33"
REPO = Path(__file__).resolve().parents[1]
KEY = "0123456789abcdef"


def _job(**launch):
    cfg = load_config(CONFIGS / "paper.yaml")
    command = eval_command("configs/paper.yaml", "joint-512", "s3://b/runs/paper/joint-512/final",
                           f"s3://b/runs/paper/joint-512/eval/{KEY}", "s3://b/shards/videos", "r1")  # fmt: skip
    lc = LaunchConfig(store="s3://b", **launch)
    return ApiClient().sanitize_for_serialization(
        build_eval_job(cfg, "joint-512", command, KEY, "r1", lc)
    )


def test_the_eval_job_is_a_valid_kubernetes_job_on_one_gpu():
    job = _job(gpus_per_node=8, kueue_queue="research")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["metadata"]["name"] == "paper-joint-512-eval-01234567"
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "research"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluation"
    pod = job["spec"]["template"]["spec"]
    assert KUEUE_QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"][:3] == ["python", "-m", "mardini.eval.job"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one, not the node's 8
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MARDINI_STORE"] == "s3://b" and env["TMPDIR"] == "/scratch"
    # On CPU it asks for no GPU at all.
    cpu = _job()["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu


def test_the_latent_cache_is_an_indexed_job_of_one_gpu_pods():
    cfg = load_config(CONFIGS / "paper.yaml")
    shards = "s3://b/shards/videos-512"
    sources = [["autoencoder", "ab" * 32]]
    key = latents_key(cfg, "joint-512", shards, ("train",), sources)
    command = latents_command("configs/paper.yaml", "joint-512", shards, ("train",), 8,
                              f"s3://b/runs/paper/joint-512/latents/{key}.json")  # fmt: skip
    lc = LaunchConfig(store="s3://b", gpus_per_node=8, kueue_queue="research", cpu="88",
                      memory="900Gi", shm_size="64Gi")  # fmt: skip
    job = ApiClient().sanitize_for_serialization(
        build_latents_job(cfg, "joint-512", command, key, 8, lc)
    )
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["metadata"]["name"] == f"paper-joint-512-latents-{key[:8]}"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "latent-cache"
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "research"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 8, 8)
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"][:5] == ["python", "-m", "pipelines.cli", "prep", "latents"]
    assert container["command"][container["command"].index("--parts") + 1] == "8"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # An eighth of a training node each: eight parts fit where one training pod fits.
    assert container["resources"]["limits"]["cpu"] == "11000m"  # 88 / 8
    assert container["resources"]["limits"]["memory"] == "115200Mi"  # 900Gi / 8
    # The key follows what the cache depends on: a retrained autoencoder is a new cache.
    assert latents_key(cfg, "joint-512", shards, ("train",), [["autoencoder", "cd" * 32]]) != key
    assert latents_key(cfg, "joint-512", shards + "x", ("train",), sources) != key


def test_eval_job_names_are_dns_labels_keyed_by_the_evaluation():
    name = eval_job_name("a-very-long-curriculum-name" * 3, "joint-512-temporal", KEY)
    assert len(name) <= 63 and name.endswith("-eval-01234567")
    assert eval_job_name("c", "s", KEY) != eval_job_name("c", "s", "f" * 16)


class _Apis:
    """The two Kubernetes API objects the wait loop uses, answering from a script."""

    def __init__(self, statuses, exists=False):
        self.statuses, self.exists, self.created = list(statuses), exists, []
        self.batch, self.core = self, self

    def create_namespaced_job(self, namespace, job):
        if self.exists:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(job)

    def read_namespaced_job(self, name, namespace):
        succeeded, condition = self.statuses.pop(0)
        conditions = [SimpleNamespace(type=condition, status="True")] if condition else []
        return SimpleNamespace(status=SimpleNamespace(succeeded=succeeded, conditions=conditions))

    def list_namespaced_pod(self, namespace, label_selector):
        assert label_selector.startswith("job-name=")
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name="pod-1"))])

    def read_namespaced_pod_log(self, name, namespace):
        return "loading\nCUDA out of memory\n"


def _kube_job():
    cfg = load_config(CONFIGS / "tiny.yaml")
    return build_eval_job(cfg, "dm", ["python"], KEY, None, LaunchConfig(store="s3://b"))


def test_the_wait_loop_creates_reattaches_and_reports_failures():
    apis = _Apis([(None, None), (1, "Complete")])
    run_job(_kube_job(), poll_s=0, apis=(apis, apis))
    assert len(apis.created) == 1
    again = _Apis([(1, None)], exists=True)  # a rerun finds it: waits on it, creates nothing
    run_job(_kube_job(), poll_s=0, apis=(again, again))
    assert again.created == []
    failed = _Apis([(None, None), (None, "Failed")])
    with pytest.raises(LaunchError, match="failed") as err:
        run_job(_kube_job(), poll_s=0, apis=(failed, failed))
    assert "[pod-1] CUDA out of memory" in str(err.value)
    # An Indexed Job is done when all its parts are, not at the first pod that succeeds.
    cfg = load_config(CONFIGS / "tiny.yaml")
    indexed = build_latents_job(cfg, "dm", ["python"], KEY, 4, LaunchConfig(store="s3://b"))
    parts = _Apis([(1, None), (3, None), (4, None)])
    run_job(indexed, poll_s=0, apis=(parts, parts))
    assert parts.statuses == []
    slow = _Apis([(None, None)] * 100)
    with pytest.raises(LaunchError, match="timed out .*a rerun reattaches"):
        run_job(_kube_job(), timeout_s=0, poll_s=0, apis=(slow, slow))


def test_a_failing_local_evaluation_names_its_command_and_shows_its_last_lines(tmp_path):
    command = ["python", "-m", "mardini.eval.job", "--config", str(tmp_path / "none.yaml"),
               "--stage", "dm", "--export", "x", "--out", str(tmp_path / "out"), "--data", "y"]  # fmt: skip
    with pytest.raises(LaunchError, match=r"evaluation failed \(exit 1\)") as err:
        run_local(command, {}, timeout_s=300, what="evaluation")
    assert sys.executable in str(err.value) and "config file not found" in str(err.value)


class _Cluster(_Apis):
    """A stand-in Kubernetes API that runs a created Job's pods here: each index's container
    command, with the index in JOB_COMPLETION_INDEX, from the checkout (the image's WORKDIR)."""

    def __init__(self, env):
        super().__init__([])
        self.env = env

    def create_namespaced_job(self, namespace, job):
        self.created.append(job)
        (container,) = job.spec.template.spec.containers
        pod_env = {e.name: e.value for e in container.env if e.value is not None}
        self.parts = job.spec.completions or 1
        for index in range(self.parts):
            env = {**os.environ, **pod_env, **self.env, "JOB_COMPLETION_INDEX": str(index)}
            done = subprocess.run([sys.executable, *container.command[1:]], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr

    def read_namespaced_job(self, name, namespace):
        return SimpleNamespace(status=SimpleNamespace(succeeded=self.parts, conditions=[]))


def test_the_flow_caches_latents_through_an_indexed_job(tmp_path, train_shards, monkeypatch):
    """The kubeflow branch of the flow's cache-latents task up to the Kubernetes API: the Job
    it creates, run pod by pod by a stand-in, leaves the cache and the record the flow reads."""
    from pipelines import curriculum_flow
    from pipelines.launchers import batch_job

    shards = str(tmp_path / "shards")
    shutil.copytree(train_shards, shards)
    store = str(tmp_path / "store")
    cluster = _Cluster({"DS_ACCELERATOR": "cpu"})
    monkeypatch.setattr(batch_job, "_kubernetes_apis", lambda: (cluster, cluster))
    monkeypatch.setenv("MARDINI_K8S_LATENT_PARTS", "2")
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.shards={shards}"])
    url = curriculum_flow.cache_stage_latents.fn(cfg, "dm", store, launcher="kubeflow")
    (job,) = cluster.created
    assert job.spec.completions == 2 and job.spec.completion_mode == "Indexed"
    record = json.loads((Path(url) / "latents.json").read_text())
    assert record["splits"]["train"]["clips"] == 6 and "val" not in record["splits"]
    (copy,) = (Path(store) / "runs" / "tiny" / "dm" / "latents").glob("*.json")
    assert json.loads(copy.read_text())["url"] == url
