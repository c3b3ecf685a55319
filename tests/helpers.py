"""What the tests share, imported by name (`from tests.helpers import run`): the tiny project's parameters and its
copy, running commands and notebooks, servers on free loopback ports, and the sets of bad and odd image files. No
test module imports another; the benchmarks import this module too (`python -m benchmarks.NAME`)."""
import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A few dozen images, one epoch: enough to exercise every stage for real, small enough for CI.
TINY_PARAMS = {
    "ingest": dict(n_stylegan=8, n_dcgan=8, n_vae=4, n_celeba=16, n_olivetti=10, val_frac=0.25, test_frac=0.25,
                   n_diffusion=24, diffusion_frames=1, diffusion_min_family=2, decoder_steps=20,
                   decoder_designs="tconv-s4-plain,nearest-s8-kl", decoder_external="bilinear-s4-plain"),
    "preprocess": dict(image_size=64),
    "train": dict(epochs=1, fine_tune_epochs=1, batch_size=16),
    "register": dict(model_name="deepguard-detector-test", min_auc=0.0),
}


def run(cmd, cwd, check=True, env=None):
    "Run a command with the venv first on PATH; return the completed process (output captured)."
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg",
                "TF_CPP_MIN_LOG_LEVEL": "2"}
    full_env.pop("DEEPGUARD_ROOT", None)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.pop("MLFLOW_REGISTRY_URI", None)    # mlflow.set_registry_uri() in this process exports it
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def answers_ok(url: str) -> bool:
    "True when a GET of `url` answers 200 within 2 s (a server's readiness probe)."
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    "POST `body` (bytes as they are, anything else as JSON); (status, decoded JSON answer), errors included."
    import json
    import urllib.error
    import urllib.request
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background_server(cmd: list, cwd: Path, env: dict, log_path: Path, ready, seconds: float):
    "Start a server process, wait (bounded) until `ready()` is true, yield, then stop its whole process group."
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + seconds
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{cmd[0]} exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd[0]} not up after {seconds}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield proc
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def copy_project(dest: Path) -> Path:
    "The project's tracked and untracked-but-not-ignored files, as they are in the working tree, in a new git repo."
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], ROOT).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        generated = rel.startswith(("data/", "models/")) and not rel.startswith(
            ("data/regression/", "data/curation/", "data/sources/"))
        if src.is_file() and not generated and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "reports" / "nbs").mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], dest)
    run("git add -A && git -c user.email=t@t -c user.name=t commit -qm copy", dest)
    return dest


def set_params(project: Path, **sections) -> Path:
    "`project`'s params.yaml with TINY_PARAMS, then `sections` ({section: {key: value}}), laid over it."
    params = yaml.safe_load((project / "params.yaml").read_text())
    for overlay in (TINY_PARAMS, sections):
        for section, values in overlay.items():
            params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def papermill(notebook: str, out, cwd, **overrides):
    """Run a stage notebook as `dvc repro` does, with `overrides` for this run (`-y "overrides: {...}"`); the
    completed process, output captured, failures not raised (check `returncode`)."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}
    return run(
        [
            "papermill", "--no-progress-bar", "-k", "python3", notebook, str(out), "-p", "params_path", "params.yaml",
            "-y", json.dumps({"overrides": values}),
        ],
        cwd,
        check=False,
    )


MAX_BODY = 1_000_000  # the model server's body limit in tests (413 above it)
BODY_TIMEOUT = 3  # seconds before a stalled body gets 408


# Image files: good, odd-but-valid (each with the size it must decode to) and bad (each with the reason it must give).
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


# Bad files beyond the decoder matrix: with BAD_FILES, 12 kinds of bad file, each with the reason it must give.
GOOD_PNG = png_bytes(Image.new("RGB", (64, 64), (10, 200, 30)))
MORE_BAD_FILES = {
    "page.png": (b"<!doctype html><html><body>not an image</body></html>", "not_image"),
    "archive.jpg": (b"PK\x03\x04" + b"\x00" * 60, "not_image"),
    "truncated.png": (GOOD_PNG[: len(GOOD_PNG) - 40], "corrupt"), "header_only.jpg": (GOOD_JPEG[:300], "corrupt"),
    "small_15px.png": (png_bytes(Image.new("RGB", (15, 40))), "too_small"),
}
ALL_BAD_FILES = {**BAD_FILES, **MORE_BAD_FILES}
