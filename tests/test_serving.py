"""The model server (`deepguard serve`: MLServer + DeepGuard's runtime) on the tiny pipeline's registered model.

Started once on free loopback ports, stopped at the end of the module. Checks: answers equal `classify`'s in every
MLflow request format and over the V2 protocol, the Prometheus counters move, bad input gets 400/408/413 naming the
reason, a stalled client does not block others, and 1,000 bad requests in a row leave the server answering."""
import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ALL_BAD_FILES, MAX_BODY, ODD_BUT_VALID, answers_ok, post
from deepguard.predict import classify


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def metrics(url: str) -> dict:
    "Prometheus text → {'name{labels}': value} for DeepGuard's series."
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(deepguard_\S+) (\S+)$", text, re.M)}


def total(series: dict, name: str, **labels) -> float:
    "Sum of a metric's series whose labels include `labels`."
    found = 0.0
    for key, value in series.items():
        if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            found += value
    return found


@pytest.fixture(scope="module")
def server(model_server):
    return model_server


@pytest.fixture(scope="module")
def test_files(tiny_project):
    return sorted((tiny_project / "data" / "raw" / "images").rglob("*.jpg"))[:6]


def test_invocations_match_classify(server, tiny_project, test_files):
    status, body = post(
        server["base"] + "/invocations",
        {"dataframe_split": {"columns": ["image"], "data": [[b64(p.read_bytes())] for p in test_files]}},
    )
    assert status == 200, body
    local = classify(test_files, model=tiny_project / "models" / "detector.keras")  # the champion's files
    assert [row["label"] for row in body["predictions"]] == [r.label for r in local]
    assert [row["probability_fake"] for row in body["predictions"]] == pytest.approx(
        [r.probability_fake for r in local], abs=1e-6
    )
    assert [row["face_found"] for row in body["predictions"]] == [r.face_found for r in local]
    # the calibrated scale: the served label is FAKE exactly when P(fake) >= 0.5
    assert all((row["label"] == "FAKE") == (row["probability_fake"] >= 0.5) for row in body["predictions"])


def test_every_mlflow_request_format_and_v2_agree(server, test_files):
    texts = [b64(p.read_bytes()) for p in test_files[:3]]
    answers = [
        post(server["base"] + "/invocations", body)[1]["predictions"]
        for body in (
            {"dataframe_split": {"columns": ["image"], "data": [[t] for t in texts]}},
            {"dataframe_records": [{"image": t} for t in texts]},
            {"instances": [{"image": t} for t in texts]},
            {"inputs": {"image": texts}},
        )
    ]
    assert all(a == answers[0] for a in answers)
    status, v2 = post(
        server["base"] + "/v2/models/deepguard/infer",
        {
            "inputs": [
                {
                    "name": "image", "datatype": "BYTES", "shape": [3], "data": texts,
                    "parameters": {"content_type": "base64"},
                }
            ]
        },
    )
    assert status == 200, v2
    outputs = {o["name"]: o["data"] for o in v2["outputs"]}
    assert outputs["probability_fake"] == pytest.approx([a["probability_fake"] for a in answers[0]], abs=1e-9)
    assert outputs["label"] == [a["label"] for a in answers[0]] and outputs["error"] == ["", "", ""]


def test_metrics_move(server, test_files):
    before = metrics(server["metrics"])
    assert total(before, "deepguard_model_info", model_name="deepguard-detector-test") == 1
    assert (
        post(server["base"] + "/invocations", {"inputs": {"image": [b64(p.read_bytes()) for p in test_files[:2]]}})[0]
        == 200
    )
    assert post(server["base"] + "/invocations", {"inputs": {"image": [b64(b"not an image")]}})[0] == 400
    after = metrics(server["metrics"])
    grew = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)
    assert grew("deepguard_requests_total", outcome="ok") == 1
    assert grew("deepguard_requests_total", outcome="bad_request") == 1
    assert grew("deepguard_errors_total", reason="not_image") == 1
    assert grew("deepguard_request_latency_seconds_count") == 1
    assert grew("deepguard_predictions_total") == 2
    assert grew("deepguard_probability_fake_count") == 2 and grew("deepguard_batch_size_sum") == 2
    runtime = [k for k in after if k.split("{")[0] in ("deepguard_predictions_total", "deepguard_model_info")]
    assert runtime and all('model_version="' in key for key in runtime)  # the runtime's: per model version
    front = [k for k in after if k.split("{")[0] == "deepguard_requests_total"]
    assert front and all('route="' in key for key in front)  # the front door's: per route
    assert grew("deepguard_requests_total", route="v2_infer") == 0


def test_v2_is_counted_too(server, test_files):
    before = metrics(server["metrics"])
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(test_files[0].read_bytes())]}]}
    assert post(server["base"] + "/v2/models/deepguard/infer", body)[0] == 200
    assert post(server["base"] + "/v2/models/deepguard/infer", b"[" * 100 + b"]" * 100)[0] == 400
    after = metrics(server["metrics"])
    grew = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)
    assert grew("deepguard_requests_total", route="v2_infer", outcome="ok") == 1
    assert grew("deepguard_errors_total", route="v2_infer", reason="too_deep") == 1


def test_admin_routes_are_off_without_a_token(server, test_files):
    "The server has no DEEPGUARD_ADMIN_TOKEN: unload, load and index are 403, and the model keeps answering."
    for route in ("models/deepguard/unload", "models/deepguard/load", "index"):
        status, body = post(server["base"] + "/v2/repository/" + route, {})
        assert status == 403 and body["reason"] == "admin_disabled", body
    assert answers_ok(server["base"] + "/v2/health/ready") and answers_ok(server["base"] + "/v2/models/deepguard/ready")
    assert post(server["base"] + "/invocations", {"inputs": {"image": [b64(test_files[0].read_bytes())]}})[0] == 200


@pytest.mark.parametrize("path", ["/invocations", "/v2/models/deepguard/infer"])
def test_limits_on_both_routes(server, path):
    "Deep JSON is a 400 (not a 500), more than max_images rows a 413, on MLflow's route and V2's alike."
    status, body = post(server["base"] + path, b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}")
    assert status == 400 and body["reason"] == "too_deep", body
    tiny = b64(b"x")
    many = (
        {"inputs": {"image": [tiny] * 65}}
        if path == "/invocations"
        else {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [65], "data": [tiny] * 65}]}
    )
    status, body = post(server["base"] + path, many)
    assert status == 413 and body["reason"] == "too_many_images", body


@pytest.mark.parametrize("name", sorted(ALL_BAD_FILES))
def test_bad_image_is_a_400_naming_row_and_reason(server, name, test_files):
    content, reason = ALL_BAD_FILES[name]
    status, body = post(
        server["base"] + "/invocations",
        {"dataframe_records": [{"image": b64(test_files[0].read_bytes())}, {"image": b64(content)}]},
    )
    assert status == 400 and body["message"].startswith("row 1:") and body["reason"] == reason, body


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_but_valid_images_are_answered(server, name):
    status, body = post(server["base"] + "/invocations", {"inputs": {"image": [b64(ODD_BUT_VALID[name][0])]}})
    assert status == 200 and 0 <= body["predictions"][0]["probability_fake"] <= 1, body


@pytest.mark.parametrize(
    "body, content_type, reason",
    [
        ({"dataframe_records": [{"image": "%%% not base64 %%%"}]}, "application/json", "not_base64"),
        (b"{not json", "application/json", "bad_json"),
        ({"columns": ["image"]}, "application/json", "bad_json"),
        ({"inputs": {"image": []}}, "application/json", "empty_request"),
        (b"image\nabc\n", "text/csv", "content_type"),
    ],
)
def test_bad_requests_are_400s_that_say_why(server, body, content_type, reason):
    status, answer = post(server["base"] + "/invocations", body, content_type)
    assert status == 400 and answer["reason"] == reason, answer


@pytest.mark.parametrize("path", ["/invocations", "/v2/models/deepguard/infer", "/v2/models/deepguard/feedback"])
def test_oversized_body_is_413(server, path):
    # refused on its Content-Length, before the body is read: the client sends only the headers and a first piece
    # (a client still writing 1 MB when the server answers and closes can get a broken pipe instead of the 413)
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=60) as raw:
        raw.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {MAX_BODY + 10}\r\n\r\n".encode()
            + b'{"inputs": {"image": ["'
            + b"A" * 1000
        )
        reply = b""
        while b"}" not in reply.partition(b"\r\n\r\n")[2]:
            chunk = raw.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["reason"] == "body_too_large", reply[:500]
    # a chunked upload declares no length: refused while it streams in
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    chunks = (b'{"inputs": {"image": ["' + b"A" * 100_000 for _ in range(MAX_BODY // 100_000 + 2))
    conn.request("POST", path, body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["reason"] == "body_too_large"
    conn.close()


def test_a_stalled_client_does_not_block_others_and_gets_408(server, test_files):
    stalled = socket.create_connection(("127.0.0.1", server["port"]), timeout=60)
    stalled.sendall(
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 5000\r\n\r\n{"inputs": '
    )
    try:
        status, body = post(server["base"] + "/invocations", {"inputs": {"image": [b64(test_files[0].read_bytes())]}})
        assert status == 200, body  # answered while the other client holds its request open
        reply = b""
        while b"}" not in reply:  # the 408's JSON body, after --body-timeout seconds
            chunk = stalled.recv(4096)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply, reply
    finally:
        stalled.close()


def test_survives_a_thousand_bad_requests_in_a_row(server, test_files):
    before = metrics(server["metrics"])
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    bodies = [json.dumps({"inputs": {"image": [b64(b"garbage")]}}).encode(), b"{broken", b'{"inputs": {"image": []}}']
    statuses = []
    for i in range(1000):
        conn.request("POST", "/invocations", body=bodies[i % 3], headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    conn.close()
    assert statuses == [400] * 1000
    assert server["proc"].poll() is None
    status, body = post(server["base"] + "/invocations", {"inputs": {"image": [b64(test_files[0].read_bytes())]}})
    assert status == 200, body
    after = metrics(server["metrics"])
    assert (
        total(after, "deepguard_requests_total", outcome="bad_request")
        - total(before, "deepguard_requests_total", outcome="bad_request")
        == 1000
    )


FETCH = """
import json, sys, tempfile
from deepguard.core import DeepGuardError
from deepguard.predict import fetch_registered
folder, name, version = fetch_registered(sys.argv[1], tempfile.mkdtemp()).result()
try:
    fetch_registered(sys.argv[1].replace("@champion", "@no-such-alias")).result()
    missing = ""
except DeepGuardError as error:
    missing = str(error)
print(json.dumps(dict(folder=folder, name=name, version=version, missing=missing,
                      parent_imported_mlflow="mlflow" in sys.modules)))
"""


def test_a_registry_model_is_fetched_by_a_short_lived_process(tiny_project):
    "What `serve` does with a models:/ URI: the files of the alias's version, and MLflow never in the caller."
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-c", FETCH, "models:/deepguard-detector-test@champion"],
                          capture_output=True, text=True, cwd=tiny_project, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    registry = json.loads((tiny_project / "reports" / "registry.json").read_text())
    assert (out["name"], out["version"]) == ("deepguard-detector-test", str(registry["version"]))
    assert (Path(out["folder"]) / "MLmodel").is_file()
    assert out["parent_imported_mlflow"] is False
    assert "no-such-alias" in out["missing"] and "make pipeline" in out["missing"]
