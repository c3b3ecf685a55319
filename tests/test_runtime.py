"""The model server's runtime and the MLflow pyfunc in this process, around a stub detector: no pipeline, no
network, seconds. What they add to the detector (decoding, per-row errors, the decision rule, the batch budget,
metrics) is tested here; the real detector behind them is tested end to end in test_serving and test_predict."""
import asyncio
import base64
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest, RequestInput
from PIL import Image

from deepguard import predict, serving
from deepguard.gateway import RequestError
from deepguard.register import DetectorPyfunc
from tests.helpers import BAD_FILES, ODD_BUT_VALID, png_bytes


class StubDetector:
    "P(fake) = the image's mean red value / 255; a face is 'found' when the image is wider than tall. Records calls."
    name, version, threshold, runtime = "stub", "7", 0.5, "stub"
    metadata = {"input_size": 64}

    def __init__(self):
        self.calls = []

    def score(self, images):
        self.calls.append([im.size for im in images])
        probs = np.array([np.asarray(im)[..., 0].mean() / 255 for im in images])
        return probs, [SimpleNamespace(face_found=im.width > im.height, native_size=min(im.size)) for im in images]


def image(red: int, size=(40, 30)) -> bytes:
    return png_bytes(Image.new("RGB", size, (red, 0, 0)))


@pytest.fixture
def runtime(monkeypatch):
    "A loaded DetectorRuntime whose `load_detector` returns a fresh StubDetector."
    monkeypatch.setattr(predict, "load_detector", lambda uri: StubDetector())
    settings = ModelSettings(name="deepguard", implementation=serving.DetectorRuntime,
                             parameters=ModelParameters(uri="stub", extra={}))
    rt = serving.DetectorRuntime(settings)
    assert asyncio.run(rt.load()) and rt.loaded.is_set()
    yield rt
    asyncio.run(rt.unload())


def infer(rt, files: list[bytes]) -> dict:
    request = InferenceRequest(inputs=[RequestInput(name="image", datatype="BYTES", shape=[len(files)], data=files)])
    response = asyncio.run(rt.predict(request))
    return {out.name: np.asarray(NumpyCodec.decode_output(out)).ravel() if out.datatype != "BYTES"
            else StringCodec.decode_output(out) for out in response.outputs}


def test_v2_predict_answers_each_row_with_the_decision_rule(runtime):
    out = infer(runtime, [image(250), image(10, (30, 40)), image(128)])
    assert np.allclose(out["probability_fake"], [250 / 255, 10 / 255, 128 / 255])
    assert list(out["label"]) == ["FAKE", "REAL", "FAKE"] and list(out["error"]) == ["", "", ""]
    assert list(out["face_found"]) == [True, False, True]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_v2_predict_gives_a_bad_row_its_reason_and_scores_the_rest(runtime, name):
    content, reason = BAD_FILES[name]
    out = infer(runtime, [image(250), content])
    assert out["label"][0] == "FAKE" and out["error"][0] == ""
    assert np.isnan(out["probability_fake"][1]) and out["label"][1] == "" and f"(reason: {reason})" in out["error"][1]


def test_odd_but_valid_images_are_scored(runtime):
    out = infer(runtime, [content for content, _ in ODD_BUT_VALID.values()])
    assert list(out["error"]) == [""] * len(ODD_BUT_VALID) and np.isfinite(out["probability_fake"]).all()


def test_v2_predict_holds_at_most_the_pixel_budget_per_model_call(runtime):
    runtime.limits = {**runtime.limits, "max_request_pixels": 2 * 40 * 30}
    infer(runtime, [image(r) for r in (1, 2, 3, 4, 5)])
    assert runtime.detector.calls[-3:] == [[(40, 30)] * 2, [(40, 30)] * 2, [(40, 30)]]


def test_invocations_body_is_decoded_once_and_scored(runtime):
    body = json.dumps(
        {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image(r)).decode()] for r in (200, 20)]}}
    ).encode()
    result = runtime._check_and_score(body, "application/json")
    assert list(result["label"]) == ["FAKE", "REAL"] and len(runtime.detector.calls) == 2  # warm-up + this call


def test_invocations_body_with_a_bad_row_is_refused_naming_it(runtime):
    body = json.dumps({"instances": [{"image": base64.b64encode(image(9)).decode()}, {"image": "%%%"}]}).encode()
    with pytest.raises(RequestError) as err:
        runtime._check_and_score(body, "application/json")
    assert err.value.status == 400 and "row 1" in str(err.value.body())
    assert len(runtime.detector.calls) == 1  # the warm-up only: nothing scored before every row was checked


def test_pyfunc_predict_matches_the_runtime(runtime):
    model = DetectorPyfunc()
    model.detector = StubDetector()
    texts = [base64.b64encode(image(r)).decode() for r in (250, 10)]
    answer = model.predict(None, pd.DataFrame({"image": texts}))
    assert list(answer.columns) == ["probability_fake", "label", "face_found"]
    assert list(answer.label) == list(infer(runtime, [image(250), image(10)])["label"]) == ["FAKE", "REAL"]
    with pytest.raises(MlflowException, match="row 1"):
        model.predict(None, pd.DataFrame({"image": [texts[0], "not base64!"]}))


def test_the_runtime_logs_each_answered_row(monkeypatch, tmp_path):
    "With an inference-log folder, every answered image is one JSON line; a row that could not be decoded is not."
    monkeypatch.setenv("DEEPGUARD_INFERENCE_LOG", str(tmp_path))
    monkeypatch.setattr(predict, "load_detector", lambda uri: StubDetector())
    rt = serving.DetectorRuntime(ModelSettings(name="deepguard", implementation=serving.DetectorRuntime,
                                               parameters=ModelParameters(uri="stub", extra={})))
    asyncio.run(rt.load())
    infer(rt, [image(250), b"not an image", image(10, (30, 40))])
    lines = [json.loads(line) for path in tmp_path.glob("inference-*.jsonl") for line in path.read_text().splitlines()]
    assert [(line["label"], line["face_found"], line["face_size"]) for line in lines] == [("FAKE", True, 30),
                                                                                        ("REAL", False, 30)]
    assert all(line["model_version"] == "7" and "image" not in line for line in lines)
    asyncio.run(rt.unload())
