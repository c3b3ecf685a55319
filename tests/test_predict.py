"""`classify` on the model the tiny pipeline trained: every input type, batches, odd formats, bad input."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepguard.core import InvalidImageError
from deepguard.predict import classify
from test_data import BAD_FILES, ODD_BUT_VALID


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
    assert [round(b.probability_fake, 5) for b in batch] == [round(classify(f, model=model_path).probability_fake, 5) for f in files]


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_formats_work(model_path, name):
    answer = classify(ODD_BUT_VALID[name][0], model=model_path)
    assert 0.0 <= answer.probability_fake <= 1.0


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_raises_invalid_image_error(model_path, name):
    content, reason = BAD_FILES[name]
    with pytest.raises(InvalidImageError) as err:
        classify(content, model=model_path)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("bad, reason", [(Path("/no/such/image.png"), "missing"), (12345, "unsupported_type"),
                                         (np.zeros((8, 8), np.float32), "bad_array")])
def test_bad_input_objects(model_path, bad, reason):
    with pytest.raises(InvalidImageError) as err:
        classify(bad, model=model_path)
    assert err.value.reason == reason
