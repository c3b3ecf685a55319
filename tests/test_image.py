"""The container image, built and run for real with podman (no Docker engine here), and the Kubernetes Deployment's
pod run by `podman kube play`, on the tiny pipeline's registered champion.

`make image` (deploy/image/build.sh, run here directly) makes a Debian base with debootstrap, exports the champion
into the build context and builds the Dockerfile's `server` target; the container then answers a prediction (equal to
`classify`'s) and a bad request. podman and debootstrap come from Debian; `.ci/run` installs them and sets
DEEPGUARD_REQUIRE_PODMAN=1, elsewhere these tests skip without them."""

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest
import yaml

from tests.helpers import BIN, ROOT, answers_ok, free_port, post, run
from deepguard.predict import classify

if not (shutil.which("podman") and shutil.which("debootstrap")):
    if os.environ.get("DEEPGUARD_REQUIRE_PODMAN"):
        raise RuntimeError("DEEPGUARD_REQUIRE_PODMAN is set but podman/debootstrap are missing")
    pytest.skip("podman and debootstrap not installed", allow_module_level=True)

IMAGE = "localhost/deepguard-server:test"
# what runs containers on this kind of machine (no systemd cgroups, crun refused, host network only)
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
RUN_FLAGS = [
    "--network", "host", "--cgroups=no-conmon", "--cgroup-parent", "deepguard-tests", "--ulimit", "nofile=4096:4096",
    "--ulimit", "nproc=4096:4096", "--init",
]


def podman(*args, check=True, timeout=600, env=None):
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def wait_ready(base: str, seconds: float, alive) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if answers_ok(base + "/v2/health/ready"):
            return
        assert alive(), "the container stopped before it was ready"
        time.sleep(2)
    raise AssertionError(f"{base} not ready after {seconds} s")


@pytest.fixture(scope="module")
def image(tiny_project):
    "What `make image` runs (deploy/image/build.sh), in the tiny project: its registry's champion baked in."
    # (not `make image` itself: its set-up step would reinstall this venv's editable package from the copy)
    start = time.monotonic()
    proc = run(
        ["deploy/image/build.sh"],
        tiny_project,
        env={"IMAGE": IMAGE, "PYTHON": str(BIN / "python"), "MODEL_URI": "models:/deepguard-detector-test@champion"},
    )
    (tiny_project / "image-build.log").write_text(proc.stdout + proc.stderr)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    print(f"image {IMAGE}: {size / 1e6:.0f} MB, built in {time.monotonic() - start:.0f} s")
    yield IMAGE
    podman("rmi", "-f", IMAGE, check=False)
    podman("image", "prune", "-f", check=False)  # the build's intermediate (venv) stage, 2.6 GB


def check_server(base: str, tiny_project):
    files = sorted((tiny_project / "data" / "raw" / "images").rglob("*.jpg"))[:3]
    local = classify(files, model=tiny_project / "models" / "detector.keras")
    status, body = post(
        base + "/invocations", {"inputs": {"image": [base64.b64encode(f.read_bytes()).decode() for f in files]}}
    )
    assert status == 200, body
    assert [r["label"] for r in body["predictions"]] == [r.label for r in local]
    assert [r["probability_fake"] for r in body["predictions"]] == pytest.approx(
        [r.probability_fake for r in local], abs=1e-5
    )
    status, body = post(base + "/invocations", {"inputs": {"image": [base64.b64encode(b"not an image").decode()]}})
    assert status == 400 and body["reason"] == "not_image" and body["message"].startswith("row 0:")


def test_image_fits_its_budget_and_holds_no_training_library(image):
    "Issue 23's budget for the server image: 1 GB (it was 1.26 GB with mlflow's server-side dependencies)."
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    assert size <= 1e9, f"the server image is {size / 1e6:.0f} MB, over its 1 GB budget: what was added to its venv?"
    found = podman(
        "run", "--rm", *RUN_FLAGS, "--entrypoint", "python", image, "-c",
        "import importlib.util as u; print(*[m for m in ('tensorflow', 'keras', 'torch', 'pyarrow', 'scipy', 'sklearn',"
        " 'matplotlib') if u.find_spec(m)])",
    ).stdout.split()
    assert found == [], f"the server image holds {found}, which `deepguard serve` never imports"


def test_image_is_non_root_and_has_no_compiler(image):
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["deepguard"] and config["Cmd"][:1] == ["serve"]
    found = podman(
        "run", "--rm", *RUN_FLAGS, "--entrypoint", "sh", image, "-c", "command -v gcc cc g++ make apt-get || true"
    ).stdout.split()
    assert [p for p in found if not p.endswith("apt-get")] == [], found


def test_container_serves_a_prediction_and_refuses_a_bad_request(image, tiny_project):
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    name = f"deepguard-test-{port}"
    podman(
        "run", "-d", "--name", name, *RUN_FLAGS, image, "serve", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port), "--model", "/app/model",
    )
    try:
        alive = lambda: (
            podman("container", "inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "true"
        )
        wait_ready(f"http://127.0.0.1:{port}", 300, alive)
        check_server(f"http://127.0.0.1:{port}", tiny_project)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert b"deepguard_requests_total" in response.read()
    finally:
        logs = podman("logs", name, check=False).stdout
        podman("rm", "-f", "-t", "10", name, check=False)
        (tiny_project / "container.log").write_text(logs)


def test_kube_play_runs_the_deployments_pod(image, tiny_project, tmp_path):
    "The Deployment of deploy/k8s, with this image, one replica and free loopback ports, run by `podman kube play`."
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    deployment["metadata"]["name"] = f"deepguard-kube-{port}"
    deployment["spec"]["replicas"] = 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["image"] = image
    container["args"] = [
        "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), "--grpc-port",
        str(grpc_port), "--model", "/app/model",
    ]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe]["httpGet"]["port"] = port
    container.pop("resources")  # cgroup limits cannot be set on this machine's cgroup setup
    container.pop("ports")  # host network: podman refuses port mappings there (and needs none)
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    conf = {"CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf")}
    podman("kube", "play", "--network", "host", str(manifest), env=conf)
    try:
        pods = podman(
            "pod", "ps", "--filter", f"name={deployment['metadata']['name']}", "--format", "{{.Name}}"
        ).stdout.split()
        assert len(pods) == 1
        alive = lambda: (
            "Running"
            in podman("pod", "ps", "--filter", f"name={pods[0]}", "--format", "{{.Status}}", check=False).stdout
        )
        wait_ready(f"http://127.0.0.1:{port}", 300, alive)
        check_server(f"http://127.0.0.1:{port}", tiny_project)
    finally:
        podman("kube", "down", str(manifest), check=False, env=conf)
