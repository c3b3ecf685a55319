"""The real-data path end to end: `dvc repro` with `ingest.dataset: 140k` on a small folder in that dataset's layout
(no demo corpus, no external split), as a user with the 140k Real and Fake Faces download runs it."""
import json

import pandas as pd
import pytest
from PIL import Image

from tests.helpers import copy_project, run, set_params

SPLITS = {"train": 12, "valid": 5, "test": 5}     # images per class and split


@pytest.fixture(scope="module")
def real_project(tiny_project, tmp_path_factory):
    "A 140k-layout folder (tiny pipeline's raw faces as 256 px JPEGs) and a project copy that ran `dvc repro` on it."
    root = tmp_path_factory.mktemp("140k")
    manifest = pd.read_csv(tiny_project / "data" / "raw" / "manifest.csv", keep_default_na=False)
    for label in ("real", "fake"):
        sources = list(manifest[manifest.label == label].path)
        k = 0
        for split, n in SPLITS.items():
            folder = root / "real_vs_fake" / "real-vs-fake" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                image = Image.open(tiny_project / "data" / "raw" / sources[k % len(sources)]).convert("RGB")
                image = image.resize((256, 256)).rotate(3 * (k // len(sources)))     # repeats differ: no duplicates
                image.save(folder / f"{k:05d}.jpg", quality=92)
                k += 1
    dest = set_params(copy_project(tmp_path_factory.mktemp("real-project")),
                      ingest=dict(dataset="140k", data_path=str(root), sample_size=0),
                      register=dict(model_name="deepguard-detector-real-layout"))
    proc = run(["dvc", "repro"], dest)
    (dest / "repro.log").write_text(proc.stdout + proc.stderr)
    return dest


def test_every_stage_runs_on_the_140k_layout(real_project):
    "Splits come from the dataset's folders, every stage's outputs exist, metrics cover the test split only."
    processed = pd.read_csv(real_project / "data" / "processed" / "manifest.csv", keep_default_na=False)
    counts = processed.groupby(["split", "label"]).size().to_dict()
    assert counts == {(s, label): n for s, n in (("train", 12), ("val", 5), ("test", 5)) for label in ("fake", "real")}
    assert set(processed.generator) == {"stylegan", "ffhq"}
    audit = json.loads((real_project / "reports" / "shortcut_audit.json").read_text())
    assert "source_audit" not in audit and set(audit) == {"raw", "processed"}    # demo-only audit left out
    metrics = json.loads((real_project / "reports" / "metrics.json").read_text())
    assert metrics["cnn"]["n"] == 10 and "external" not in metrics and metrics["robustness_n"] == 10
    registry = json.loads((real_project / "reports" / "registry.json").read_text())
    assert registry["model_name"] == "deepguard-detector-real-layout" and registry["version"]
    assert "Data and pipelines are up to date" in run(["dvc", "status"], real_project).stdout
