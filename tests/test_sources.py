"""The demo corpus's new sources on their own: the ComfyUI diffusion reader (provenance, the input-exclusion rules,
the photoreal list) on a fixture of the packages' own files, and the WebP matching of the reals."""
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepguard.ingest import (COMFY_PACKAGES, TEMPLATE_RULES, diffusion_faces, not_photoreal, template_files,
                              template_frames, webp_round_trip)
from deepguard.preprocess import shortcut_audit, webp_history

from tests.helpers import ROOT

PINNED = {
    "comfyui-workflow-templates-media-assets-01": "0.1.48", "comfyui-workflow-templates-media-assets-02": "0.1.24",
    "comfyui-workflow-templates-media-other": "0.3.229", "comfyui-workflow-templates-media-video": "0.3.101",
}


@pytest.fixture(scope="module")
def templates():
    return template_files()


def test_only_the_four_pinned_packages_are_read(templates):
    assert dict(templates.groupby("package").version.first()) == PINNED
    assert {p.replace("_", "-") for p in COMFY_PACKAGES} == set(PINNED)
    assert templates.path.map(lambda p: any(f"/{pkg}/templates/" in p for pkg in COMFY_PACKAGES)).all()


def test_the_input_of_every_two_file_workflow_is_dropped(templates):
    counts = templates.workflow.value_counts()
    inputs = templates[(templates["index"] == 1) & templates.workflow.map(counts).gt(1)]
    assert len(inputs) > 20 and (inputs.rule != "").all()
    kept = templates[templates.rule == ""]
    assert set(templates.rule) - {""} <= set(TEMPLATE_RULES) and 80 < len(kept) < len(templates) / 2
    # image-conditioned workflows with one file: that file is the input, never a kept output
    conditioned = kept[
        (kept["index"] == 1) & kept.workflow.str.contains(r"(?:^|_)(?:i2v|flf2v|r2v|image_to_video)(?:_|$)")
    ]
    assert conditioned.empty, conditioned.file.tolist()
    assert not kept.workflow.str.contains("upscale|llm|audio|speech|depth|background").any()


def test_reader_on_a_fixture_of_package_files(templates):
    fixture = templates[
        templates.file.isin(
            [
                "api_bfl_flux3_t2i-1.webp",  # text-to-image output, a face
                "api_qwen3_t2i-1.webp",  # a statue: on the photoreal list
                "image_qwen_image_2_1_image_edit-1.webp",
                "image_qwen_image_2_1_image_edit-2.webp",  # input, output
                "video_wan2_2_14B_t2v-1.webp",  # an animated thumbnail: several frames
                "api_kling4_i2v-1.webp",
            ]
        )
    ]  # the image a video was made from
    exclude = not_photoreal(ROOT / "data" / "curation" / "comfyui_not_photoreal.csv")
    assert exclude["api_qwen3_t2i-1.webp"] == "statue"
    found, drops = diffusion_faces(exclude, n_frames=3, min_face=48, min_family=1, templates=fixture)
    rule = dict(zip(drops[drops.frame == ""].file, drops[drops.frame == ""].rule))
    assert rule == {
        "api_qwen3_t2i-1.webp": "not_photoreal",
        "image_qwen_image_2_1_image_edit-1.webp": "input_of_two_file_workflow",
        "api_kling4_i2v-1.webp": "input_of_conditioned_workflow",
    }
    kept = pd.DataFrame([{k: v for k, v in f.items() if k != "image"} for f in found])
    assert set(kept.file) <= {
        "api_bfl_flux3_t2i-1.webp",
        "image_qwen_image_2_1_image_edit-2.webp",
        "video_wan2_2_14B_t2v-1.webp",
    }
    assert "api_bfl_flux3_t2i-1.webp" in set(kept.file)
    assert (
        kept.package.map(
            lambda p: (
                re.fullmatch(r"(comfyui-workflow-templates-media-[a-z0-9-]+)==([\d.]+)", p)
                and PINNED[p.split("==")[0]] == p.split("==")[1]
            )
        )
    ).all()
    families = dict(zip(kept.file, kept.generator))
    assert families["api_bfl_flux3_t2i-1.webp"] == "diffusion-flux"
    assert kept.workflow.tolist() == [f.rsplit("-", 1)[0] for f in kept.file]
    wan = kept[kept.file == "video_wan2_2_14B_t2v-1.webp"]
    assert len(wan) == 0 or wan.frame.is_unique and (wan.source == "comfyui-video_wan2_2_14B_t2v-1").all()
    assert all(isinstance(f["image"], Image.Image) and f["image"].mode == "RGB" for f in found)


def test_frames_are_evenly_spaced_and_decoded_safely(templates, tmp_path):
    path = templates[templates.file == "video_wan2_2_14B_t2v-1.webp"].path.iloc[0]
    frames = template_frames(path, 4)
    with Image.open(path) as im:
        total = im.n_frames
    assert [i for i, _ in frames] == sorted(set(np.linspace(0, total - 1, 4).round().astype(int)))
    bad = tmp_path / "broken-1.webp"
    bad.write_bytes(open(path, "rb").read()[:200])
    with pytest.raises(ValueError):
        template_frames(bad, 2)


def test_the_photoreal_list_must_give_reasons(tmp_path):
    bad = tmp_path / "list.csv"
    bad.write_text("file,reason\na.webp,\n")
    with pytest.raises(Exception, match="reason on every row"):
        not_photoreal(bad)


def test_webp_round_trip_and_the_audit_feature():
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((96, 96), Image.Resampling.BILINEAR)
    once, again = webp_round_trip(image, 80), webp_round_trip(image, 80)
    assert np.array_equal(np.asarray(once), np.asarray(again)) and not np.array_equal(
        np.asarray(once), np.asarray(image)
    )
    assert once.size == image.size and once.mode == "RGB"
    rows = pd.DataFrame(
        dict(source_format=["webp", "jpeg", "jpeg", "reconstruction"], webp_quality=[0, 85, 0, 90], path=["a.jpg"] * 4)
    )
    flags = [webp_history(r) for r in rows.itertuples()]
    assert flags == [1, 1, 0, 1]
    # matched: a WebP history on both sides in equal shares is no shortcut; on one side only it is
    assert shortcut_audit(pd.DataFrame(dict(webp_history=[1, 0, 1, 0])), [1, 1, 0, 0])["webp_history"] == 0.5
    assert shortcut_audit(pd.DataFrame(dict(webp_history=[1, 1, 0, 0])), [1, 1, 0, 0])["webp_history"] == 1.0
