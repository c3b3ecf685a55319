"""Feedback from users (issue 25, part 3): reports over HTTP into the quarantine, the token and rate rules of the
front door, concurrent writers, a writer killed mid-way, and the review that turns reports into a source."""
import asyncio
import base64
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
from PIL import Image

from deepguard.feedback import list_reports, store_report
from deepguard.gateway import Gateway
from tests.helpers import post, run


def png(seed: int, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def report(data: bytes, label="fake", note="") -> dict:
    return {"image": base64.b64encode(data).decode(), "label": label, "note": note}


def test_a_report_over_http_waits_in_the_quarantine_with_the_models_answer(model_server, tiny_project):
    url = model_server["base"] + "/v2/models/deepguard/feedback"
    status, body = post(url, report(png(1), "fake", "looks generated to me"))
    assert status == 201 and body["status"] == "pending", body
    stored = json.loads((tiny_project / "data" / "feedback" / "pending" / f"{body['id']}.json").read_text())
    assert stored["label"] == "fake" and stored["note"] == "looks generated to me"
    assert stored["model"]["name"] == "deepguard-detector-test" and stored["answer"] == body["answer"]
    assert base64.b64decode(stored["image"]) == png(1)
    assert post(url, report(png(1), "real")) == (200, {"id": body["id"], "status": "duplicate",
                                                       "answer": body["answer"]})
    for bad, reason in ((report(png(2), "maybe"), "bad_label"), (report(b"plain text"), "not_image"),
                        ({"label": "fake"}, "missing_image"), (report(png(3), note="x" * 1001), "bad_note")):
        status, answer = post(url, bad)
        assert status == 400 and answer["reason"] == reason, answer
    # over the body limit: tests/test_serving.py::test_oversized_body_is_413 sends one to this route too


def test_reports_are_rate_limited_per_client(model_server):
    url = model_server["base"] + "/v2/models/deepguard/feedback"
    statuses = []
    for seed in range(100, 140):  # 40 distinct reports at once; the limit is 30 a minute
        request = urllib.request.Request(
            url, json.dumps(report(png(seed, (20, 20)))).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as err:
            statuses.append(err.code)
            if err.code == 429:
                assert err.headers["Retry-After"] == "60" and json.loads(err.read())["reason"] == "rate_limited"
                break
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {200, 201} and len(statuses) <= 31, statuses


def call(gateway, path="/v2/models/deepguard/feedback", headers=()):
    "One POST through the front door in this process; (status, JSON answer). The inner app answers 201."

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b'{"status": "pending"}'})

    gateway.app = inner
    body = json.dumps(report(png(9))).encode()
    scope = {
        "type": "http", "method": "POST", "path": path, "client": ("10.1.2.3", 5000),
        "headers": [(b"content-length", str(len(body)).encode()), *headers],
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(gateway(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_the_token_is_enforced_beyond_loopback(monkeypatch):
    gateway = Gateway(None, probe_path=None)
    monkeypatch.setenv("DEEPGUARD_HOST", "0.0.0.0")
    monkeypatch.delenv("DEEPGUARD_FEEDBACK_TOKEN", raising=False)
    status, answer = call(gateway)
    assert status == 403 and answer["reason"] == "feedback_needs_token"
    monkeypatch.setenv("DEEPGUARD_FEEDBACK_TOKEN", "s3cret")
    assert call(gateway)[0] == 401
    assert call(gateway, headers=[(b"authorization", b"Bearer wrong")])[0] == 401
    assert call(gateway, headers=[(b"authorization", b"Bearer s3cret")]) == (201, {"status": "pending"})
    monkeypatch.setenv("DEEPGUARD_HOST", "127.0.0.1")  # a token, once set, is needed on loopback too
    assert call(gateway)[0] == 401


def _writer(folder, seeds):
    for seed in seeds:
        store_report(png(seed), "real", "", {"label": "FAKE"}, {"name": "m"}, folder=folder)


def test_concurrent_writers_lose_nothing_and_duplicate_nothing(tmp_path):
    "Four processes report the same 12 images, each in its own order: 12 reports, each complete."
    orders = [list(range(12)), list(range(11, -1, -1)), list(range(0, 12, 2)) + list(range(1, 12, 2)), list(range(12))]
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(tmp_path, o)) for o in orders]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    reports = list_reports("pending", tmp_path)
    assert len(reports) == 12 and len({r["id"] for r in reports}) == 12
    assert list((tmp_path / "pending").glob(".tmp-*")) == []


def test_a_writer_killed_mid_write_leaves_no_partial_report(tmp_path):
    "Killed after its temporary file is written but before it is published: nothing half-written is ever read."
    code = (
        "import os, sys, time; from deepguard import feedback; "
        "os.link = lambda *a: time.sleep(600); "  # hang at the publishing step
        "feedback.store_report(open(sys.argv[1], 'rb').read(), 'fake', '', {}, {}, folder=sys.argv[2])"
    )
    (tmp_path / "img.png").write_bytes(png(7))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "img.png"), str(tmp_path)])
    deadline = time.monotonic() + 60
    while not list((tmp_path / "pending").glob(".tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert list((tmp_path / "pending").glob(".tmp-*")) and not list((tmp_path / "pending").glob("[0-9a-f]*.json"))
    assert list_reports("pending", tmp_path) == []
    assert store_report(png(7), "fake", "", {}, {}, folder=tmp_path)[1] is True  # the next report of it is stored


def test_review_commands_refuse_bad_input(tmp_path, tiny_project):
    store_report(
        png(11), "fake", "", {"label": "REAL", "probability_fake": 0.1}, {"name": "m", "version": "1"}, folder=tmp_path
    )
    store_report(
        png(12), "real", "", {"label": "FAKE", "probability_fake": 0.9}, {"name": "m", "version": "1"}, folder=tmp_path
    )
    listed = run(["deepguard", "feedback", "list", "--dir", str(tmp_path)], tiny_project).stdout.splitlines()
    assert len(listed) == 2 and "claimed fake  model said REAL" in "\n".join(listed)
    ids = [line.split()[0] for line in listed]
    for flags, message in (
        (["accept", *ids, "--source", "fb", "--license", "x"], "one claimed label at a time"),
        (["accept", ids[0]], "needs --source NAME and --license"),
        (["reject", ids[0]], "say why"),
        (["show", "0" * 64], "no feedback report"),
    ):
        proc = run(["deepguard", "feedback", *flags, "--dir", str(tmp_path)], tiny_project, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(list_reports("pending", tmp_path)) == 2  # nothing moved by a refused command
    out = run(
        ["deepguard", "feedback", "reject", ids[1], "--reason", "a real photograph", "--dir", str(tmp_path)],
        tiny_project,
    ).stdout
    assert (
        "rejected 1 reports" in out and list_reports("rejected", tmp_path)[0]["review"]["reason"] == "a real photograph"
    )
