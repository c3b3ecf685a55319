"""The Voila dashboard in a real browser: Debian's Chromium driven by Playwright.

Starts Voila on a free loopback port over the tiny pipeline's model (or, with DEEPGUARD_DASHBOARD_PROJECT set, over
that project: `make screenshot` uses the repository's own), uploads a real and a fake image through the upload
widget, checks the labels against `classify`, checks the spectrum appears, uploads a corrupt file and checks the
message, and saves a screenshot to <project>/reports/figures/dashboard.png.
"""
import json
import os
import socket
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import BIN, background_server, free_port

CHROMIUM = os.environ.get("DEEPGUARD_CHROMIUM", "/usr/bin/chromium")   # Debian's; another path on other systems
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
STARTUP_SECONDS = 180

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("DEEPGUARD_REQUIRE_BROWSER"),
                                reason="Debian chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def project(request):
    chosen = os.environ.get("DEEPGUARD_DASHBOARD_PROJECT")
    return Path(chosen) if chosen else request.getfixturevalue("tiny_project")


@pytest.fixture(scope="module")
def voila(project):
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("DEEPGUARD_ROOT", None); env.pop("MLFLOW_TRACKING_URI", None); env.pop("DEEPGUARD_MODEL", None)
    def accepting():   # the port takes connections (a GET of the page itself would start a kernel)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return True
        except OSError:
            return False
    cmd = [str(BIN / "voila"), "app/dashboard.ipynb", "--Voila.config_file_paths=app", "--Voila.ip=127.0.0.1",
           f"--port={port}", "--no-browser"]
    with background_server(cmd, project, env, project / "voila.log", accepting, STARTUP_SECONDS):
        yield f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def page(voila):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(voila)
        page.wait_for_selector(".dg-header")
        yield page
        browser.close()


def upload(page, files):
    with page.expect_file_chooser() as chooser:
        page.click("button.widget-upload")
    chooser.value.set_files([str(f) for f in files])


def test_healthcheck_url_answers(voila):
    "The Dockerfile's HEALTHCHECK fetches this static file."
    with urllib.request.urlopen(voila + "voila/static/voila.js", timeout=10) as response:
        assert response.status == 200 and len(response.read()) > 1000


def test_header_shows_model_and_metrics(page, project):
    header = page.inner_text(".dg-header")
    metrics = json.loads((project / "reports" / "metrics.json").read_text())["cnn"]
    assert "detector.keras" in header and f"test auc {metrics['roc_auc']:.3f}" in header


def test_upload_real_and_fake(page, project, tmp_path):
    from deepguard.predict import classify
    raw = project / "data" / "raw"
    manifest = pd.read_csv(raw / "manifest.csv", keep_default_na=False)
    test = manifest[manifest.split == "test"].sort_values("path")
    files = [raw / test[test.label == label].path.iloc[0] for label in ("real", "fake")]
    upload(page, files)
    page.wait_for_function("document.querySelectorAll('.dg-result').length >= 2")
    shown = {}
    for result in page.query_selector_all(".dg-result"):
        text = result.inner_text().split("\n")
        shown[text[0]] = text[1]
    expected = {f.name: r.label for f, r in zip(files, classify(files, model=project / "models" / "detector.keras"))}
    assert shown == expected
    spectra = page.query_selector_all("img.dg-spectrum")
    assert len(spectra) >= 2 and all(s.is_visible() and s.bounding_box()["width"] > 50 for s in spectra)
    assert len(page.query_selector_all("img.dg-gradcam")) >= 2
    assert len(page.query_selector_all("img.dg-source")) >= 2          # the upload with its crop square
    crops = page.query_selector_all("img.dg-input")                    # the colour face crop the model sees
    assert len(crops) >= 2 and all(c.bounding_box()["width"] > 100 for c in crops)


def test_corrupt_upload_shows_a_message_and_the_page_keeps_working(page, project, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    upload(page, [bad])
    page.wait_for_selector(".dg-error")
    assert "corrupt.jpg" in page.inner_text(".dg-error")
    before = len(page.query_selector_all(".dg-result"))
    page.click("button.dg-example >> nth=0")                     # the kernel still answers
    page.wait_for_function(f"document.querySelectorAll('.dg-result').length > {before}")
    shot = project / "reports" / "figures" / "dashboard.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
