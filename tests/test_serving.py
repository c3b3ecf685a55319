"""The registered model behind MLflow's own server: `mlflow models serve -m models:/...@champion --env-manager local`."""
import base64
import json
import os
import urllib.error
import urllib.request

import pytest

from conftest import BIN, background_server, free_port
from deepguard.predict import classify

STARTUP_SECONDS = 180


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(tiny_project):
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("DEEPGUARD_ROOT", None)
    base = f"http://127.0.0.1:{port}"
    def pinging():
        try:
            with urllib.request.urlopen(base + "/ping", timeout=2):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
    cmd = ["mlflow", "models", "serve", "-m", "models:/deepguard-detector-test@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    with background_server(cmd, tiny_project, env, tiny_project / "serve.log", pinging, STARTUP_SECONDS):
        yield base


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_invocations_match_classify(server, tiny_project):
    files = sorted((tiny_project / "data" / "processed" / "images" / "test").rglob("*.jpg"))[:4]
    status, body = post(server + "/invocations",
                        {"dataframe_split": {"columns": ["image"], "data": [[b64(p.read_bytes())] for p in files]}})
    assert status == 200, body
    local = classify(files, model=tiny_project / "models" / "detector.keras")
    assert [row["label"] for row in body["predictions"]] == [r.label for r in local]
    assert [row["probability_fake"] for row in body["predictions"]] == pytest.approx([r.probability_fake for r in local], abs=1e-5)
    assert [row["face_found"] for row in body["predictions"]] == [r.face_found for r in local]
    # the calibrated scale: the served label is FAKE exactly when P(fake) >= 0.5, so its confidence is >= 0.5
    assert all((row["label"] == "FAKE") == (row["probability_fake"] >= 0.5) for row in body["predictions"])


def test_bad_image_is_a_400_that_says_why(server):
    status, body = post(server + "/invocations", {"dataframe_records": [{"image": b64(b"plain text, not an image")}]})
    assert status == 400 and "row 0" in body["message"] and "not_image" in body["message"]
    status, body = post(server + "/invocations", {"dataframe_records": [{"image": "%%% not base64 %%%"}]})
    assert status == 400 and "base64" in body["message"]
