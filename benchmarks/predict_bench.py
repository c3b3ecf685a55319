"""Serving speed of `classify` on this machine: warm single-image latency against the bare model call, batch
throughput, and cold start. Figures, not assertions: run it, read it, copy it into the README.

    python benchmarks/predict_bench.py                      # the pipeline's models/detector.keras
    python benchmarks/predict_bench.py --backbone efficientnet_lite0 --input-size 128   # an architecture, untrained

Writes reports/benchmarks/predict.json.
"""
import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def percentiles(samples_s):
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def timed(fn, n, warmup=10):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out


def untrained_detector(backbone, input_size, folder):
    "An untrained model of an architecture, saved the way the train stage saves one (speed does not depend on weights)."
    from deepguard.model import build_model
    from deepguard.core import write_json
    path = Path(folder) / "detector.keras"
    build_model(input_size, backbone=backbone).save(path)
    write_json(path.with_suffix(".json"), dict(input_size=input_size, backbone=backbone, mlflow_run_id="benchmark",
                                               processing=dict(image_size=input_size)))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "detector.keras"))
    parser.add_argument("--backbone", default=None, help="benchmark an untrained model of this backbone instead")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--n", type=int, default=200, help="timed single-image calls")
    parser.add_argument("--batch", type=int, default=64, help="images in the batch (classify sends at most deepguard.predict.BATCH = 64 per model call)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "predict.json"))
    args = parser.parse_args()

    import tensorflow as tf
    from deepguard.predict import classify, load_detector
    from deepguard.faces import prepare_faces
    tmp = tempfile.TemporaryDirectory()
    model_path = untrained_detector(args.backbone, args.input_size, tmp.name) if args.backbone else Path(args.model)
    detector = load_detector(str(model_path))
    size = detector.metadata["input_size"]
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO(); photo.save(buf, "JPEG", quality=90); jpeg = buf.getvalue()
    x1 = prepare_faces([photo], detector.metadata["processing"])[0]

    bare = timed(lambda: detector.model(x1, training=False), args.n)
    graph = timed(lambda: detector.predict_fn(x1), args.n)
    predict = timed(lambda: detector.model.predict(x1, verbose=0), max(20, args.n // 5))
    full = timed(lambda: classify(jpeg, model=model_path), args.n)
    # batch throughput: classify on a list of decoded images (face chain incl. MTCNN + model), its two parts alone
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(args.batch)]
    xb = prepare_faces(images, detector.metadata["processing"])[0]
    t_prep = min(timed(lambda: prepare_faces(images, detector.metadata["processing"]), 5, warmup=1))
    t_cls = min(timed(lambda: classify(images, model=model_path), 5, warmup=1))
    t_model = min(timed(lambda: detector.predict_fn(xb), 5, warmup=1))

    cold_script = (
        "import time; t0 = time.perf_counter(); from deepguard.predict import classify, load_detector, resolve_model; "
        "t1 = time.perf_counter(); import sys; d = load_detector(resolve_model(sys.argv[1])); t2 = time.perf_counter(); "
        "classify(sys.argv[2], model=sys.argv[1]); t3 = time.perf_counter(); "
        "print(t1 - t0, t2 - t1, t3 - t2)")
    (Path(tmp.name) / "x.jpg").write_bytes(jpeg)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cold = subprocess.run([sys.executable, "-c", cold_script, str(model_path), str(Path(tmp.name) / "x.jpg")],
                          capture_output=True, text=True, env=env, check=True).stdout.split()
    imp, load, first = map(float, cold)

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__},
        "model": {"path": (str(Path(model_path).resolve().relative_to(ROOT)) if Path(model_path).resolve().is_relative_to(ROOT)
                  else Path(model_path).name) if not args.backbone else f"untrained {args.backbone}",
                  "backbone": detector.metadata.get("backbone"), "input_size": size,
                  "parameters": int(detector.model.count_params())},
        "single_image": {"classify": percentiles(full), "bare_model_call": percentiles(bare),
                         "tf_function": percentiles(graph), "model_predict": percentiles(predict)},
        "classify_over_bare_p50": round(np.percentile(full, 50) / np.percentile(bare, 50), 3),
        "classify_over_tf_function_p50": round(np.percentile(full, 50) / np.percentile(graph, 50), 3),
        "batch": {"size": args.batch, "classify_images_per_s": round(args.batch / t_cls, 1),
                  "model_images_per_s": round(args.batch / t_model, 1),
                  "prepare_images_per_s": round(args.batch / t_prep, 1)},
        "cold_start_s": {"import": round(imp, 2), "load": round(load, 2), "first_answer": round(first, 2),
                         "total": round(imp + load + first, 2)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
