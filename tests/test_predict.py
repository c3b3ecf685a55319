"""`classify` on the model the tiny pipeline trained: every input type, batches, odd formats, bad input."""
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepguard.core import InvalidImageError
from deepguard.images import load_image
from deepguard.predict import classify
from tests.helpers import ALL_BAD_FILES, GOOD_PNG, ODD_BUT_VALID, run

@pytest.fixture(scope="module")
def model_path(tiny_project):
    return tiny_project / "models" / "detector.keras"


def test_input_types_agree(model_path, tiny_project):
    sample = next((tiny_project / "data" / "processed" / "images" / "test" / "fake").iterdir())
    data = sample.read_bytes()
    pil = Image.open(io.BytesIO(data))
    answers = [classify(src, model=model_path) for src in
               (sample, str(sample), data, io.BytesIO(data), pil, np.asarray(pil.convert("RGB")))]
    assert len({round(a.probability_fake, 6) for a in answers}) == 1
    answer = answers[0]
    assert answer.label == ("FAKE" if answer.probability_fake >= answer.threshold else "REAL")
    expected = answer.probability_fake if answer.label == "FAKE" else 1 - answer.probability_fake
    assert answer.confidence == pytest.approx(expected)
    import json
    assert answer.threshold == json.loads((tiny_project / "models" / "threshold.json").read_text())["threshold"]


def test_batch_matches_single_calls(model_path, tiny_project):
    files = sorted((tiny_project / "data" / "processed" / "images" / "test" / "real").iterdir())[:3]
    batch = classify(files, model=model_path)
    assert [round(b.probability_fake, 5) for b in batch] == [
        round(classify(f, model=model_path).probability_fake, 5) for f in files
    ]


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_formats_work(model_path, name):
    answer = classify(ODD_BUT_VALID[name][0], model=model_path)
    assert 0.0 <= answer.probability_fake <= 1.0


@pytest.mark.parametrize("name", sorted(ALL_BAD_FILES))
def test_bad_input_raises_invalid_image_error(model_path, name):
    content, reason = ALL_BAD_FILES[name]
    with pytest.raises(InvalidImageError) as err:
        classify(content, model=model_path)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "bad, reason",
    [(Path("/no/such/image.png"), "missing"), (12345, "unsupported_type"), (np.zeros((8, 8), np.float32), "bad_array")],
)
def test_bad_input_objects(model_path, bad, reason):
    with pytest.raises(InvalidImageError) as err:
        classify(bad, model=model_path)
    assert err.value.reason == reason


def test_bad_input_from_a_folder_path(model_path, tmp_path):
    with pytest.raises(InvalidImageError) as err:
        classify(tmp_path, model=model_path)
    assert err.value.reason == "not_image" and "folder" in str(err.value)


def test_result_names_model_and_face(model_path, tiny_project):
    answer = classify(GOOD_PNG, model=model_path)
    run_id = json.loads((tiny_project / "models" / "detector.json").read_text())["mlflow_run_id"]
    assert (answer.model_name, answer.model_version) == ("detector.keras", "run-" + run_id[:8])
    assert (answer.face_found, answer.face_box) == (False, (0, 0, 64))  # a flat colour: no face, the centred square


def test_face_chain_on_a_photo_and_no_face(model_path):
    from skimage import data

    photo = data.astronaut()  # one clear face, in the upper middle
    found = classify(photo, model=model_path)
    left, top, side = found.face_box
    assert found.face_found and 100 < side < 300 and left > 50 and top < 200
    wide = np.zeros((100, 300, 3), np.uint8)  # no face: the centred square, said so
    assert classify(wide, model=model_path).face_box == (100, 0, 100)


def test_training_and_serving_see_the_same_pixels(model_path, tiny_project):
    "The stored training crop of a raw file, and what classify feeds the model for that file, are identical."
    import tensorflow as tf
    from deepguard.faces import prepare_faces
    from deepguard.predict import load_detector

    processed = tiny_project / "data" / "processed"
    rows = pd.read_csv(processed / "manifest.csv", keep_default_na=False).head(4)
    detector = load_detector(str(model_path))
    served, _ = prepare_faces(
        [load_image(tiny_project / "data" / "raw" / p) for p in rows.raw_path], detector.metadata["processing"]
    )
    stored = np.stack(
        [
            tf.io.decode_jpeg(tf.io.read_file(str(processed / p)), channels=3, dct_method="INTEGER_ACCURATE").numpy()
            for p in rows.path
        ]
    ).astype(np.float32)
    assert np.array_equal(served, stored)
    probs = [classify(tiny_project / "data" / "raw" / p, model=model_path).probability_fake for p in rows.raw_path]
    assert np.allclose(probs, detector.probabilities(stored), atol=1e-6)


def test_no_answer_has_confidence_below_one_half(model_path, tiny_project):
    "With the pipeline's calibration the default decision is P(fake) >= 0.5: the label never contradicts P(fake)."
    decision = json.loads((tiny_project / "models" / "threshold.json").read_text())
    assert decision["threshold"] == 0.5 and decision["calibration"]["slope"] > 0
    raw = tiny_project / "data" / "raw"
    files = [raw / p for p in pd.read_csv(raw / "manifest.csv", keep_default_na=False).path]
    answers = classify(files, model=model_path)
    assert len(answers) == len(files) and all(a.confidence >= 0.5 for a in answers)
    assert all((a.label == "FAKE") == (a.probability_fake >= 0.5) for a in answers)


def test_a_model_with_an_incomplete_face_chain_record_is_refused(model_path, tmp_path):
    "A model whose metadata lacks a face-chain setting is refused with what to do, not served with today's default."
    import shutil
    from deepguard.core import ParamsError

    for name in ("detector.keras", "detector.json", "detector.xml", "detector.bin", "threshold.json"):
        shutil.copy(model_path.parent / name, tmp_path / name)
    meta = json.loads((tmp_path / "detector.json").read_text())
    del meta["processing"]["margin"]
    (tmp_path / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ParamsError, match=r"lacks \['margin'\].*Retrain it"):
        classify(GOOD_PNG, model=tmp_path / "detector.keras")


def test_registry_fallback_matches_local_model(model_path, tiny_project, monkeypatch):
    import deepguard.predict as predict

    monkeypatch.setenv("DEEPGUARD_ROOT", str(tiny_project))
    monkeypatch.delenv("DEEPGUARD_MODEL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(predict, "LOCAL_MODEL", "models/not-there.keras")
    monkeypatch.setattr(predict, "REGISTRY_MODEL", "models:/deepguard-detector-test@champion")
    assert predict.resolve_model() == "models:/deepguard-detector-test@champion"
    from_registry = classify(GOOD_PNG)
    local = classify(GOOD_PNG, model=model_path)
    registry = json.loads((tiny_project / "reports" / "registry.json").read_text())
    assert (from_registry.model_name, from_registry.model_version) == ("deepguard-detector-test", registry["version"])
    assert from_registry.probability_fake == pytest.approx(local.probability_fake, abs=1e-6)
    assert from_registry.threshold == pytest.approx(local.threshold)


def test_missing_registry_model_is_a_clear_error(tiny_project, monkeypatch):
    from deepguard.core import DeepGuardError

    monkeypatch.setenv("DEEPGUARD_ROOT", str(tiny_project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(DeepGuardError, match="Could not load models:/no-such-model@champion"):
        classify(GOOD_PNG, model="models:/no-such-model@champion")


# The CLI, as installed: the console script in the venv.
def deepguard_cli(*args, cwd):
    return run(["deepguard", *map(str, args)], cwd, check=False)


def test_cli_table_json_and_exit_codes(model_path, tiny_project, tmp_path):
    good = sorted((tiny_project / "data" / "processed" / "images" / "test").rglob("*.jpg"))[:3]
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate(good):
        (folder / ("sub" if i == 2 else "") / path.name).write_bytes(path.read_bytes())
    table = deepguard_cli("classify", folder, "--model", model_path, cwd=tiny_project)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.split()[0] in ("REAL", "FAKE")]
    assert len(rows) == 2  # not recursive: the sub-folder is left out
    lines = deepguard_cli(
        "classify", folder, "-r", "--json", "--threshold", "0.0", "--model", model_path, cwd=tiny_project
    )
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert lines.returncode == 0 and len(records) == 3
    assert {r["label"] for r in records} == {"FAKE"} and {r["threshold"] for r in records} == {0.0}
    expected = {p.name: classify(p, model=model_path).probability_fake for p in good}
    assert {Path(r["path"]).name: round(r["probability_fake"], 5) for r in records} == {
        k: round(v, 5) for k, v in expected.items()
    }


def test_cli_reports_and_skips_every_kind_of_bad_file(model_path, tiny_project, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, (content, _) in ALL_BAD_FILES.items():
        (folder / name).write_bytes(content)
    (folder / "good.png").write_bytes(GOOD_PNG)
    os.mkfifo(folder / "pipe.jpg")  # named like an image: refused, never opened (it would block)
    files = sorted(p for p in folder.iterdir())
    proc = deepguard_cli("classify", *files, "--json", "--model", model_path, cwd=tiny_project)
    assert proc.returncode == 1
    records = {Path(r["path"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    expected = {name: reason for name, (_, reason) in ALL_BAD_FILES.items()}
    expected["pipe.jpg"] = "not_file"
    assert {n: r["reason"] for n, r in records.items() if "error" in r} == expected
    assert records["good.png"]["label"] in ("REAL", "FAKE")
    assert f"{len(expected)} of {len(expected) + 1} file(s) could not be classified" in proc.stderr


def test_cli_usage_errors(model_path, tiny_project, tmp_path):
    assert (
        deepguard_cli("classify", tmp_path, "--threshold", "1.5", "--model", model_path, cwd=tiny_project).returncode
        == 2
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert deepguard_cli("classify", empty, "--model", model_path, cwd=tiny_project).returncode == 1
    (tmp_path / "good.png").write_bytes(GOOD_PNG)
    missing_model = deepguard_cli(
        "classify", tmp_path / "good.png", "--model", tmp_path / "nope.keras", cwd=tiny_project
    )
    assert missing_model.returncode == 2 and "No model at" in missing_model.stderr
    assert deepguard_cli("frobnicate", cwd=tiny_project).returncode == 2
    gone = deepguard_cli(
        "classify", tmp_path / "good.png", tmp_path / "gone.jpg", "--model", model_path, cwd=tiny_project
    )
    assert gone.returncode == 2 and "no such file or folder" in gone.stderr and "gone.jpg" in gone.stderr


def test_cli_never_prints_registry_credentials(tmp_path):
    "An unreachable tracking server whose URI holds a password: exit 2, a message, and the password nowhere."
    (tmp_path / "good.png").write_bytes(GOOD_PNG)
    env = {
        "MLFLOW_TRACKING_URI": "http://ann:s3cret-pw@127.0.0.1:9",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    proc = run(
        ["deepguard", "classify", str(tmp_path / "good.png"), "--model", "models:/x@champion"],
        tmp_path,
        check=False,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "s3cret-pw" not in proc.stdout + proc.stderr and "***@127.0.0.1" in proc.stderr, proc.stderr[-2000:]
