"""Shared fixtures: a tiny copy of the project that has run the whole DVC pipeline once."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A few dozen images, one epoch: enough to exercise every stage for real, small enough for CI.
TINY_PARAMS = {
    "ingest": dict(n_stylegan=8, n_dcgan=8, n_vae=4, n_celeba=16, n_olivetti=10, val_frac=0.25, test_frac=0.25,
                   n_diffusion=24, diffusion_frames=1, diffusion_min_family=2, decoder_steps=20,
                   decoder_designs="tconv-s4-plain,nearest-s8-kl", decoder_external="bilinear-s4-plain"),
    "preprocess": dict(image_size=64),
    "train": dict(epochs=1, fine_tune_epochs=1, batch_size=16, input_size=64),
    "register": dict(model_name="deepguard-detector-test", min_auc=0.0),
}


def run(cmd, cwd, check=True, env=None):
    "Run a command with the venv first on PATH; return the completed process (output captured)."
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg",
                "TF_CPP_MIN_LOG_LEVEL": "2"}
    full_env.pop("DEEPGUARD_ROOT", None)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.pop("MLFLOW_REGISTRY_URI", None)    # mlflow.set_registry_uri() in this process exports it
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def answers_ok(url: str) -> bool:
    "True when a GET of `url` answers 200 within 2 s (a server's readiness probe)."
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    "POST `body` (bytes as they are, anything else as JSON); (status, decoded JSON answer), errors included."
    import json
    import urllib.error
    import urllib.request
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background_server(cmd: list, cwd: Path, env: dict, log_path: Path, ready, seconds: float):
    "Start a server process, wait (bounded) until `ready()` is true, yield, then stop its whole process group."
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + seconds
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd[0]} not up after {seconds}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield proc
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def copy_project(dest: Path) -> Path:
    "The project's tracked and untracked-but-not-ignored files, as they are in the working tree, in a new git repo."
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], ROOT).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        generated = rel.startswith(("data/", "models/")) and not rel.startswith(("data/regression/", "data/curation/"))
        if src.is_file() and not generated and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "reports" / "nbs").mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], dest)
    run("git add -A && git -c user.email=t@t -c user.name=t commit -qm copy", dest)
    return dest


def set_params(project: Path, **sections) -> Path:
    "`project`'s params.yaml with TINY_PARAMS, then `sections` ({section: {key: value}}), laid over it."
    params = yaml.safe_load((project / "params.yaml").read_text())
    for overlay in (TINY_PARAMS, sections):
        for section, values in overlay.items():
            params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    "A copy of the project with tiny params, after one full `dvc repro`."
    dest = set_params(copy_project(tmp_path_factory.mktemp("project")))
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], dest)
    proc = run(["dvc", "repro"], dest)
    dest.joinpath("repro.log").write_text(proc.stdout + proc.stderr)
    return dest


MAX_BODY = 1_000_000      # the model server's body limit in tests (413 above it)
BODY_TIMEOUT = 3          # seconds before a stalled body gets 408


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
