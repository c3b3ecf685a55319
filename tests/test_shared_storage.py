"""Shared storage for a team, on loopback: an S3-compatible server (moto), the pipeline's outputs pushed to and
pulled from an `s3://` DVC remote, and an MLflow tracking server whose artifacts live in the same bucket, used by
two clients at once and by the register stage."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import BIN, answers_ok, background_server, free_port, run

BUCKET = "deepguard-team"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    "moto's S3 server on a free loopback port, with one bucket; its endpoint URL."
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, **CREDENTIALS}
    with background_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log.parent, env, log,
                           lambda: answers_ok(endpoint + "/moto-api/"), 60):
        import boto3
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield dict(endpoint=endpoint, client=client)


@pytest.fixture(scope="module")
def pulled_clone(tiny_project, s3, tmp_path_factory):
    "The tiny pipeline's outputs pushed to the s3:// remote, then pulled into a fresh clone (no cache, no outputs)."
    env = dict(CREDENTIALS)
    run(["dvc", "remote", "add", "--local", "-f", "team", f"s3://{BUCKET}/dvc"], tiny_project, env=env)
    run(["dvc", "remote", "modify", "--local", "team", "endpointurl", s3["endpoint"]], tiny_project, env=env)
    pushed = run(["dvc", "push", "-r", "team"], tiny_project, env=env)
    clone = tmp_path_factory.mktemp("teammate") / "project"
    run(["git", "clone", "-q", str(tiny_project), str(clone)], tiny_project)
    # what a teammate has from git (params, dvc.lock and the small uncached outputs are committed) and configured
    for rel in ("params.yaml", "dvc.lock", ".dvc/config.local", "reports/metrics.json", "reports/model_card.md",
                "reports/evaluation_card.md",
                "reports/shortcut_audit.json", "reports/data_card.md", "reports/registry.json"):
        shutil.copy2(tiny_project / rel, clone / rel)
    pulled = run(["dvc", "pull", "-r", "team"], clone, env=env)
    return dict(clone=clone, push=pushed.stdout + pushed.stderr, pull=pulled.stdout + pulled.stderr)


def test_dvc_push_and_pull_through_an_s3_remote(tiny_project, s3, pulled_clone):
    "Every tracked output arrives in the bucket and comes back byte for byte in a clone with an empty cache."
    clone = pulled_clone["clone"]
    objects = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="dvc/").get("KeyCount", 0)
    assert objects > 20, pulled_clone["push"]
    for rel in ("models/detector.keras", "models/detector.json", "data/processed/manifest.csv",
                "data/features/train.npz", "models/spectral_baseline.joblib", "reports/nbs/05_train.ipynb"):
        assert sha256(clone / rel) == sha256(tiny_project / rel), rel
    images = sorted(p.relative_to(tiny_project) for p in (tiny_project / "data" / "processed").rglob("*.jpg"))
    assert images and all(sha256(clone / p) == sha256(tiny_project / p) for p in images)
    status = run(["dvc", "status"], clone, env=CREDENTIALS).stdout
    assert "up to date" in status, status


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    "`mlflow server`: sqlite backend, artifacts proxied to s3://BUCKET/mlflow; its URL."
    port = free_port()
    work = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"],
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", f"s3://{BUCKET}/mlflow"]
    with background_server(cmd, work, env, work / "server.log", lambda: answers_ok(url + "/health"), 120):
        yield url


CLIENT = textwrap.dedent("""
    import sys, mlflow
    mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_experiment("team")
    with mlflow.start_run(run_name=sys.argv[2]) as run:
        for step in range(20):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_param("who", sys.argv[2])
        mlflow.log_text("notes of " + sys.argv[2], "notes.txt")
    print(run.info.run_id)
""")


def test_two_clients_log_to_one_mlflow_server_at_once(mlflow_server, s3, tmp_path):
    "Two processes log runs concurrently; both runs are complete on the server and their artifacts are in S3."
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true")     # clients hold no S3 credentials: artifacts go through the server
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, mlflow_server, who], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for who in ("alice", "bob")]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    run_ids = [out.split()[-1] for out, _ in outputs]
    from mlflow import MlflowClient
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    for run_id, who in zip(run_ids, ("alice", "bob")):
        logged = client.get_run(run_id)
        assert logged.info.status == "FINISHED" and logged.data.params["who"] == who
        assert len(client.get_metric_history(run_id, "loss")) == 20
        assert client.download_artifacts(run_id, "notes.txt", str(tmp_path)) and \
            (tmp_path / "notes.txt").read_text() == f"notes of {who}"
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
    assert all(any(run_id in k and k.endswith("notes.txt") for k in keys) for run_id in run_ids), keys


def test_register_stage_on_the_team_server(pulled_clone, mlflow_server):
    "In the teammate's pulled clone, the register stage logs and registers the model on the server (artifacts in S3)."
    clone = pulled_clone["clone"]
    env = {**CREDENTIALS, "MLFLOW_TRACKING_URI": mlflow_server}
    proc = run(["dvc", "repro", "--force", "--single-item", "register"], clone, env=env)
    record = json.loads((clone / "reports" / "registry.json").read_text())
    assert record["tracking_uri"] == mlflow_server, proc.stdout[-2000:]
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from deepguard.register import _example_png, encode_image_b64
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version_by_alias(record["model_name"], "champion")
    assert str(version.version) == record["version"]
    previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(mlflow_server); mlflow.set_registry_uri(mlflow_server)
    try:
        served = mlflow.pyfunc.load_model(f"models:/{record['model_name']}@champion")
    finally:
        mlflow.set_tracking_uri(previous[0]); mlflow.set_registry_uri(previous[1])
    answer = served.predict(pd.DataFrame({"image": [encode_image_b64(_example_png())]}))
    assert list(answer.columns) == ["probability_fake", "label", "face_found"] and 0 <= answer.probability_fake[0] <= 1
