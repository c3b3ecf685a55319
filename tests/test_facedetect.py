"""The OpenVINO face detector (`deepguard.facedetect`) against the `mtcnn` package it ports: recorded boxes on
fixture images from installed packages, and, where TensorFlow is installed, the package itself."""
import json
from pathlib import Path

import numpy as np
import pytest

from deepguard.faces import face_detector
from tests.face_fixtures import fixture_arrays

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "face_boxes.json").read_text())
FIXTURES = dict(fixture_arrays())


def test_fixtures_are_the_recorded_ones():
    assert sorted(FIXTURES) == sorted(RECORDED)
    assert sum(map(len, RECORDED.values())) >= 30, "too few faces in the fixtures to mean anything"
    assert any(not faces for faces in RECORDED.values()), "no fixture without a face"


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_boxes_match_the_recorded_reference(name):
    "Same boxes (integer pixels, as the package rounds them) in the same order, confidence within 1e-4."
    found = face_detector("openvino").detect_faces(FIXTURES[name])
    expected = RECORDED[name]
    assert [f["box"] for f in found] == [e["box"] for e in expected]
    assert np.allclose([f["confidence"] for f in found], [e["confidence"] for e in expected], atol=1e-4)


def test_live_reference_agrees_on_a_sample():
    "The recorded file is still what the installed `mtcnn` package answers (a check on the recording itself)."
    pytest.importorskip("tensorflow")
    reference = face_detector("tensorflow")
    for name in sorted(RECORDED)[::6]:
        assert [f["box"] for f in reference.detect_faces(FIXTURES[name])] == [e["box"] for e in RECORDED[name]], name


def test_threads_share_one_detector():
    "One infer request per thread: concurrent callers get the answers a single caller gets."
    from concurrent.futures import ThreadPoolExecutor
    detector = face_detector("openvino")
    names = [n for n in sorted(RECORDED) if RECORDED[n]][:8]
    with ThreadPoolExecutor(4) as pool:
        boxes = list(pool.map(lambda n: [f["box"] for f in detector.detect_faces(FIXTURES[n])], names * 3))
    assert boxes == [[e["box"] for e in RECORDED[n]] for n in names] * 3
