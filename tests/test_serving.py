"""Serving the pyfunc model: the request forms the README documents, through ``predict`` and
through MLflow's own scoring server app (in process), and a clear 400 for a wrong field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mardini.mlflow_model import MarDiniModel, RequestError, _requests, parse_request
from mardini.models import build_model
from mardini.train.checkpoint import export_final

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
    mlflow.pyfunc.save_model(
        str(tmp / "pyfunc"), python_model=MarDiniModel(), artifacts={"final": final}
    )
    yield mlflow.pyfunc.load_model(str(tmp / "pyfunc"))
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


def test_scoring_server_shapes_become_plain_requests():
    # {"inputs": {...}} arrives as 0-d arrays; {"instances": [...]} as columns.
    single = {"task": np.array("i2v"), "image": np.array("aGk="), "frames": np.array(4)}
    assert parse_request(next(_requests(single))) == {
        "task": "i2v", "image": "aGk=", "frames": 4, "format": "array"
    }  # fmt: skip
    columns = {
        "task": np.array(["i2v", "i2v"]),
        "image": np.array(["a", "b"]),
        "frames": np.array([3, 4]),
    }
    rows = [parse_request(r) for r in _requests(columns)]
    assert [(r["image"], r["frames"]) for r in rows] == [("a", 3), ("b", 4)]


def test_predict_takes_the_documented_request_forms(pyfunc):
    (interpolated,) = pyfunc.predict(INTERPOLATE)
    assert interpolated.shape == (5, SIZE, SIZE, 3) and interpolated.dtype == np.uint8
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(INTERPOLATE["first"]))))
    assert np.abs(interpolated[0].astype(int) - first).max() <= 1  # the given frame is kept
    clips = pyfunc.predict([I2V, {**I2V, "format": "mp4"}])
    assert clips[0].shape == (4, SIZE, SIZE, 3) and isinstance(clips[1], str)
    with pytest.raises(RequestError, match="field 'image': input 'not-base64"):
        pyfunc.predict({**I2V, "image": "not-base64!"})


def test_mlflow_scoring_server_answers_inputs_and_a_clear_400(pyfunc):
    from mlflow.pyfunc import scoring_server

    client = TestClient(scoring_server.init(pyfunc))
    for request, frames in ((INTERPOLATE, 5), (I2V, 4)):
        response = client.post("/invocations", json={"inputs": request})
        assert response.status_code == 200, response.text
        (clip,) = response.json()["predictions"]
        assert np.asarray(clip).shape == (frames, SIZE, SIZE, 3)
    response = client.post("/invocations", json={"inputs": [I2V, {**I2V, "frames": 3}]})
    assert response.status_code == 200, response.text
    assert [np.asarray(c).shape[0] for c in response.json()["predictions"]] == [4, 3]
    response = client.post("/invocations", json={"inputs": {**I2V, "frames": 4, "fps": 8}})
    assert response.status_code == 400
    body = response.json()
    assert "unknown field 'fps' for task 'i2v'" in body["message"]
    response = client.post(
        "/invocations", json={"inputs": {k: v for k, v in I2V.items() if k != "frames"}}
    )
    assert response.status_code == 400 and "needs field 'frames'" in response.json()["message"]
