"""Registry by reference: a model version points at its stage's export in the store (here S3 on
moto) instead of holding a copy; it keeps loading the weights it was registered with after the
stage is retrained, and says so clearly when they are gone."""

from __future__ import annotations

import mlflow.pyfunc
import pytest
import torch
from mlflow.tracking import MlflowClient

from mardini.export import export_final, load_model, read_final, read_final_meta, superseded_url
from mardini.mlflow_model import register_model
from mardini.models import build_model
from mardini.storage import filesystem, join


def _export(stage_url: str, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = build_model("debug")
    meta = {
        "curriculum": "ref-test",
        "stage": "joint-interpolation",
        "kind": "joint",
        "steps": seed,
        "model": model.cfg.model_dump(mode="json"),
        "stage_config": {"resolution": 32},
    }
    return export_final(model.state_dict(), meta, stage_url), model.state_dict()


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.slow
def test_a_version_refers_to_its_export_and_survives_a_retrain(s3_bucket, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root goes beside the database
    stage = join(s3_bucket, "runs", "ref-test", "joint-interpolation")
    final, first = _export(stage, seed=0)
    first_sha = read_final_meta(final)["weights_sha256"]
    assert register_model(final, "ref-test", tracking_uri=uri, aliases=("champion",)) == "1"

    # MLflow holds the reference, not the weights.
    assert list(tmp_path.rglob("MLmodel")) and not list(tmp_path.rglob("*.safetensors"))
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(client.get_model_version("ref-test", "1").run_id)
    assert run.data.tags["source"] == final

    # The stage is retrained: other weights land at the same URL; the old ones are kept.
    _, second = _export(stage, seed=1)
    kept = superseded_url(final, first_sha)
    assert read_final_meta(kept)["weights_sha256"] == first_sha
    model, meta = load_model("models:/ref-test@champion", tracking_uri=uri)
    assert _same(model, first) and meta["final_url"] == kept
    pyfunc = mlflow.pyfunc.load_model("models:/ref-test@champion")
    assert _same(pyfunc.unwrap_python_model().model, first)
    assert register_model(final, "ref-test", tracking_uri=uri) == "2"
    model, meta = load_model("models:/ref-test/2", tracking_uri=uri)
    assert _same(model, second) and meta["final_url"] == final

    # Gone: the version's weights were deleted from the store; the error says what happened.
    fs, path = filesystem(kept)
    fs.rm(path, recursive=True)
    with pytest.raises(FileNotFoundError, match="is gone: that URL now holds other weights"):
        load_model("models:/ref-test@champion", tracking_uri=uri)


def test_an_export_whose_weights_do_not_match_its_digest_is_refused(tmp_path):
    final, _ = _export(str(tmp_path / "stage"), seed=0)
    weights = tmp_path / "stage" / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the sha256 its metadata records"):
        read_final(final)
