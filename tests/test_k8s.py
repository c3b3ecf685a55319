"""deploy/k8s validated offline: every manifest against Kubernetes' own schemas (kubernetes-validate --strict), the
KServe InferenceServices' containers as core/v1 containers (no KServe schema ships offline), and the wiring between
objects (selectors, ports, probes, image, memory against the measured server). The Deployment's pod itself is run
by `podman kube play` in test_image.py."""
import json
import subprocess

import pytest
import yaml

from tests.helpers import BIN, ROOT

K8S = ROOT / "deploy" / "k8s"


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects() -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for p in sorted(K8S.rglob("*.yaml")) for d in documents(p)}


def validate(paths) -> str:
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", *map(str, paths)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_core_manifests_pass_strict_schema_validation():
    paths = sorted(K8S.glob("*.yaml"))
    out = validate(paths)
    kinds = {k for k, _ in objects()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert out.count("passed") == sum(len(documents(p)) for p in paths) and "Couldn't find schema" not in out


def test_a_strict_validation_failure_is_caught(tmp_path):
    bad = documents(K8S / "deployment.yaml")[0]
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", str(tmp_path / "bad.yaml")], capture_output=True, text=True
    )
    assert result.returncode != 0


def test_kserve_inference_services(tmp_path):
    services = [d for (kind, _), d in objects().items() if kind == "InferenceService"]
    assert len(services) == 2
    pods = []
    for isvc in services:
        predictor = isvc["spec"]["predictor"]
        assert predictor["minReplicas"] >= 2
        if "model" in predictor:  # KServe's MLflow runtime (MLServer + mlserver-mlflow, V2)
            model = predictor["model"]
            assert model["modelFormat"]["name"] == "mlflow" and model["protocolVersion"] == "v2"
            assert model["storageUri"].startswith(("s3://", "gs://", "pvc://", "https://"))
            containers = [{"name": "kserve-container", "image": "kserve/mlserver", "resources": model["resources"]}]
        else:
            containers = predictor["containers"]
        pods.append(
            {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]},
                "spec": {"containers": containers},
            }
        )
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump_all(pods))
    validate([tmp_path / "pods.yaml"])


def test_objects_are_wired_together():
    obj = objects()
    deployment = obj[("Deployment", "deepguard")]
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2 and deployment["spec"]["selector"]["matchLabels"] == labels
    container = template["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "grpc": 8081, "metrics": 8082}
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"].startswith("/v2/health/")
    assert (
        template["spec"]["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    )
    assert container["args"][:1] == ["serve"] and "/app/model" in container["args"]
    for name in ("deepguard", "deepguard-metrics"):
        service = obj[("Service", name)]
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    assert obj[("HorizontalPodAutoscaler", "deepguard")]["spec"]["scaleTargetRef"]["name"] == "deepguard"
    assert obj[("HorizontalPodAutoscaler", "deepguard")]["spec"]["minReplicas"] >= 2
    assert obj[("PodDisruptionBudget", "deepguard")]["spec"]["selector"]["matchLabels"] == labels
    assert obj[("InferenceService", "deepguard")]["spec"]["predictor"]["containers"][0]["image"] == container["image"]


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_memory_covers_the_measured_server():
    bench = json.loads((ROOT / "reports" / "benchmarks" / "serving.json").read_text())
    peak = bench["server_rss_mib"]["peak"]
    container = objects()[("Deployment", "deepguard")]["spec"]["template"]["spec"]["containers"][0]
    request, limit = (mebibytes(container["resources"][k]["memory"]) for k in ("requests", "limits"))
    assert peak <= request <= limit and limit >= 1.3 * peak, (peak, request, limit)
    hostile = bench["adversarial"]  # the hostile mix (big images, many rows, bombs, oversize bodies)
    assert hostile["peak_rss_mib"] < limit and not hostile["unexpected"], hostile
