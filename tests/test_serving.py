"""Serving the pyfunc model: the request forms the README documents, through ``predict`` and
through MLflow's own scoring server app (in process), a clear 400 for a wrong field, and the
schema and input example the registry page shows."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mardini.export import export_final
from mardini.mlflow_model import RequestError, parse_request, save_reference
from mardini.models import build_model

SIZE = 32


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    """A debug-preset joint export saved as our pyfunc model and loaded back (no tracking)."""
    import mlflow.pyfunc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("debug")
    meta = {
        "curriculum": "serve-test",
        "stage": "joint-i2v",
        "kind": "joint",
        "steps": 0,
        "trained_parts": ["planner", "generator"],
        "model": model.cfg.model_dump(mode="json"),
        "stage_config": {"resolution": SIZE},
    }
    tmp = tmp_path_factory.mktemp("serve")
    final = export_final(model.state_dict(), meta, str(tmp / "stage"))
    save_reference(final, tmp / "pyfunc")
    model = mlflow.pyfunc.load_model(str(tmp / "pyfunc"))
    model.saved_at = tmp / "pyfunc"  # where the test can read what MLflow saved
    yield model
    torch.set_num_threads(threads)


def _png(seed: int) -> str:
    """A base64 PNG of a random 32-px image, as `base64 -w0 frame.png` prints it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


INTERPOLATE = {"task": "interpolate", "first": _png(0), "last": _png(1), "frames": 5, "steps": 2}
I2V = {"task": "i2v", "image": _png(2), "frames": 4, "steps": 2}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"image": "x", "frames": 4}, "missing field 'task'"),
        ({"task": "video", "image": "x"}, "field 'task' must be one of"),
        ({**I2V, "frame": 4}, "unknown field 'frame' for task 'i2v'"),
        ({"task": "i2v", "image": "x"}, "task 'i2v' needs field 'frames'"),
        ({**I2V, "frames": "four"}, "field 'frames': expected an integer, got 'four'"),
        ({**I2V, "steps": 0}, "field 'steps': must be at least 1"),
        ({**INTERPOLATE, "frames": 2}, "field 'frames': interpolation needs at least 3"),
        ({**I2V, "cfg_scale": "high"}, "field 'cfg_scale': expected a number"),
        ({**I2V, "format": "webm"}, "field 'format' must be 'array' or 'mp4'"),
        ("i2v", "expected an object with a 'task' field"),
    ],
)
def test_a_wrong_request_names_its_field(raw, message):
    with pytest.raises(RequestError, match=message) as err:
        parse_request(raw)
    assert err.value.get_http_status_code() == 400


def test_the_model_shows_its_request_schema_and_a_working_example(pyfunc):
    from mlflow.pyfunc import scoring_server
    from mlflow.types import DataType

    (request,) = pyfunc.metadata.get_input_schema().inputs  # one object per request
    fields = {p.name: (p.dtype, p.required) for p in request.type.properties}
    assert set(fields) == {
        "task", "first", "last", "image", "video", "frames", "add", "window", "total", "size",
        "steps", "seed", "cfg_scale", "format",
    }  # fmt: skip
    assert fields["task"] == (DataType.string, True) and fields["frames"] == (DataType.long, False)
    # By reference: the saved model holds no weights, only where they are.
    assert not list(pyfunc.saved_at.rglob("*.safetensors"))
    assert pyfunc.model_config["final_url"].endswith("/stage/final")
    # The serving example the registry page shows is a request the served model answers.
    body = (pyfunc.saved_at / "serving_input_example.json").read_text()
    response = TestClient(scoring_server.init(pyfunc)).post(
        "/invocations", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    (clip,) = response.json()["predictions"]
    assert isinstance(clip, str) and base64.b64decode(clip)[4:8] == b"ftyp"  # an mp4


def test_saving_a_version_does_not_load_its_weights(tmp_path, monkeypatch):
    """MLflow runs load_context and predict on the input example when it saves a type-hinted
    model; for us that would read a paper-scale export (14.4 GB) in the flow's pod."""
    import mardini.export

    torch.manual_seed(0)
    model = build_model("debug")
    meta = {"curriculum": "serve-test", "stage": "dm", "kind": "dm", "steps": 0,
            "model": model.cfg.model_dump(mode="json")}  # fmt: skip
    final = export_final(model.state_dict(), meta, str(tmp_path / "stage"))
    loads = []
    real = mardini.export.load_model
    monkeypatch.setattr(
        mardini.export, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    save_reference(final, tmp_path / "pyfunc")
    assert loads == []
    assert "outputs:" in (tmp_path / "pyfunc" / "MLmodel").read_text()  # the type hints' schema


def test_predict_takes_the_documented_request_forms(pyfunc):
    (interpolated,) = pyfunc.predict([INTERPOLATE])
    assert interpolated.shape == (5, SIZE, SIZE, 3) and interpolated.dtype == np.uint8
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(INTERPOLATE["first"]))))
    assert np.abs(interpolated[0].astype(int) - first).max() <= 1  # the given frame is kept
    clips = pyfunc.predict([I2V, {**I2V, "format": "mp4"}])
    assert clips[0].shape == (4, SIZE, SIZE, 3) and isinstance(clips[1], str)
    with pytest.raises(RequestError, match="field 'image': input 'not-base64"):
        pyfunc.predict([{**I2V, "image": "not-base64!"}])


def test_mlflow_scoring_server_answers_inputs_and_a_clear_400(pyfunc):
    from mlflow.pyfunc import scoring_server

    client = TestClient(scoring_server.init(pyfunc))
    for request, frames in ((INTERPOLATE, 5), (I2V, 4)):
        response = client.post("/invocations", json={"inputs": [request]})
        assert response.status_code == 200, response.text
        (clip,) = response.json()["predictions"]
        assert np.asarray(clip).shape == (frames, SIZE, SIZE, 3)
    response = client.post("/invocations", json={"inputs": [I2V, {**I2V, "frames": 3}]})
    assert response.status_code == 200, response.text
    assert [np.asarray(c).shape[0] for c in response.json()["predictions"]] == [4, 3]

    def refused(*requests, raw=None) -> str:
        response = client.post("/invocations", json=raw or {"inputs": list(requests)})
        assert response.status_code == 400, response.text
        return response.json()["message"]

    assert "unknown field 'fps' for task 'i2v'" in refused({**I2V, "fps": 8})
    assert "needs field 'frames'" in refused({k: v for k, v in I2V.items() if k != "frames"})
    # A wrong type is MLflow's check against the schema; its message names the field.
    assert "frames" in refused({**I2V, "frames": "four"})
    # One request not in a list: the schema is a list of requests, and the 400 says so.
    assert "Expected list" in refused(raw={"inputs": I2V})
