"""The face detector on this machine: the OpenVINO port (`deepguard.facedetect`, the default) against the `mtcnn`
package on TensorFlow (the reference, and the detector before face-chain v1 moved to OpenVINO), in the same run,
on the demo corpus's raw images (`data/raw`, made by `make pipeline`).

    python -m benchmarks.face_bench                 # every raw image; about 8 minutes here
    python -m benchmarks.face_bench --n 500         # a seeded sample

Per detector: face-found rate (the chain's rule: confidence >= 0.9), the crop box the chain cuts (identical to
the reference's or not), the IoU of the largest face box with the reference's, and the time per image of the
detection alone and of the whole face chain (decode excluded), one image at a time. Then the chain over the
whole sample as preprocess runs it (`deepguard.preprocess.chain_rows`): images/s with 1 and with 2 worker
processes, and whether the two give byte-identical crops.

Candidates (`--candidates blazeface`, on by default): MediaPipe's BlazeFace short- and full-range detectors, the
`.tflite` files of the `mediapipe==0.10.14` wheel (fetched with `pip download --no-deps` into
~/.cache/deepguard/wheels and read from the zip; mediapipe itself is never installed), run by OpenVINO's TFLite
reader with MediaPipe's anchors, letterbox and a 0.5 score threshold: face-found rate, IoU of their largest box
with MTCNN's, and time. Not adopted (see the README): their boxes differ from MTCNN's, so they would be a new
chain version with a retrained model, for a detector that is already fast enough.

Writes reports/benchmarks/face_chain.json.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]


def iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    union = aw * ah + bw * bh - w * h
    return w * h / union if union > 0 else 0.0


BLAZEFACE = {"short_range": ("face_detection_short_range.tflite", 128, [(8, 2), (16, 6)]),
             "full_range": ("face_detection_full_range_sparse.tflite", 192, [(4, 1)])}


def blazeface_models():
    "{name: (compiled OpenVINO model, input size, anchors)} from the mediapipe wheel's files."
    import zipfile
    import numpy as np
    import openvino as ov
    cache = Path.home() / ".cache" / "deepguard" / "wheels"
    wheels = sorted(cache.glob("mediapipe-0.10.14-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "mediapipe==0.10.14", "-d",
                        str(cache)], check=True)
        wheels = sorted(cache.glob("mediapipe-0.10.14-*.whl"))
    core, out = ov.Core(), {}
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name, (file, size, layers) in BLAZEFACE.items():
            path = cache / file
            path.write_bytes(wheel.read(f"mediapipe/modules/face_detection/{file}"))
            anchors = []
            for stride, per_cell in layers:
                grid = size // stride
                ys, xs = np.mgrid[:grid, :grid]
                centres = np.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], -1).reshape(-1, 2)
                anchors.append(np.repeat(centres, per_cell, axis=0))
            out[name] = (core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
                         size, np.concatenate(anchors))
    return out


def blazeface_largest(model, size, anchors, image, min_score=0.5):
    "(x, y, w, h) of the largest face BlazeFace finds in a PIL image (letterboxed to its input), or None."
    import numpy as np
    from PIL import Image
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (size, size))
    left, top = (size - w) // 2, (size - h) // 2
    canvas.paste(image.resize((w, h), Image.Resampling.BILINEAR), (left, top))
    x = (np.asarray(canvas, np.float32) / 127.5 - 1.0)[None]
    reg, cls = model(x).values()
    score = 1 / (1 + np.exp(-np.clip(cls[0, :, 0], -100, 100)))
    keep = score >= min_score
    if not keep.any():
        return None
    r, a = reg[0, keep], anchors[keep]
    cx, cy = a[:, 0] + r[:, 0] / size, a[:, 1] + r[:, 1] / size
    bw, bh = r[:, 2] / size, r[:, 3] / size
    k = int(np.argmax(bw * bh))
    x0, y0 = (cx[k] - bw[k] / 2) * size - left, (cy[k] - bh[k] / 2) * size - top
    return (x0 / scale, y0 / scale, bw[k] * size / scale, bh[k] * size / scale)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=0, help="images (0: all of data/raw)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", default="blazeface", help="'blazeface' or '' (none)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "face_chain.json"))
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    from deepguard.images import load_image
    from deepguard.faces import chain_params, detect_face, face_chain, face_detector, square_box
    from deepguard.preprocess import chain_rows
    manifest = pd.read_csv(ROOT / "data" / "raw" / "manifest.csv", keep_default_na=False)
    if args.n:
        manifest = manifest.sample(n=min(args.n, len(manifest)), random_state=args.seed).sort_index()
    params = chain_params()
    images = [load_image(ROOT / "data" / "raw" / p) for p in manifest.path]
    detectors = {"openvino": face_detector("openvino"), "tensorflow": face_detector("tensorflow")}
    for d in detectors.values():                                   # warm-up: graphs built, first calls traced
        detect_face(images[0], detector=d)
    found, seconds, chain_seconds = {}, {}, {}
    for name, d in detectors.items():
        found[name], seconds[name], chain_seconds[name] = [], [], []
        for image in images:
            t = time.perf_counter(); box = detect_face(image, params["detect_max_side"], params["min_confidence"], d)
            seconds[name].append(time.perf_counter() - t); found[name].append(box)
            t = time.perf_counter(); face_chain(image, params, d); chain_seconds[name].append(time.perf_counter() - t)
    ref, ov = found["tensorflow"], found["openvino"]
    crops = [
        (square_box(a, im.width, im.height, params["margin"]), square_box(b, im.width, im.height, params["margin"]))
        for a, b, im in zip(ov, ref, images)
    ]
    both = [(a, b) for a, b in zip(ov, ref) if a is not None and b is not None]
    per = lambda xs: {"mean_ms": round(1000 * float(np.mean(xs)), 2), "p50_ms": round(1000 * float(np.median(xs)), 2)}

    candidates = {}
    if "blazeface" in args.candidates:
        for name, (model, size, anchors) in blazeface_models().items():
            blaze_boxes, blaze_s = [], []
            blazeface_largest(model, size, anchors, images[0])
            for image in images:
                t = time.perf_counter()
                blaze_boxes.append(blazeface_largest(model, size, anchors, image))
                blaze_s.append(time.perf_counter() - t)
            pairs = [(a, b) for a, b in zip(blaze_boxes, ref) if a is not None and b is not None]
            candidates[f"blazeface_{name}"] = {
                "face_found_rate": round(float(np.mean([b is not None for b in blaze_boxes])), 4),
                "box_iou_with_mtcnn": {
                    "mean": round(float(np.mean([iou(a, b) for a, b in pairs])), 4) if pairs else None,
                    "median": round(float(np.median([iou(a, b) for a, b in pairs])), 4) if pairs else None,
                    "faces_in_both": len(pairs),
                },
                "detect_per_image": per(blaze_s),
            }

    rows = manifest.to_dict("records")
    raw = ROOT / "data" / "raw"
    runs = {}
    for workers in (1, 2):
        t = time.perf_counter()
        out = list(chain_rows(raw, rows, params, workers))
        runs[workers] = (time.perf_counter() - t, out)
    same_bytes = all(a.get("jpeg") == b.get("jpeg") for a, b in zip(runs[1][1], runs[2][1]))
    from importlib.metadata import version

    result = {
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "openvino": version("openvino"),
            "tensorflow": version("tensorflow-cpu"), "mtcnn": version("mtcnn"),
        },
        "images": len(images),
        "sample": "all of data/raw" if not args.n else f"{args.n} (seed {args.seed})",
        "face_found_rate": {k: round(float(np.mean([b is not None for b in v])), 4) for k, v in found.items()},
        "same_face_found": int(sum((a is None) == (b is None) for a, b in zip(ov, ref))),
        "same_crop_box": int(sum(a == b for a, b in crops)),
        "box_iou_with_tensorflow": {
            "mean": round(float(np.mean([iou(a, b) for a, b in both])), 6) if both else None,
            "min": round(float(np.min([iou(a, b) for a, b in both])), 6) if both else None,
            "faces_in_both": len(both),
        },
        "detect_per_image": {k: per(v) for k, v in seconds.items()},
        "face_chain_per_image": {k: per(v) for k, v in chain_seconds.items()},
        "speedup_openvino": {
            "detect_mean": round(float(np.mean(seconds["tensorflow"]) / np.mean(seconds["openvino"])), 2),
            "face_chain_mean": round(
                float(np.mean(chain_seconds["tensorflow"]) / np.mean(chain_seconds["openvino"])), 2
            ),
        },
        "preprocess_chain_rows_images_per_s": {f"{w}_workers": round(len(rows) / runs[w][0], 1) for w in runs},
        "preprocess_2_workers_byte_identical_to_1": same_bytes,
        "candidates": candidates,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
