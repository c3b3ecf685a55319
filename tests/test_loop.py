"""The MLOps loop on the tiny project (issue 25, part 1): a new fake family added with `deepguard add-source`, then
`dvc repro`: the family is in the corpus and the cross-source table, and the register gate's decision is recorded.
Runs on a copy of the tiny project after its first `dvc repro` (its champion, DVC cache and registry included)."""
import json
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from tests.helpers import run


@pytest.fixture(scope="module")
def looped(tiny_project, tmp_path_factory):
    "The copy after `deepguard add-source` of a 'posterized' family (and two bad files) and a second `dvc repro`."
    project = tmp_path_factory.mktemp("loop") / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    raw = project / "data" / "raw"
    photos = pd.read_csv(raw / "manifest.csv", keep_default_na=False)
    photos = photos[(photos.label == "real") & (photos.split == "train")].path[:16]
    assert len(photos) >= 8, "the tiny corpus has too few training photographs for this test"
    folder = tmp_path_factory.mktemp("newgen")
    for i, rel in enumerate(photos):     # a stand-in generator: photographs posterized to 3 bits, mirrored
        ImageOps.mirror(ImageOps.posterize(Image.open(raw / rel).convert("RGB"), 3)).save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (folder / "copy.png").write_bytes((folder / "img00.png").read_bytes())
    before = json.loads((project / "reports" / "registry.json").read_text())
    added = run(["deepguard", "add-source", str(folder), "--name", "posterized", "--label", "fake",
                 "--license", "CC0 (made by this test)"], project)
    listed = run(["deepguard", "sources"], project).stdout
    status = run(["dvc", "status", "ingest"], project).stdout
    repro = run(["dvc", "repro"], project)
    return dict(project=project, added=added.stdout, listed=listed, status=status, repro=repro, before=before,
                n=len(photos))


def test_add_source_copies_checks_and_tracks(looped):
    project = looped["project"]
    assert f"added source posterized: {looped['n']} fake images of family posterized" in looped["added"]
    assert "1 refused" in looped["added"] and "posterized" in looped["listed"]
    rows = pd.read_csv(project / "data" / "sources" / "posterized" / "manifest.csv")
    assert len(rows) == looped["n"] and rows.sha256.is_unique and set(rows.license) == {"CC0 (made by this test)"}
    assert (project / "data" / "sources" / "posterized.dvc").is_file()          # DVC-tracked
    assert "data/sources" in looped["status"]                                  # so ingest must re-run


def test_the_family_is_in_the_corpus_and_the_cross_table(looped):
    project = looped["project"]
    manifest = pd.read_csv(project / "data" / "raw" / "manifest.csv", keep_default_na=False)
    mine = manifest[manifest.generator == "posterized"]
    assert len(mine) == looped["n"] and set(mine.label) == {"fake"} and set(mine.split) == {"train", "val", "test"}
    assert (mine.jpeg_quality.astype(int) > 0).all()          # acquired like every demo image
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert any(pair.endswith(" vs posterized") for pair in metrics["cross_source"])
    assert "posterized" in metrics["per_generator"]


def test_the_demo_rows_did_not_move(looped, tiny_project):
    "Adding a source changes no demo image and moves none between splits (the champion's held-out rows stay held out)."
    old = pd.read_csv(tiny_project / "data" / "raw" / "manifest.csv", keep_default_na=False)
    new = pd.read_csv(looped["project"] / "data" / "raw" / "manifest.csv", keep_default_na=False)
    new = new[new.generator != "posterized"].reset_index(drop=True)
    assert list(new.path) == list(old.path) and list(new.split) == list(old.split)
    assert list(new.sha256) == list(old.sha256)


def test_the_gate_compared_the_challenger_with_the_champion(looped):
    record = json.loads((looped["project"] / "reports" / "registry.json").read_text())
    assert int(record["version"]) == int(looped["before"]["version"]) + 1 and record["reason"]
    assert record["comparison"] and "difference" in record["comparison"], record
    assert "posterized" in record["comparison"]["per_family"]           # the new family, compared too
    card = (looped["project"] / "reports" / "model_card.md").read_text()
    assert "## Registry gate" in card and "| posterized |" in card


def test_remove_source_undoes_it(looped, tmp_path):
    project = tmp_path / "again"
    shutil.copytree(looped["project"], project, symlinks=True, ignore=shutil.ignore_patterns("mlruns", "mlflow.db"))
    out = run(["deepguard", "remove-source", "posterized"], project).stdout
    assert f"removed source posterized ({looped['n']} images)" in out
    assert not (project / "data" / "sources" / "posterized").exists()
    assert "no registered sources" in run(["deepguard", "sources"], project).stdout
    bad = run(["deepguard", "remove-source", "posterized"], project, check=False)
    assert bad.returncode == 2 and "no source 'posterized' (registered: none)" in bad.stderr


@pytest.mark.parametrize("flags, message", [
    (["--name", "Bad Name", "--label", "fake", "--license", "x"], "source name"),
    (["--name", "ok", "--label", "fake", "--license", " "], "--license is required"),
    (["--name", "ok", "--label", "fake", "--license", "x", "--generator", "../up"], "family"),
])
def test_add_source_refuses_bad_input(tiny_project, tmp_path, flags, message):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    proc = run(["deepguard", "add-source", str(folder), *flags], tiny_project, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tiny_project / "data" / "sources" / "ok").exists()


def test_a_zip_with_members_outside_is_refused_member_by_member(tiny_project, tmp_path):
    archive = tmp_path / "in.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../outside.png", b"x")
    proc = run(["deepguard", "add-source", str(archive), "--name", "zipped", "--label", "real", "--license", "x"],
               tiny_project, check=False)
    assert proc.returncode == 2 and "no readable image (1 refused)" in proc.stderr
    assert not (tiny_project / "data" / "sources" / "zipped").exists() and not (tmp_path / "outside.png").exists()


def test_a_report_over_http_once_accepted_is_in_the_next_runs_data(looped, model_server, tiny_project):
    "The loop's other door: a user's report, reviewed and accepted, is a source the next `dvc repro` trains on."
    import base64
    import io
    import time

    from tests.helpers import post
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (60, 50, 3), dtype=np.uint8)).save(buffer, "PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "label": "fake", "note": "from the loop test"}
    for _ in range(30):                 # the feedback route allows 30 reports a minute per client
        status, answer = post(model_server["base"] + "/v2/models/deepguard/feedback", body)
        if status != 429:
            break
        time.sleep(2)
    assert status == 201, answer
    project, feedback = looped["project"], tiny_project / "data" / "feedback"
    out = run(["deepguard", "feedback", "accept", answer["id"][:12], "--source", "fb-fakes", "--license",
               "reported by a user, CC0", "--dir", str(feedback)], project).stdout
    assert "accepted 1 reports as source fb-fakes (fake)" in out
    assert (feedback / "accepted" / f"{answer['id']}.json").is_file()
    assert not (feedback / "pending" / f"{answer['id']}.json").exists()
    run(["dvc", "repro", "ingest"], project)
    manifest = pd.read_csv(project / "data" / "raw" / "manifest.csv", keep_default_na=False)
    reported = manifest[manifest.generator == "feedback"]
    assert len(reported) == 1 and set(reported.label) == {"fake"}


def test_a_restarted_server_serves_the_champion_the_gate_chose(looped):
    "How the server picks up a new champion: it resolves the alias when it starts (a restart, or a rolling update)."
    import os

    from tests.helpers import BIN, answers_ok, background_server, free_port, post
    project = looped["project"]
    record = json.loads((project / "reports" / "registry.json").read_text())
    code = ("import mlflow; from mlflow import MlflowClient; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
            "print(MlflowClient().get_model_version_by_alias('deepguard-detector-test', 'champion').version)")
    champion = run(["python", "-c", code], project).stdout.split()[-1]
    assert champion == (record["version"] if record["champion"] else looped["before"]["version"])
    port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    env.pop("DEEPGUARD_ROOT", None)
    base = f"http://127.0.0.1:{port}"
    cmd = ["deepguard", "serve", "--model", "models:/deepguard-detector-test@champion", "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port)]
    ready = lambda: answers_ok(base + "/v2/health/ready")
    with background_server(cmd, project, env, project / "serve.log", ready, 180):
        image = next((project / "data" / "raw" / "images").rglob("*.jpg")).read_bytes()
        import base64
        status, body = post(base + "/v2/models/deepguard/infer", {"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]})
        assert status == 200 and body["model_version"] == champion, body
