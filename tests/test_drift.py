"""Drift you can see: the model server's inference log (a JSON line per answer, no image bytes), and `deepguard drift`
on logs made from the tiny pipeline's own held-out reference, unshifted and shifted."""
import base64
import hashlib
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from tests.helpers import GOOD_PNG, post, run

FIELDS = {"time", "sha256", "probability_fake", "label", "face_found", "face_size", "model_name", "model_version",
          "latency_ms"}


def test_server_logs_every_answer_without_image_bytes(model_server, tiny_project):
    image = next((tiny_project / "data" / "raw" / "images").rglob("*.jpg")).read_bytes()
    texts = [base64.b64encode(data).decode() for data in (image, GOOD_PNG)]
    status, body = post(model_server["base"] + "/invocations", {"instances": [{"image": t} for t in texts]})
    assert status == 200, body
    lines = [json.loads(line) for path in (tiny_project / "logs" / "inference").glob("inference-*.jsonl")
             for line in path.read_text().splitlines()]
    mine = {line["sha256"]: line for line in lines if line["sha256"] in
            {hashlib.sha256(data).hexdigest() for data in (image, GOOD_PNG)}}
    assert len(mine) == 2 and all(set(line) == FIELDS for line in mine.values())     # no "image" key
    answered = {hashlib.sha256(image).hexdigest(): body["predictions"][0]}
    for sha, answer in answered.items():
        assert mine[sha]["probability_fake"] == pytest.approx(answer["probability_fake"], abs=1e-6)
        assert mine[sha]["label"] == answer["label"] and mine[sha]["face_found"] == answer["face_found"]
    assert all(line["model_name"] == "deepguard-detector-test" and line["latency_ms"] > 0 for line in mine.values())


def write_log(folder, p, face_found, face_size, threshold=0.5, extra_lines=()):
    "A synthetic inference log of these answers, one per minute, plus `extra_lines` as they are."
    folder.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 12, 1, tzinfo=timezone.utc)
    lines = [json.dumps(dict(time=(start + timedelta(minutes=i)).isoformat(), sha256=f"{i:064x}",
                             probability_fake=float(pi), label="FAKE" if pi >= threshold else "REAL",
                             face_found=bool(f), face_size=int(s), model_name="m", model_version="1", latency_ms=9.0))
             for i, (pi, f, s) in enumerate(zip(p, face_found, face_size))]
    (folder / "inference-1.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_project):
    return json.loads((tiny_project / "reports" / "drift_reference.json").read_text())


def drift(project, log, out, *flags):
    return run(["deepguard", "drift", "--log", str(log), "--out", str(out), *flags], project, check=False)


def test_the_reference_is_the_test_split(tiny_project, reference):
    metrics = json.loads((tiny_project / "reports" / "metrics.json").read_text())
    assert len(reference["probability_fake"]) == len(reference["face_size"]) == metrics["cnn"]["n"]
    assert reference["threshold"] == 0.5


def test_an_unshifted_log_does_not_fire_and_a_shifted_one_does(tiny_project, reference, tmp_path):
    rng = np.random.default_rng(0)
    n = len(reference["probability_fake"])
    pick = rng.integers(0, n, 400)              # the reference population, resampled
    same = [np.asarray(reference[k])[pick] for k in ("probability_fake", "face_found", "face_size")]
    corrupt = ["{torn line", json.dumps({"time": "yesterday"})]
    proc = drift(tiny_project, write_log(tmp_path / "same", *same, extra_lines=corrupt), tmp_path / "r1")
    assert proc.returncode == 0 and proc.stdout.startswith("no drift: 400 answers (2 lines skipped)"), proc.stdout
    assert "deepguard_drift_detected 0.0" in (tmp_path / "r1" / "drift.prom").read_text()
    assert json.loads((tmp_path / "r1" / "drift.json").read_text())["drifted"] is False
    # a new generator the model does not know: everything looks real, and its faces are small and blurry
    shifted = [np.clip(same[0] * 0.2, 0, 1), np.ones(400, bool), np.full(400, 20)]
    proc = drift(tiny_project, write_log(tmp_path / "shifted", *shifted), tmp_path / "r2", "--fail-on-drift")
    assert proc.returncode == 3 and proc.stdout.startswith("DRIFT in probability_fake"), proc.stdout + proc.stderr
    prom = (tmp_path / "r2" / "drift.prom").read_text()
    assert "deepguard_drift_detected 1.0" in prom and "deepguard_drift_window_answers 400.0" in prom
    assert "DeepGuard input drift: DRIFT" in (tmp_path / "r2" / "drift.html").read_text()
    assert (tmp_path / "shifted" / "inference-1.jsonl").read_text().count("\n") == 400      # the log is untouched


@pytest.mark.parametrize("case, message", [
    ("missing", "No inference log under"), ("few", "at least 50 are needed"), ("alpha", "--alpha must be in (0, 1)"),
    ("reference", "dvc repro evaluate")])
def test_bad_input_gets_a_clear_error(tiny_project, reference, tmp_path, case, message):
    log = write_log(tmp_path / "log", [0.5] * (10 if case == "few" else 100), [True] * 100, [80] * 100)
    flags = {"alpha": ["--alpha", "2"], "reference": ["--reference", str(tmp_path / "none.json")]}.get(case, [])
    proc = drift(tiny_project, tmp_path / "nowhere" if case == "missing" else log, tmp_path / "out", *flags)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
