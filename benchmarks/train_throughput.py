"""Training throughput on this machine: images/s per backbone and input size, for the frozen-backbone phase and
for fine-tuning (all backbone layers trainable). Random data; speed does not depend on the weights, so Xception
is built without its ImageNet download.

    python -m benchmarks.train_throughput                       # all backbones at 128 and 224 px
    python -m benchmarks.train_throughput --backbones efficientnet_lite0 --sizes 128

Writes reports/benchmarks/train_throughput.json.
"""
import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]


def build(backbone, size):
    import keras
    from keras import layers
    from deepguard.model import build_model
    if backbone == "xception":   # same graph as build_model's, without fetching weights
        base = keras.applications.Xception(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg",
                                           name="backbone")
        inputs = keras.Input((size, size, 3))
        x = base(layers.Rescaling(1 / 127.5, offset=-1.0)(inputs), training=False)
        return keras.Model(inputs, layers.Dense(1, name="logit")(layers.Dropout(0.2)(x)))
    return build_model(size, "none" if backbone == "efficientnet_lite0" else backbone)


def images_per_second(model, size, batch, steps, phase):
    import numpy as np
    from deepguard.train import compile_model
    if any(layer.name == "backbone" for layer in model.layers):
        model.get_layer("backbone").trainable = phase == "fine_tune"
    compile_model(model, 1e-4)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 2, (batch, 1)).astype("float32")
    for _ in range(2):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return round(batch * steps / (time.perf_counter() - start), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "xception", "simple_cnn"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "train_throughput.json"))
    args = parser.parse_args()
    import tensorflow as tf
    results = {"cpus": os.cpu_count(), "tensorflow": tf.__version__, "batch": args.batch, "images_per_s": {}}
    for backbone in args.backbones:
        for size in args.sizes:
            row = {}
            for phase in ("frozen", "fine_tune") if backbone != "simple_cnn" else ("end_to_end",):
                row[phase] = images_per_second(build(backbone, size), size, args.batch, args.steps, phase)
            results["images_per_s"][f"{backbone}@{size}"] = row
            print(backbone, size, row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
