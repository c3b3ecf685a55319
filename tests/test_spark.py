"""Batch scoring on Apache Spark (`deepguard spark-score`, a local[2] session on loopback): the registered model
through `mlflow.pyfunc.spark_udf`, answers equal to `classify`'s, bad files reported per row."""
import os
import shutil

import pandas as pd
import pytest

from tests.helpers import run

MODEL = "models:/deepguard-detector-test@champion"


@pytest.fixture(scope="module")
def scored(tiny_project, tmp_path_factory):
    "A folder of raw images (real and fake, one corrupt, one not an image by name) scored on Spark local[2]."
    if shutil.which("java") is None:
        message = "Spark needs Java 17 (apt-get install openjdk-17-jre-headless)"
        pytest.fail(message) if os.environ.get("DEEPGUARD_REQUIRE_JAVA") else pytest.skip(message)
    folder = tmp_path_factory.mktemp("bucket")
    manifest = pd.read_csv(tiny_project / "data" / "raw" / "manifest.csv", keep_default_na=False)
    chosen = pd.concat([manifest[manifest.label == label].head(4) for label in ("real", "fake")])
    for k, rel in enumerate(chosen.path):
        sub = folder / ("a" if k % 2 else "b")              # nested folders: the listing is recursive
        sub.mkdir(exist_ok=True)
        shutil.copy2(tiny_project / "data" / "raw" / rel, sub / f"{k}_{(tiny_project / 'data' / 'raw' / rel).name}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path_factory.mktemp("answers") / "answers.parquet"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}"}
    proc = run(["deepguard", "spark-score", str(folder), "--output", str(out), "--model", MODEL,
                "--master", "local[2]"], tiny_project, env=env)
    answers = pd.read_parquet(out)
    answers["file"] = answers.path.str.replace("file:", "", regex=False)
    return dict(folder=folder, answers=answers.sort_values("file").reset_index(drop=True), stdout=proc.stdout,
                env=env)


def test_spark_answers_equal_classify(tiny_project, scored, monkeypatch):
    "Every image file is answered once, with the probability, label and face flag `classify` gives."
    from deepguard.predict import classify
    answers = scored["answers"]
    good = answers[answers.error.isna()]
    assert len(answers) == 9 and len(good) == 8, answers           # notes.txt is not listed
    assert "9 answers written" in scored["stdout"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", scored["env"]["MLFLOW_TRACKING_URI"])
    expected = classify(list(good.file), model=MODEL)
    assert [r.label for r in expected] == good.label.tolist()
    assert [r.face_found for r in expected] == good.face_found.tolist()
    diff = max(abs(r.probability_fake - p) for r, p in zip(expected, good.probability_fake))
    assert diff <= 1e-6, diff


def test_spark_reports_a_bad_file_without_failing_the_job(scored):
    "The corrupt file gets its reason and no prediction; the job still answers the others."
    bad = scored["answers"][scored["answers"].file.str.endswith("broken.jpg")].iloc[0]
    assert pd.isna(bad.probability_fake) and pd.isna(bad.label) and pd.isna(bad.face_found)
    assert "not_image" in bad.error or "truncated" in bad.error, bad.error


def test_spark_score_without_the_model_says_so(tiny_project, tmp_path):
    "A registry without that model: exit 2 and a one-line reason, no traceback."
    proc = run(["deepguard", "spark-score", str(tmp_path), "--output", str(tmp_path / "o"), "--model",
                "models:/no-such-model@champion"], tiny_project, check=False,
               env={"MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}"})
    assert proc.returncode == 2 and "deepguard spark-score:" in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr
    )
