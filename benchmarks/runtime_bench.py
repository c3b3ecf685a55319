"""The detector's CNN on this CPU: the compiled TensorFlow graph `deepguard.predict` uses against OpenVINO.

    python -m benchmarks.runtime_bench    # the pipeline's models/detector.keras; writes reports/benchmarks/runtime.json

Both runtimes get the same face-chain crops of the demo test images (float32 RGB, batch 1 and batch 32) and must
agree within 1e-4 on the calibrated P(fake). The conversion is `deepguard.predict.export_openvino` (the traced
graph, model + calibration, through `openvino.convert_model`, written as IR as the register stage writes it); its
time and the time of a load of the IR (what a server does at start) are reported, and OpenVINO's default
precision on this CPU is measured beside f32. Per-image cost of the rest of the chain (MTCNN, crop, JPEG) is measured
alongside, because that is what the model call is compared with in a served answer. Figures, not assertions.
"""

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np


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
    from deepguard.images import load_image
    from deepguard.faces import prepare_faces
    from deepguard import predict

    model_path = Path(args.model)
    files = (model_path, model_path.with_suffix(".json"), model_path.parent / "threshold.json", model_path.name)
    tf_detector = predict.detector_from_files(*files, runtime="tensorflow")
    rows = [r for r in csv.DictReader(open(ROOT / "data" / "raw" / "manifest.csv")) if r["split"] == "test"][
        : args.images
    ]
    images = [load_image(ROOT / "data" / "raw" / r["path"]) for r in rows]
    t = time.perf_counter()
    x, _ = prepare_faces(images, tf_detector.metadata["processing"])
    chain_s = (time.perf_counter() - t) / len(images)
    x = x.astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:  # convert (the register stage's step), then load the IR (a server's)
        xml = Path(tmp) / "detector.xml"
        t = time.perf_counter()
        predict.export_openvino(model_path, out=xml)
        convert_s = time.perf_counter() - t
        key = predict.graph_key(model_path, tf_detector.metadata["input_size"], tf_detector.calibration)
        t = time.perf_counter()
        ov_fn = predict.openvino_predict(xml, key)
        cached_s = time.perf_counter() - t
        # what OpenVINO would do without the explicit f32 hint (bf16 on CPUs with AMX / AVX-512 BF16)
        core = ov.Core()
        default = core.compile_model(core.read_model(xml), "CPU")
        default_precision = (
            str(default.get_property("INFERENCE_PRECISION_HINT")).split("'")[-2]
            if "'" in str(default.get_property("INFERENCE_PRECISION_HINT"))
            else str(default.get_property("INFERENCE_PRECISION_HINT"))
        )
    ov_default = predict.OpenVINOPredict(default)
    tf_p = tf_detector.probabilities(x)
    diff = float(np.max(np.abs(tf_p - ov_fn(x).ravel())))
    diff_default = float(np.max(np.abs(tf_p - ov_default(x).ravel())))

    x1, x32 = x[:1], x[:32]
    timing = {
        "tensorflow_tf_function": {
            "batch1_ms": best_of(lambda: tf_detector.predict_fn(x1), 5, 20) * 1000,
            "batch32_images_per_s": 32 / best_of(lambda: tf_detector.predict_fn(x32), 5, 3),
        },
        "openvino_cpu_f32": {
            "batch1_ms": best_of(lambda: ov_fn(x1), 5, 20) * 1000,
            "batch32_images_per_s": 32 / best_of(lambda: ov_fn(x32), 5, 3),
        },
        f"openvino_cpu_default_{default_precision}": {
            "batch1_ms": best_of(lambda: ov_default(x1), 5, 20) * 1000,
            "batch32_images_per_s": 32 / best_of(lambda: ov_default(x32), 5, 3),
        },
    }
    timing = {k: {m: round(v, 2) for m, v in d.items()} for k, d in timing.items()}
    tf1, ov1 = timing["tensorflow_tf_function"]["batch1_ms"], timing["openvino_cpu_f32"]["batch1_ms"]
    result = {
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__,
            "openvino": ov.__version__.split("-")[0],
        },
        "model": {
            "backbone": tf_detector.metadata.get("backbone"),
            "input_size": tf_detector.metadata["input_size"],
            "version": tf_detector.version,
        },
        "images": len(images),
        "max_abs_difference_p_fake": {"openvino_f32": diff, f"openvino_default_{default_precision}": diff_default},
        "f32_agrees_within_1e-4": diff <= 1e-4,
        "runtimes": timing,
        "speedup_openvino_f32": {
            "batch1": round(tf1 / ov1, 2),
            "batch32": round(
                timing["openvino_cpu_f32"]["batch32_images_per_s"]
                / timing["tensorflow_tf_function"]["batch32_images_per_s"],
                2,
            ),
        },
        "openvino_export_s": round(convert_s, 2),
        "openvino_load_ir_and_compile_s": round(cached_s, 2),
        "face_chain_ms_per_image": round(chain_s * 1000, 1),
        "model_share_of_single_image": {
            "tensorflow": round(tf1 / (tf1 + chain_s * 1000), 3),
            "openvino_f32": round(ov1 / (ov1 + chain_s * 1000), 3),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
