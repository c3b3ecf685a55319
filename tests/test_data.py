"""Importers on fixture trees of every layout, and bad files through ingest: named reasons, nothing else lost."""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, run
from deepguard.core import DataLayoutError, InvalidImageError, load_image
from deepguard.ingest import import_dataset, sample_per_class, scan_layout


def png_bytes(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(value, size=(32, 32)) -> bytes:
    rng = np.random.default_rng(value)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)))


def bomb_header_png(width=100_000, height=100_000) -> bytes:
    "A tiny PNG whose header claims width x height pixels."
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_tree(root: Path, files: dict) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def exif_rotated() -> bytes:
    image = Image.new("RGB", (40, 20), (0, 200, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return png_bytes(image, "JPEG", exif=exif)


GOOD_JPEG = png_bytes(Image.new("RGB", (64, 64), (90, 20, 30)), "JPEG")
BAD_FILES = {  # file name -> (content, reason the decoder must give)
    "empty.png": (b"", "empty"),
    "text.jpg": (b"this is a text file, not an image\n" * 4, "not_image"),
    "truncated.jpg": (GOOD_JPEG[: len(GOOD_JPEG) // 2], "corrupt"),
    "garbage_png.png": (b"\x89PNG\r\n\x1a\n" + b"\x00\x01garbage" * 20, "corrupt"),
    "bomb_header.png": (bomb_header_png(), "too_large"),
    "bomb_real.png": (png_bytes(Image.new("1", (8000, 8000))), "too_large"),
    "one_pixel.png": (png_bytes(Image.new("RGB", (1, 1))), "too_small"),
}
ODD_BUT_VALID = {  # file name -> (content, expected (width, height))
    "gray.png": (png_bytes(Image.new("L", (30, 20), 100)), (30, 20)),
    "rgba.png": (png_bytes(Image.new("RGBA", (30, 20), (1, 2, 3, 4))), (30, 20)),
    "cmyk.jpg": (png_bytes(Image.new("CMYK", (30, 20), (0, 50, 50, 0)), "JPEG"), (30, 20)),
    "sixteen.png": (png_bytes(Image.fromarray(np.full((20, 30), 40000, np.uint16))), (30, 20)),
    "palette.gif": (png_bytes(Image.new("RGB", (30, 20), (9, 9, 200)).convert("P"), "GIF"), (30, 20)),
    "exif_rotated.jpg": (exif_rotated(), (20, 40)),
}


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
    files = {f"real_vs_fake/real-vs-fake/{split}/{label}/{i}.jpg": png_bytes(Image.new("RGB", (32, 32), (i * 9, 0, 0)), "JPEG")
             for split in ("train", "valid", "test") for label in ("real", "fake") for i in range(3)}
    manifest, _ = import_dataset(write_tree(tmp_path / "k140", files), "140k", tmp_path / "out")
    assert manifest.groupby(["split", "label"]).size().to_dict() == {(s, l): 3 for s in ("train", "val", "test") for l in ("real", "fake")}
    assert set(manifest.generator) == {"stylegan", "ffhq"}


def test_cifake_layout_and_sampling(tmp_path):
    files = {f"{split}/{sub}/{i:03d}.png": rgb(i + (1000 if sub == "FAKE" else 0))
             for split in ("train", "test") for sub in ("REAL", "FAKE") for i in range(10)}
    root = write_tree(tmp_path / "cifake", files)
    manifest, _ = import_dataset(root, "cifake", tmp_path / "out", sample_size=5, seed=3)
    assert manifest.label.value_counts().to_dict() == {"fake": 5, "real": 5}
    again, _ = import_dataset(root, "cifake", tmp_path / "out2", sample_size=5, seed=3)
    assert manifest.source.tolist() == again.source.tolist()       # deterministic
    other, _ = import_dataset(root, "cifake", tmp_path / "out3", sample_size=5, seed=4)
    assert set(other.source) != set(manifest.source)               # and the seed matters


def test_sampling_is_independent_of_listing_order(tmp_path):
    records = [dict(file=tmp_path / f"x{i}.png", label="real" if i % 2 else "fake", generator="g", split=None) for i in range(40)]
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
    run(["papermill", "--no-progress-bar", "-k", "python3", str(ROOT / "nbs/01_ingest.ipynb"), str(tmp_path / "out.ipynb"),
         "-p", "dataset", "generic", "-p", "data_path", str(root), "-p", "out_dir", str(out)], ROOT)
    manifest = pd.read_csv(out / "manifest.csv")
    quarantine = pd.read_csv(out / "quarantine.csv")
    assert len(manifest) == 12 and quarantine.reason.tolist() == ["empty"]
    assert set(manifest.split) == {"train", "val", "test"}


def test_ingest_stage_refuses_missing_data_path(tmp_path):
    proc = run(["papermill", "--no-progress-bar", "-k", "python3", str(ROOT / "nbs/01_ingest.ipynb"),
                str(tmp_path / "out.ipynb"), "-p", "dataset", "cifake", "-p", "out_dir", str(tmp_path / "raw")],
               ROOT, check=False)
    assert proc.returncode != 0 and "needs ingest.data_path" in proc.stdout + proc.stderr
