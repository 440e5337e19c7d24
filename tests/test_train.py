"""The DeepSpeed ZeRO-3 trainer: 2 CPU ranks under torchrun, real shards, SQLite MLflow, moto S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from mardini.config import load_config
from mardini.export import load_init, read_final
from mardini.layout import stage_dir
from mardini.models import build_model
from mardini.storage import filesystem, join
from pipelines.launchers.local import run_local
from tests.conftest import CONFIGS

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

STEPS = 6


def _config(tmp_path: Path, shards: str, **data) -> Path:
    """tiny.yaml's curriculum on the debug preset: 6 steps a stage, checkpoints every 2."""
    raw = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    raw["name"] = "trainer-test"
    raw["model"] = {"preset": "debug"}
    raw["data"] = {"dataset": "clips", "shards": shards, "shuffle_buffer": 4, **data}
    for stage in raw["stages"]:
        stage.update(
            steps=STEPS,
            checkpoint_every=2,
            log_every=1,
            micro_batch=1,
            frames=4,
            resolution=32,
            gates=[],
        )
        stage["optimizer"] = {"lr": 3e-3, "warmup_steps": 0}
    path = tmp_path / "trainer-test.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _torchrun(
    config: Path,
    stage: str,
    store: str,
    env: dict | None = None,
    timeout: int = 300,
    nproc: int = 2,
):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "mardini.train", "--config", str(config), "--stage", stage, "--store", store,
    ]  # fmt: skip
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MARDINI_FAULT", None)
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def _ok(result) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _run(tracking_uri: str, stage: str):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("trainer-test").experiment_id],
        filter_string=f"tags.stage = '{stage}'",
    )
    assert len(runs) == 1, f"expected one MLflow run for {stage}, found {len(runs)}"
    return client, runs[0]


def _losses(tracking_uri: str, stage: str) -> dict[int, float]:
    client, run = _run(tracking_uri, stage)
    # A resumed run logs the re-done steps again; the last value of each step is what counts.
    return {
        m.step: m.value
        for m in sorted(
            client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp
        )
    }


# The parts each stage kind trains, written out (not read from mardini.config.TRAINED_PARTS).
TRAINED = {
    "mar": ("planner", "planner_head"),
    "dm": ("generator",),
    "joint-interpolation": ("planner", "generator"),
}


def _starting_weights(curriculum: dict, stage: str) -> dict[str, torch.Tensor]:
    """The weights ``stage`` started from: the model built under the curriculum's seed (as the
    trainer and ``stage_autoencoder`` build it), then its ``init_from`` exports loaded."""
    cfg = load_config(curriculum["config"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    load_init(model, cfg.stage(stage).init_from, curriculum["store"], cfg.name)
    return model.state_dict()


def _steps_since(tracking_uri: str, stage: str, since: float) -> list[int]:
    """The steps whose loss the stage's MLflow run got from a launch started at ``since``
    (time.time()): a resumed launch logs the steps after the checkpoint it resumed from."""
    client, run = _run(tracking_uri, stage)
    history = client.get_metric_history(run.info.run_id, "loss")
    return sorted(m.step for m in history if m.timestamp >= since * 1000)


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory, train_shards):
    """All three model stage kinds trained once, in order, on a local store."""
    tmp = tmp_path_factory.mktemp("curriculum")
    config = _config(tmp, train_shards, overfit_batch=True)
    store = str(tmp / "store")
    results = {}
    for stage in ("mar", "dm", "joint-interpolation"):
        results[stage] = _torchrun(config, stage, store)
        _ok(results[stage])
    return {"config": config, "store": store, "uri": f"sqlite:///{Path(store).resolve()}/mlflow.db"}


@pytest.mark.parametrize("stage", ["mar", "dm", "joint-interpolation"])
def test_each_stage_kind_trains_and_exports(curriculum, stage):
    losses = _losses(curriculum["uri"], stage)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[STEPS] < losses[1], f"{stage}: loss did not fall on a repeated batch: {losses}"
    state, meta = read_final(join(stage_dir(curriculum["store"], "trainer-test", stage), "final"))
    assert meta["stage"] == stage and meta["steps"] == STEPS
    trained = TRAINED[stage]
    assert meta["trained_parts"] == list(trained)
    # The sampler its gates measured, which generation and serving default to.
    assert meta["sample"] == load_config(curriculum["config"]).sample.model_dump(mode="json")
    # The export holds every part; only the trained ones moved from where the stage started.
    start = _starting_weights(curriculum, stage)
    assert state.keys() == start.keys()
    for part in {k.split(".", 1)[0] for k in start}:
        keys = [k for k in start if k.split(".", 1)[0] == part]
        moved = [k for k in keys if not torch.equal(state[k], start[k])]
        if part in trained:  # most of it: a few weights get no gradient (dm's cross q/k norms)
            assert len(moved) > len(keys) // 2, f"{stage}: {part} barely moved: {moved}"
        else:
            assert not moved, f"{stage} did not train {part}, yet {moved[:5]} changed"


def test_joint_starts_from_the_mar_and_dm_finals(curriculum):
    cfg = load_config(curriculum["config"])
    mar, _ = read_final(join(stage_dir(curriculum["store"], cfg.name, "mar"), "final"))
    dm, _ = read_final(join(stage_dir(curriculum["store"], cfg.name, "dm"), "final"))
    model = build_model(cfg.model)
    loaded = load_init(
        model, cfg.stage("joint-interpolation").init_from, curriculum["store"], cfg.name
    )
    assert loaded == ["mar: planner, planner_head", "dm: generator"]
    own = model.state_dict()
    for key, value in own.items():
        part = key.split(".", 1)[0]
        if part in ("planner", "planner_head"):
            assert torch.equal(value, mar[key]), key
        elif part == "generator":
            assert torch.equal(value, dm[key]), key
    # mar never trained the generator, dm never trained the planner: those copies differ.
    assert not torch.equal(mar["generator.patch_embed.weight"], dm["generator.patch_embed.weight"])


def test_mlflow_run_holds_params_metrics_artifacts(curriculum):
    client, run = _run(curriculum["uri"], "dm")
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["stage.kind"] == "dm" and params["stage.steps"] == str(STEPS)
    assert params["model.generator.depth"] == "2" and params["world_size"] == "2"
    assert {
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "peak_memory_mb",
        "tflops_per_s",  # analytic model FLOPs per second; MFU only where a GPU peak is known
    } <= set(metrics)
    assert "mfu" not in metrics and metrics["tflops_per_s"] > 0
    assert tags["curriculum"] == "trainer-test" and tags["stage"] == "dm" and tags["git_commit"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "config")]
    assert "config/resolved_config.yaml" in artifacts and "config/trainer-test.yaml" in artifacts


def test_a_resumed_stage_reads_its_checkpoint_not_its_init_from(curriculum, tmp_path):
    """joint-interpolation starts from the mar and dm exports (init_from). Resumed from its
    step-4 checkpoint it must not read them again (each rank would download them whole at
    every restart): here they are deleted, and the resumed export still equals the
    uninterrupted one, bit for bit, frozen weights included. The local scratch of the restore
    and of each save is gone afterwards (it used to stay in the temp dir, one per rank and
    stage)."""
    store = tmp_path / "store"
    shutil.copytree(curriculum["store"], store)
    for stage in ("mar", "dm"):
        shutil.rmtree(Path(stage_dir(str(store), "trainer-test", stage)) / "final")
    joint = Path(stage_dir(str(store), "trainer-test", "joint-interpolation"))
    shutil.rmtree(joint / "final")
    shutil.rmtree(joint / "checkpoints" / f"step-{STEPS}")
    (joint / "checkpoints" / "latest").write_text("step-4")
    since = time.time()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    _ok(_torchrun(curriculum["config"], "joint-interpolation", str(store), env={"TMPDIR": str(scratch)}))  # fmt: skip
    uri = f"sqlite:///{store.resolve()}/mlflow.db"
    assert _steps_since(uri, "joint-interpolation", since) == [5, 6]  # resumed after step-4
    assert not list(scratch.glob("mardini-ckpt-*"))
    want, _ = read_final(join(stage_dir(curriculum["store"], "trainer-test", "joint-interpolation"), "final"))  # fmt: skip
    got, _ = read_final(str(joint / "final"))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_secrets_never_become_params():
    from mardini.mlflow_setup import flatten

    flat = flatten({"data": {"aws_secret_access_key": "x", "token": "y", "shards": "s3://b"}})
    assert flat == {"data.shards": "s3://b"}


# ----------------------------------------------------------------------------- crash and resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_shards):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = _config(tmp, train_shards)
    store = str(tmp / "store")
    _ok(_torchrun(config, "dm", store))
    return _losses(f"sqlite:///{Path(store).resolve()}/mlflow.db", "dm")


def test_killed_rank_resumes_from_latest_and_matches(tmp_path, train_shards, uninterrupted):
    config = _config(tmp_path, train_shards)
    store = str(tmp_path / "store")
    # Rank 1 is SIGKILLed as step 4 starts: step-2 is the last complete checkpoint.
    killed = _torchrun(config, "dm", store, env={"MARDINI_FAULT": "step:3:1"})
    assert killed.returncode != 0
    ckpts = Path(stage_dir(store, "trainer-test", "dm")) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-2"
    # Each rank keeps its loader's lane positions beside its partitions: the resume seeks.
    for rank in (0, 1):
        lanes = json.loads((ckpts / "step-2" / f"rank_{rank}_state.json").read_text())["loader"]
        assert lanes and all(lane["position"] > 0 for lane in lanes.values())
    # One rank cannot take two ranks' ZeRO-3 partitions: refused before anything is loaded.
    fewer = _torchrun(config, "dm", store, nproc=1)
    assert fewer.returncode != 0
    assert "written by 2 ranks and this job has 1" in fewer.stderr + fewer.stdout
    assert (ckpts / "latest").read_text() == "step-2"
    since = time.time()
    _ok(_torchrun(config, "dm", store))
    uri = f"sqlite:///{Path(store).resolve()}/mlflow.db"
    assert _steps_since(uri, "dm", since) == [3, 4, 5, 6]  # resumed after step-2
    losses = _losses(uri, "dm")
    # Bit-exact on CPU: same data position, same per-step RNG, restored optimizer and LR state.
    assert losses == uninterrupted


def test_a_killed_rank_restarts_the_group_which_resumes_with_no_human(
    tmp_path, train_shards, uninterrupted
):
    """The launch contract is elastic: under the local launcher (the PyTorchJob's command and
    variables, a c10d rendezvous, --max-restarts), rank 1 dies as step 4 starts and torchrun
    restarts both ranks, which resume from step-2 in the same launch and the same MLflow run."""
    config = _config(tmp_path, train_shards)
    store = str(tmp_path / "store")
    env = {"MARDINI_STORE": store, "MARDINI_FAULT": "step:3:1"}
    steps: list[int] = []
    run_local(
        str(config), "dm", env=env, max_restarts=1, cwd=str(REPO), timeout_s=600,
        on_step=lambda event: steps.append(event.step),
    )  # fmt: skip
    # One launch, one restart: the steps it reports go back once, to the one after step-2.
    back = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(back) == 1 and steps[back[0] :] == [3, 4, 5, 6], steps
    # Step 3's line may or may not get out before the group is torn down.
    assert steps[: back[0]] in ([1, 2], [1, 2, 3]), steps
    uri = f"sqlite:///{Path(store).resolve()}/mlflow.db"
    assert _run(uri, "dm")[1].info.status == "FINISHED"
    assert _losses(uri, "dm") == uninterrupted


def test_sigterm_finishes_the_step_saves_it_and_resumes_there(
    tmp_path, train_shards, uninterrupted
):
    config = _config(tmp_path, train_shards)
    store = str(tmp_path / "store")
    # Rank 1 gets SIGTERM as step 3 starts (its pod is being stopped): both ranks finish step 3
    # and save step-3, which is no checkpoint_every step, then exit.
    fault = {"MARDINI_FAULT": "step:2:1", "MARDINI_FAULT_SIGNAL": "TERM"}
    stopped = _torchrun(config, "dm", store, env=fault)
    assert stopped.returncode != 0
    ckpts = Path(stage_dir(store, "trainer-test", "dm")) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-3"
    uri = f"sqlite:///{Path(store).resolve()}/mlflow.db"
    assert _run(uri, "dm")[1].info.status == "KILLED"  # the run says how the stage ended
    assert _steps_since(uri, "dm", 0) == [1, 2, 3]  # step 3 finished, step 4 never began
    since = time.time()
    _ok(_torchrun(config, "dm", store))
    assert _steps_since(uri, "dm", since) == [4, 5, 6]  # resumed after step-3
    assert _run(uri, "dm")[1].info.status == "FINISHED"  # the same run, resumed
    assert _losses(uri, "dm") == uninterrupted


def test_checkpoints_also_follow_wall_time(tmp_path, train_shards):
    """``checkpoint_every_minutes``: with a step interval longer than the stage and a tiny time
    interval, every rank saves after every step (rank 0's clock decides for all of them)."""
    config = _config(tmp_path, train_shards)
    raw = yaml.safe_load(config.read_text())
    for stage in raw["stages"]:
        stage.update(checkpoint_every=1000, checkpoint_every_minutes=1e-6, keep_checkpoints=10)
    config.write_text(yaml.safe_dump(raw))
    store = str(tmp_path / "store")
    _ok(_torchrun(config, "dm", store))
    ckpts = Path(stage_dir(store, "trainer-test", "dm")) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == [f"step-{n}" for n in range(1, 7)]
    assert (ckpts / "latest").read_text() == "step-6"


def test_torn_checkpoint_keeps_latest_on_the_previous_one(tmp_path, train_shards, uninterrupted):
    config = _config(tmp_path, train_shards)
    store = str(tmp_path / "store")
    # Rank 1 uploads its step-4 files and dies before the commit: step-4 is torn.
    torn = _torchrun(config, "dm", store, env={"MARDINI_FAULT": "after-upload:step-4:1"})
    assert torn.returncode != 0
    ckpts = Path(stage_dir(store, "trainer-test", "dm")) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-2"
    assert any((ckpts / "step-4").iterdir())  # some rank files did land
    since = time.time()
    _ok(_torchrun(config, "dm", store))
    uri = f"sqlite:///{Path(store).resolve()}/mlflow.db"
    assert _steps_since(uri, "dm", since) == [3, 4, 5, 6]  # resumed after step-2, not step-4
    assert _losses(uri, "dm") == uninterrupted


def test_training_from_cached_latents_takes_the_same_steps(tmp_path, train_shards, uninterrupted):
    """`data.latents: true` reads the latent cache instead of mp4: with the pixel autoencoder
    the latents are the frames, so every loss equals the mp4 run's, bit for bit."""
    from mardini.data.latent_cache import cache_latents
    from mardini.export import stage_autoencoder

    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    config = _config(tmp_path, str(shards), latents=True)
    store = str(tmp_path / "store")
    missing = _torchrun(config, "dm", store)
    assert missing.returncode != 0 and "mardini prep latents" in missing.stderr
    cfg = load_config(config)
    ae = stage_autoencoder(cfg, cfg.stage("dm"), store)
    cache_latents(str(shards), ae, planner_downscale=cfg.model.planner_downscale, resolution=32)
    result = _torchrun(config, "dm", store)
    _ok(result)
    # Log text: both sources give the same losses by design, only the log names the one read.
    assert "/latents/32px-" in result.stderr + result.stdout
    assert _losses(f"sqlite:///{Path(store).resolve()}/mlflow.db", "dm") == uninterrupted


def test_loader_workers_hand_over_uint8_and_the_steps_stay_the_same(
    tmp_path, train_shards, uninterrupted
):
    """With DataLoader workers (uint8 frames across the process boundary, floats made by the
    trainer) every loss equals the in-process loader's, bit for bit; each rank checked the
    node's shared-memory budget before it built anything: 2 ranks x (2 workers x prefetch 1
    + 1) x micro_batch 1 x 4 frames of 3 x 32 x 32 bytes."""
    config = _config(tmp_path, train_shards, workers=2, prefetch=1)
    store = str(tmp_path / "store")
    result = _torchrun(config, "dm", store)
    _ok(result)
    # Log text: the trainer's shm check is seen only in its log (arithmetic: test_loader.py).
    budget = "2 rank(s) x (2 workers x prefetch 1 + 1) x micro_batch 1 x 0.0117 MiB a sample"
    assert budget in result.stderr + result.stdout, result.stderr[-3000:]  # rank 0 logs
    assert _losses(f"sqlite:///{Path(store).resolve()}/mlflow.db", "dm") == uninterrupted


def test_checkpoints_and_final_on_s3(tmp_path, train_shards, s3_bucket):
    config = _config(tmp_path, train_shards)
    store = f"{s3_bucket}/mardini"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # Through the user-facing command this time: `mardini train` wraps torchrun.
    cmd = [
        sys.executable,
        "-m",
        "mardini.cli",
        "train",
        "--config",
        str(config),
        "--stage",
        "dm",
        "--nproc",
        "2",
        "--store",
        store,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MLFLOW_TRACKING_URI": uri}
    env.pop("MARDINI_FAULT", None)
    _ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env))
    fs, root = filesystem(stage_dir(store, "trainer-test", "dm"))
    assert fs.cat_file(f"{root}/checkpoints/latest").decode() == f"step-{STEPS}"
    kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/checkpoints") if "step-" in p)
    assert kept == ["step-4", "step-6"]  # keep_checkpoints = 2
    state, meta = read_final(f"{store}/runs/trainer-test/dm/final")
    assert meta["trained_parts"] == ["generator"] and "generator.final.weight" in state
    assert len(_losses(uri, "dm")) == STEPS


class _FlakyS3:
    """An HTTP proxy in front of moto that answers every ``every``-th write with S3's 503
    SlowDown instead of passing it on: a flaky object store at the wire."""

    def __init__(self, upstream: str, every: int = 3):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        target = urlparse(upstream)
        self.failed, self.writes, lock = 0, 0, threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command in ("PUT", "POST"):
                    with lock:
                        proxy.writes += 1
                        fail = proxy.writes % every == 0
                        proxy.failed += fail
                    if fail:
                        error = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"  # fmt: skip
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(error)))
                        self.end_headers()
                        self.wfile.write(error)
                        return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_a_flaky_object_store_costs_nothing(tmp_path, train_shards, s3_bucket, uninterrupted):
    """Every third write to S3 fails with 503 SlowDown (a proxy in front of moto): checkpoints
    and the export still land whole, and the losses are the uninterrupted run's."""
    config = _config(tmp_path, train_shards)
    store = f"{s3_bucket}/mardini"
    flaky = _FlakyS3(os.environ["AWS_ENDPOINT_URL"])
    try:
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        env = {"AWS_ENDPOINT_URL": flaky.url, "MLFLOW_TRACKING_URI": uri}
        result = _torchrun(config, "dm", store, env=env)
    finally:
        flaky.close()
    _ok(result)
    assert flaky.failed >= 5, (flaky.failed, flaky.writes)
    fs, root = filesystem(stage_dir(store, "trainer-test", "dm"))
    assert fs.cat_file(f"{root}/checkpoints/latest").decode() == f"step-{STEPS}"
    for rank in (0, 1):  # the newest checkpoint is whole: every rank's partitions are there
        names = [p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/checkpoints/step-{STEPS}")]
        assert f"rank_{rank}_state.json" in names
        assert any(n.startswith(f"zero_pp_rank_{rank}_") and "optim" in n for n in names)
    state, _ = read_final(f"{store}/runs/trainer-test/dm/final")
    assert "generator.final.weight" in state
    assert _losses(uri, "dm") == uninterrupted


def test_outside_torchrun_the_error_says_how_to_launch():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mardini.train",
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--stage",
            "mar",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RANK"},
    )
    assert result.returncode != 0 and "torchrun --nproc-per-node" in result.stderr


def test_a_bf16_stage_exports_the_optimizers_fp32_master_weights(tmp_path, train_shards):
    """Under bf16 the module holds rounded weights; the export must be the optimizer's fp32
    copy. DeepSpeed's own consolidation of the last checkpoint (zero_to_fp32, read from the
    optimizer partitions on disk) is the reference."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    config = _config(tmp_path, train_shards)
    raw = yaml.safe_load(config.read_text())
    for stage in raw["stages"]:
        stage["precision"] = "bf16"
    config.write_text(yaml.safe_dump(raw))
    store = str(tmp_path / "store")
    _ok(_torchrun(config, "dm", store))
    run = Path(stage_dir(store, "trainer-test", "dm"))
    exported = load_file(str(run / "final" / "model.safetensors"))
    master = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step-{STEPS}")
    trained = [k for k in master if k.startswith("generator.")]
    assert trained and set(master) == set(exported)
    rounded = 0
    for key in trained:
        assert exported[key].dtype == torch.float32
        torch.testing.assert_close(exported[key], master[key].float(), rtol=0, atol=0)
        rounded += int(not torch.equal(exported[key].bfloat16().float(), exported[key]))
    # Trained weights are not bf16 numbers: the export did not come from the module's copy.
    assert rounded > len(trained) // 2, f"only {rounded} of {len(trained)} differ from bf16"
