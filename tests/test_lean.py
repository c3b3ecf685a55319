"""The answering paths run from OpenVINO IR only: no TensorFlow, Keras, torch or `mtcnn` import in `classify`,
the CLI, the registered pyfunc, the MLServer runtime and the Spark scorer's module; the server's processes do not
even map TensorFlow's library. And the TensorFlow reference gives the same answers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from tests.helpers import BIN, post

HEAVY = ("tensorflow", "keras", "torch", "mtcnn")

SCRIPT = """
import json, sys
from pathlib import Path
project, image = Path(sys.argv[1]), sys.argv[2]
model = str(project / "models" / "detector.keras")
from deepguard.predict import classify
answer = classify(image, model=model)
from deepguard.cli import main
code = main(["classify", image, "--json", "--model", model])
import mlflow, mlflow.pyfunc, pandas as pd
from deepguard.images import encode_image_b64
mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
served = mlflow.pyfunc.load_model(json.loads((project / "reports" / "registry.json").read_text())["model_uri"])
out = served.predict(pd.DataFrame({"image": [encode_image_b64(Path(image).read_bytes())]}))
import deepguard.serving, deepguard.spark
print(json.dumps({"p": answer.probability_fake, "served": float(out.probability_fake[0]), "code": code,
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _first_image(project, split="test"):
    return sorted((project / "data" / "raw" / "images").rglob("*.*"))[0]


def test_answering_paths_import_no_tensorflow(tiny_project):
    image = _first_image(tiny_project)
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPGUARD_RUNTIME", "DEEPGUARD_ROOT")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_project), str(image)], capture_output=True,
                          text=True, cwd=tiny_project, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"imported {result['heavy']} on an answering path"
    assert result["code"] == 0 and abs(result["p"] - result["served"]) < 1e-6


def test_model_server_maps_no_tensorflow(model_server, tiny_project):
    "The running server and its inference workers: no TensorFlow library in their address space, and they answer."
    from deepguard.images import encode_image_b64
    status, body = post(
        model_server["base"] + "/invocations",
        {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[encode_image_b64(_first_image(tiny_project).read_bytes())]],
            }
        },
    )
    assert status == 200, body
    server = psutil.Process(model_server["proc"].pid)
    processes = [server] + server.children(recursive=True)
    assert len(processes) >= 2, "no inference worker found"
    for p in processes:  # TensorFlow's and torch's own libraries (OpenVINO's TF frontend plugin is OpenVINO's)
        mapped = {line.split()[-1] for line in Path(f"/proc/{p.pid}/maps").read_text().splitlines() if "/" in line}
        heavy = [
            m
            for m in mapped
            if "/site-packages/tensorflow/" in m or "libtensorflow" in m or "/site-packages/torch/" in m
        ]
        assert heavy == [], (p.pid, p.cmdline()[:3], heavy[:3])


def test_tensorflow_reference_gives_the_same_answers(tiny_project):
    "DEEPGUARD_RUNTIME=tensorflow (the `mtcnn` package and the Keras graph): |dP(fake)| <= 1e-4, same labels and boxes."
    raw = tiny_project / "data" / "raw"
    files = [str(raw / p) for p in pd.read_csv(raw / "manifest.csv", keep_default_na=False).path]
    script = (
        "import json, sys; from deepguard.predict import classify; "
        "print(json.dumps([[a.probability_fake, a.label, list(a.face_box)] for a in classify(sys.argv[2:], "
        "model=sys.argv[1])]))"
    )
    answers = {}
    for runtime in ("openvino", "tensorflow"):
        env = {**os.environ, "DEEPGUARD_RUNTIME": runtime}
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tiny_project / "models" / "detector.keras"), *files],
            capture_output=True, text=True, env=env, cwd=tiny_project,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[runtime] = json.loads(proc.stdout.strip().splitlines()[-1])
    ov, tf = answers["openvino"], answers["tensorflow"]
    assert len(ov) == len(files) > 20
    assert np.abs(np.array([a[0] for a in ov]) - np.array([a[0] for a in tf])).max() <= 1e-4
    assert [a[1] for a in ov] == [a[1] for a in tf]
    assert [a[2] for a in ov] == [a[2] for a in tf]
