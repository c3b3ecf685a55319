"""Multi-worker training: the train stage's notebook run as two workers of a TF_CONFIG cluster on loopback
(MultiWorkerMirroredStrategy), against the same stage on one worker."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import BIN, ROOT, free_port

# The pipeline's own backbone (ImageNet EfficientNet-Lite0, frozen in phase 1: no batch statistics), augmentation
# on, dropout off (each replica would draw its own masks), 16 training crops in one batch of 16: every step splits
# 8 + 8 across the two workers (with an uneven split, each replica's mean loss weights its images differently).
PARAMS = dict(backbone="efficientnet_lite0", batch_size=16, epochs=3, fine_tune_epochs=0,
              learning_rate=0.01, augment_p=0.5, grayscale_p=0.2, dropout=0.0, patience=5, seed=7)
TOLERANCE = 1e-5     # largest |difference| in P(fake) on the validation crops, one worker against two


def train(project, processed, out, tf_config=None, log=None):
    "Start the train notebook through papermill (as `dvc repro train` does) on `processed`; the Popen."
    params = {**PARAMS, "processed_dir": processed, "model_path": out / "detector.keras",
              "history_path": out / "history.csv", "checkpoint_path": out / "best.keras",
              "weights_cache": project / "models" / "backbones", "figures_dir": out / "figures"}
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}
    cmd = [str(BIN / "papermill"), "--no-progress-bar", "-k", "python3", str(ROOT / "nbs" / "05_train.ipynb"),
           str(out / "train.ipynb"), "-p", "params_path", "params.yaml", "-y", json.dumps({"overrides": overrides})]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent / 'mlflow.db'}", "PYTHONHASHSEED": "0"}
    env.pop("TF_CONFIG", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(procs, timeout=600):
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module")
def runs(tiny_project, tmp_path_factory):
    "16 of the tiny project's training crops trained by two workers at once, then by one; the output folders."
    work = tmp_path_factory.mktemp("multiworker")
    processed = work / "processed"
    shutil.copytree(tiny_project / "data" / "processed", processed)
    manifest = pd.read_csv(processed / "manifest.csv", keep_default_na=False)
    extra = manifest.index[manifest.split == "train"][PARAMS["batch_size"]:]
    manifest.drop(index=extra).to_csv(processed / "manifest.csv", index=False)
    assert (manifest.drop(index=extra).split == "train").sum() == PARAMS["batch_size"]
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    logs = [open(work / f"worker{i}.log", "w") for i in range(2)]
    procs = [train(tiny_project, processed, work / "cluster",
                   {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}, logs[i]) for i in range(2)]
    finish(procs)
    for log in logs:
        log.close()
    assert all(p.returncode == 0 for p in procs), "\n".join(
        (work / f"worker{i}.log").read_text()[-3000:] for i in range(2)
    )
    with open(work / "single.log", "w") as log:
        single = train(tiny_project, processed, work / "single", None, log)
        finish([single])
    assert single.returncode == 0, (work / "single.log").read_text()[-3000:]
    return dict(cluster=work / "cluster", single=work / "single", db=work / "mlflow.db", processed=processed)


def probabilities(model_path, crops):
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(model_path, safe_mode=True)
    return tf.sigmoid(model(crops, training=False)).numpy().ravel()


def test_two_workers_train_like_one(runs):
    "Two workers (8 + 8 images per step, gradients all-reduced) give the one-worker model within TOLERANCE."
    manifest = pd.read_csv(runs["processed"] / "manifest.csv", keep_default_na=False)
    crops = np.stack(
        [
            np.asarray(Image.open(runs["processed"] / p).convert("RGB"), np.float32)
            for p in manifest[manifest.split == "val"].path
        ]
    )
    two = probabilities(runs["cluster"] / "detector.keras", crops)
    one = probabilities(runs["single"] / "detector.keras", crops)
    assert np.abs(two - one).max() <= TOLERANCE, np.abs(two - one).max()
    history = [pd.read_csv(runs[k] / "history.csv") for k in ("cluster", "single")]
    assert len(history[0]) == len(history[1]) == PARAMS["epochs"]
    assert np.allclose(history[0].loss, history[1].loss, atol=1e-5), (history[0].loss, history[1].loss)
    assert history[0].val_loss.iloc[-1] < history[0].val_loss.iloc[0]  # it trained


def test_only_the_chief_writes(runs):
    "Worker 0 wrote the model and the one MLflow run (tagged with the strategy and 2 replicas); worker 1 nothing."
    from mlflow import MlflowClient

    produced = sorted(p.name for p in runs["cluster"].iterdir())
    assert {"detector.keras", "detector.json", "history.csv", "figures"} <= set(produced)
    client = MlflowClient(f"sqlite:///{runs['db']}")
    experiment = client.get_experiment_by_name("deepguard")
    tagged = [r.data.tags for r in client.search_runs([experiment.experiment_id])]
    cluster_runs = [t for t in tagged if t.get("replicas") == "2"]  # MultiWorkerMirroredStrategy's class name
    assert len(cluster_runs) == 1 and cluster_runs[0]["strategy"] == "CollectiveAllReduceStrategy", tagged
    assert client.get_experiment_by_name("worker") is None  # the other worker's run stayed in its scratch
