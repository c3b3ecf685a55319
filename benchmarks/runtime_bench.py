"""The detector's CNN on this CPU: the compiled TensorFlow graph `deepguard.predict` uses against OpenVINO.

    python benchmarks/runtime_bench.py              # the pipeline's models/detector.keras; writes reports/benchmarks/runtime.json

Both runtimes get the same face-chain crops of the demo test images (float32 RGB, batch 1 and batch 32) and must
agree within 1e-4 on the calibrated P(fake) to be a candidate. The conversion goes through a SavedModel export
(`keras.Model.export`) and `openvino.convert_model`; its time is reported too (it would be paid per load, or once
per model if the IR were shipped). Per-image cost of the rest of the chain (MTCNN, crop, JPEG) is measured
alongside, because that is what the model call is compared with in a served answer. Figures, not assertions.
"""
import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def best_of(fn, repeats: int, inner: int) -> float:
    "Seconds per call: the best of `repeats` means over `inner` calls, after one warm-up call."
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "detector.keras"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "runtime.json"))
    args = parser.parse_args()

    import openvino as ov
    import tensorflow as tf
    from deepguard.core import load_image
    from deepguard.faces import prepare_faces
    from deepguard.predict import load_detector
    detector = load_detector(args.model)
    rows = [r for r in csv.DictReader(open(ROOT / "data" / "raw" / "manifest.csv")) if r["split"] == "test"][:args.images]
    images = [load_image(ROOT / "data" / "raw" / r["path"]) for r in rows]
    t = time.perf_counter()
    x, _ = prepare_faces(images, detector.metadata["processing"])
    chain_s = (time.perf_counter() - t) / len(images)
    x = x.astype(np.float32)

    slope, centre = float(detector.calibration["slope"]), float(detector.calibration["centre_logit"])
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        detector.model.export(tmp + "/saved", format="tf_saved_model", verbose=False)
        ov_model = ov.convert_model(tmp + "/saved")
        compiled = ov.Core().compile_model(ov_model, "CPU")
        convert_s = time.perf_counter() - t
    def ov_probs(batch):
        logits = next(iter(compiled(batch).values()))
        return 1 / (1 + np.exp(-slope * (logits.astype(np.float64) - centre)))
    tf_p = detector.predict_fn(x).numpy().ravel().astype(np.float64)
    ov_p = ov_probs(x).ravel()
    diff = float(np.max(np.abs(tf_p - ov_p)))

    x1, x32 = x[:1], x[:32]
    timing = {
        "tensorflow_tf_function": {"batch1_ms": best_of(lambda: detector.predict_fn(x1), 5, 20) * 1000,
                                   "batch32_images_per_s": 32 / best_of(lambda: detector.predict_fn(x32), 5, 3)},
        "openvino_cpu": {"batch1_ms": best_of(lambda: compiled(x1), 5, 20) * 1000,
                         "batch32_images_per_s": 32 / best_of(lambda: compiled(x32), 5, 3)},
    }
    timing = {k: {m: round(v, 2) for m, v in d.items()} for k, d in timing.items()}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__,
                    "openvino": ov.__version__.split("-")[0]},
        "model": {"backbone": detector.metadata.get("backbone"), "input_size": detector.metadata["input_size"],
                  "version": detector.version},
        "images": len(images), "max_abs_difference_p_fake": diff, "agree_within_1e-4": diff <= 1e-4,
        "runtimes": timing, "openvino_conversion_s": round(convert_s, 2),
        "face_chain_ms_per_image": round(chain_s * 1000, 1),
        "model_share_of_single_image_ms": round(timing["tensorflow_tf_function"]["batch1_ms"] /
                                                (timing["tensorflow_tf_function"]["batch1_ms"] + chain_s * 1000), 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
