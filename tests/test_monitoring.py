"""deploy/monitoring against real tools: promtool checks and unit-tests the rules, and a real Prometheus on loopback
scrapes the real model server (the tiny pipeline's champion) while traffic flows; every Grafana panel's query must
then return numbers from it. Prometheus comes from Debian (`apt-get install prometheus`); `.ci/run` installs it and
sets DEEPGUARD_REQUIRE_PROMETHEUS=1, elsewhere these tests skip without it."""
import base64
import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.helpers import ROOT, answers_ok, background_server, free_port

MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
if not (PROMETHEUS and PROMTOOL):
    if os.environ.get("DEEPGUARD_REQUIRE_PROMETHEUS"):
        raise RuntimeError(
            "DEEPGUARD_REQUIRE_PROMETHEUS is set but prometheus/promtool are not installed (apt-get install prometheus)"
        )
    pytest.skip("prometheus and promtool not installed (apt-get install prometheus)", allow_module_level=True)

# Grafana's own variables, as Grafana would fill them for a short time range
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "5m", "$__interval": "5s"}


def promtool(*args) -> str:
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=MONITORING)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_config_and_rules_are_valid():
    promtool("check", "config", "prometheus.yml")
    promtool("check", "rules", "rules/deepguard.yml")


def test_alert_rules_unit_tests():
    assert "SUCCESS" in promtool("test", "rules", "rules/deepguard_test.yml")


def test_drift_reference_is_the_pipelines_held_out_fake_rate():
    rules = yaml.safe_load((MONITORING / "rules" / "deepguard.yml").read_text())
    expr = next(
        r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("record") == "deepguard:reference_fake_rate"
    )
    confusion = json.loads((ROOT / "reports" / "metrics.json").read_text())["cnn"]["confusion"]
    rate = (confusion["tp"] + confusion["fp"]) / sum(confusion.values())
    assert expr == f"vector({rate:.4f})", f"update deepguard:reference_fake_rate to vector({rate:.4f})"


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads((MONITORING / "grafana" / "dashboards" / "deepguard.json").read_text())
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown Grafana variable in {expr}"
            out.append((panel["title"], expr))
    return out


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def finite(result: list) -> bool:
    return bool(result) and all(math.isfinite(float(r["value"][1])) for r in result)


@pytest.fixture(scope="module")
def prometheus(model_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / "rules" / "deepguard.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{model_server['metrics_port']}"]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ready = lambda: answers_ok(base + "/-/ready")
    cmd = [
        PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with background_server(cmd, folder, dict(os.environ), folder / "prometheus.log", ready, 60):
        yield base


def test_every_dashboard_query_returns_data_from_a_real_prometheus(prometheus, model_server, tiny_project):
    images = sorted((tiny_project / "data" / "raw" / "images").rglob("*.jpg"))[:8]
    good = json.dumps({"inputs": {"image": [base64.b64encode(p.read_bytes()).decode() for p in images[:2]]}}).encode()
    bad = json.dumps({"inputs": {"image": [base64.b64encode(b"not an image").decode()]}}).encode()
    v2 = json.dumps(
        {
            "inputs": [
                {
                    "name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"content_type": "base64"},
                    "data": [base64.b64encode(images[3].read_bytes()).decode()],
                }
            ]
        }
    ).encode()
    stop = threading.Event()

    def traffic():  # good, bad and V2 requests until the checks are done (bounded: 90 s)
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline:
            for path, body in (("/invocations", good), ("/invocations", bad), ("/v2/models/deepguard/infer", v2)):
                request = urllib.request.Request(
                    model_server["base"] + path, data=body, headers={"Content-Type": "application/json"}
                )
                try:
                    urllib.request.urlopen(request, timeout=30).read()
                except urllib.error.HTTPError as err:
                    err.read()
            time.sleep(0.2)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    queries = dashboard_queries()
    assert len(queries) >= 10
    missing = queries
    deadline = time.monotonic() + 75
    try:
        while missing and time.monotonic() < deadline:
            time.sleep(2)
            missing = [(title, expr) for title, expr in queries if not finite(query(prometheus, expr))]
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not missing, f"panels without data from Prometheus: {missing}"
    assert float(query(prometheus, 'up{job="deepguard"}')[0]["value"][1]) == 1
    assert float(query(prometheus, 'sum(deepguard_errors_total{reason="not_image"})')[0]["value"][1]) > 0


def test_rules_load_and_evaluate_and_nothing_fires_on_a_healthy_server(prometheus):
    with urllib.request.urlopen(prometheus + "/api/v1/rules", timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 12 and all(r["health"] == "ok" for r in rules), [
        (r["name"], r.get("lastError")) for r in rules
    ]
    firing = [r["name"] for r in rules if r["type"] == "alerting" and r["state"] == "firing"]
    assert "DeepGuardDown" not in firing and "DeepGuardServerErrors" not in firing
