"""Importers on fixture trees of every layout, and bad files through ingest: named reasons, nothing else lost."""
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.helpers import BAD_FILES, ODD_BUT_VALID, ROOT, papermill, png_bytes, rgb, write_tree
from deepguard.core import DataLayoutError, InvalidImageError
from deepguard.images import load_image
from deepguard.ingest import import_dataset, sample_per_class, scan_layout


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_reason(name):
    content, reason = BAD_FILES[name]
    with pytest.raises(InvalidImageError) as err:
        load_image(content)
    assert err.value.reason == reason and str(err.value)


def test_import_quarantines_bad_files_and_keeps_the_rest(tmp_path):
    files = {f"real/{n}": c for n, (c, _) in BAD_FILES.items()}
    files.update({f"real/{n}": c for n, (c, _) in ODD_BUT_VALID.items()})
    files.update({f"fake/gen_a/f{i}.png": rgb(i) for i in range(4)})
    root = write_tree(tmp_path / "src", files)
    manifest, quarantine = import_dataset(root, "generic", tmp_path / "out")
    reasons = dict(zip(quarantine.path.map(lambda p: Path(p).name), quarantine.reason))
    assert reasons == {n: r for n, (_, r) in BAD_FILES.items()}
    reals = manifest[manifest.label == "real"]
    sizes = {Path(p).name.split("_", 1)[1]: (w, h) for p, w, h in zip(reals.path, reals.width, reals.height)}
    assert sizes == {n: s for n, (_, s) in ODD_BUT_VALID.items()}
    assert (manifest.label == "fake").sum() == 4 and set(manifest[manifest.label == "fake"].generator) == {"gen_a"}
    for rel in manifest.path:   # copied byte for byte
        assert (tmp_path / "out" / rel).is_file()


def test_genimage_layout(tmp_path):
    files = {}
    for gen in ("stable_diffusion_v_1_4", "midjourney"):
        for split in ("train", "val"):
            for sub in ("ai", "nature"):
                for i in range(6):
                    files[f"{gen}/{split}/{sub}/{sub}_{i}.png"] = rgb(hash((gen, split, sub, i)) % 10_000)
    root = write_tree(tmp_path / "genimage", files)
    manifest, quarantine = import_dataset(root, "genimage", tmp_path / "out", val_frac=0.34)
    assert len(manifest) == 48 and quarantine.empty
    fakes = manifest[manifest.label == "fake"]
    assert set(fakes.generator) == {"stable_diffusion_v_1_4", "midjourney"}
    assert set(manifest[manifest.label == "real"].generator) == {"nature(stable_diffusion_v_1_4)", "nature(midjourney)"}
    from_val = manifest.source.str.contains("/val/")
    assert set(manifest[from_val].split) == {"test"}               # GenImage's val is our test
    assert set(manifest[~from_val].split) == {"train", "val"}      # validation carved from train


def test_140k_layout(tmp_path):
    files = {
        f"real_vs_fake/real-vs-fake/{split}/{label}/{i}.jpg": png_bytes(
            Image.new("RGB", (32, 32), (i * 9, 0, 0)), "JPEG"
        )
        for split in ("train", "valid", "test")
        for label in ("real", "fake")
        for i in range(3)
    }
    manifest, _ = import_dataset(write_tree(tmp_path / "k140", files), "140k", tmp_path / "out")
    assert manifest.groupby(["split", "label"]).size().to_dict() == {
        (s, l): 3 for s in ("train", "val", "test") for l in ("real", "fake")
    }
    assert set(manifest.generator) == {"stylegan", "ffhq"}


def test_cifake_layout_and_sampling(tmp_path):
    files = {
        f"{split}/{sub}/{i:03d}.png": rgb(i + (1000 if sub == "FAKE" else 0))
        for split in ("train", "test")
        for sub in ("REAL", "FAKE")
        for i in range(10)
    }
    root = write_tree(tmp_path / "cifake", files)
    manifest, _ = import_dataset(root, "cifake", tmp_path / "out", sample_size=5, seed=3)
    assert manifest.label.value_counts().to_dict() == {"fake": 5, "real": 5}
    again, _ = import_dataset(root, "cifake", tmp_path / "out2", sample_size=5, seed=3)
    assert manifest.source.tolist() == again.source.tolist()  # deterministic
    other, _ = import_dataset(root, "cifake", tmp_path / "out3", sample_size=5, seed=4)
    assert set(other.source) != set(manifest.source)  # and the seed matters


def test_sampling_is_independent_of_listing_order(tmp_path):
    records = [
        dict(file=tmp_path / f"x{i}.png", label="real" if i % 2 else "fake", generator="g", split=None)
        for i in range(40)
    ]
    forward = sample_per_class(iter(records), 4, 0, tmp_path)
    backward = sample_per_class(iter([dict(r) for r in reversed(records)]), 4, 0, tmp_path)
    assert [r["rel"] for r in forward] == [r["rel"] for r in backward] and len(forward) == 8


def test_wrong_layout_names_the_expected_one(tmp_path):
    root = write_tree(tmp_path / "generic", {"real/a.png": rgb(1), "fake/b.png": rgb(2)})
    with pytest.raises(DataLayoutError, match=r"<generator>/\{train,val\}/\{ai,nature\}"):
        list(scan_layout(root, "genimage"))
    with pytest.raises(DataLayoutError, match="does not exist"):
        list(scan_layout(tmp_path / "missing", "generic"))


def test_ingest_stage_on_a_real_dataset_folder(tmp_path):
    "The ingest notebook as DVC runs it, on a generic folder with a bad file: manifest plus quarantine, no crash."
    files = {f"real/r{i}.png": rgb(i) for i in range(6)}
    files.update({f"fake/f{i}.png": rgb(100 + i) for i in range(6)})
    files["fake/broken.png"] = b""
    root = write_tree(tmp_path / "ds", files)
    out = tmp_path / "raw"
    proc = papermill(
        "nbs/01_ingest.ipynb", tmp_path / "out.ipynb", ROOT, dataset="generic", data_path=root, out_dir=out,
        val_frac=0.25, test_frac=0.25,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = pd.read_csv(out / "manifest.csv")
    quarantine = pd.read_csv(out / "quarantine.csv")
    assert len(manifest) == 12 and quarantine.reason.tolist() == ["empty"]
    assert set(manifest.split) == {"train", "val", "test"}


def test_ingest_stage_refuses_missing_data_path(tmp_path):
    proc = papermill("nbs/01_ingest.ipynb", tmp_path / "out.ipynb", ROOT, dataset="cifake", out_dir=tmp_path / "raw")
    assert proc.returncode != 0 and "needs ingest.data_path" in proc.stdout + proc.stderr
