"""Fixtures only (what they share lives in tests/helpers.py): a tiny copy of the project that has run the whole DVC
pipeline once, and the model server on its champion."""
import os

import pytest

from tests.helpers import (BIN, BODY_TIMEOUT, MAX_BODY, answers_ok, background_server, copy_project, free_port, run,
                           set_params)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    "A copy of the project with tiny params, after one full `dvc repro`."
    dest = set_params(copy_project(tmp_path_factory.mktemp("project")))
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], dest)
    proc = run(["dvc", "repro"], dest)
    dest.joinpath("repro.log").write_text(proc.stdout + proc.stderr)
    return dest


@pytest.fixture(scope="session")
def model_server(tiny_project):
    "`deepguard serve` on the tiny pipeline's registered champion, on free loopback ports; stopped at the end."
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("DEEPGUARD_ROOT", None)
    base = f"http://127.0.0.1:{port}"
    ready = lambda: answers_ok(base + "/v2/health/ready")
    cmd = ["deepguard", "serve", "--model", "models:/deepguard-detector-test@champion", "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port),
           "--max-body-bytes", str(MAX_BODY), "--body-timeout", str(BODY_TIMEOUT)]
    with background_server(cmd, tiny_project, env, tiny_project / "serve.log", ready, 180) as proc:
        yield dict(base=base, metrics=f"http://127.0.0.1:{metrics_port}/metrics", port=port,
                   metrics_port=metrics_port, proc=proc)
