"""Scale benchmark: the whole pipeline (`dvc repro`, stage by stage) on synthetic datasets in the layout of
"140k Real and Fake Faces" at N = 2k, 10k and 40k images; wall time and peak RSS of every stage.

    python -m benchmarks.scale_bench                        # N = 2000 10000 40000 (about 2 h 15 min here)
    python -m benchmarks.scale_bench --sizes 2000 10000     # a subset; results are merged into scale.json

Data: every synthetic image is one of the demo corpus's raw images (`data/raw`, made by `make pipeline`) under a
seeded random crop, flip and brightness change, saved as a 256 px JPEG (quality 85-95), as 140k's files are;
half real, half fake, split 70/15/15 like 140k. Content does not matter for cost, only count and size.

Params: params.yaml as it is, with the real-data ingest (`dataset: 140k`, `sample_size: 0`), except
`train.epochs: 1`, `train.fine_tune_epochs: 1` (the real run trains up to 15 + 15 epochs with early stopping: its
time is extrapolated from the measured epochs), `evaluate.robustness_max_images: 300` (the default 1000 adds a
constant ~9 minutes here) and `register.min_auc: 0`. Each stage runs as `dvc repro -s STAGE`
in a fresh copy of the project; peak RSS is the largest process of the stage (the notebook's kernel), from
getrusage(RUSAGE_CHILDREN) of a wrapper process per stage.

Writes reports/benchmarks/scale.json and reports/benchmarks/scale.png.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["ingest", "preprocess", "features", "train", "evaluate", "register"]
ROBUSTNESS_N = 300     # test images in the perturbation sweep (a fixed-size sample: 9 face chains each)
SPLITS = {"train": 0.70, "valid": 0.15, "test": 0.15}
# runs one command, then prints its wall time and the peak RSS (KiB) of its largest descendant
MEASURE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(json.dumps(dict(rc=rc, seconds=time.perf_counter() - t, "
           "peak_rss_kib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)))")


def synthetic_140k(dest: Path, n: int, seed: int = 0) -> Path:
    "n images (half real, half fake) in <dest>/real_vs_fake/real-vs-fake/{train,valid,test}/{real,fake}/."
    import numpy as np
    import pandas as pd
    from PIL import Image, ImageOps
    manifest = pd.read_csv(ROOT / "data" / "raw" / "manifest.csv", keep_default_na=False)
    if manifest.empty:
        sys.exit("data/raw is empty: run `make pipeline` first (the demo corpus is the synthetic data's source).")
    rng = np.random.default_rng(seed)
    base = dest / "real_vs_fake" / "real-vs-fake"
    for label in ("real", "fake"):
        sources = [ROOT / "data" / "raw" / p for p in manifest[manifest.label == label].path]
        count = n // 2
        bounds = np.cumsum([0] + [round(count * f) for f in SPLITS.values()])
        bounds[-1] = count
        for k in range(count):
            split = list(SPLITS)[int(np.searchsorted(bounds, k, side="right")) - 1]
            image = Image.open(sources[rng.integers(len(sources))]).convert("RGB")
            w, h = image.size
            side = int(min(w, h) * rng.uniform(0.8, 1.0))
            x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
            image = image.crop((x, y, x + side, y + side)).resize((256, 256), Image.Resampling.BILINEAR)
            image = ImageOps.mirror(image) if rng.random() < 0.5 else image
            image = image.point(lambda v, g=rng.uniform(0.9, 1.1): min(255, int(v * g)))
            out = base / split / label / f"{label}{k:06d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            image.save(out, "JPEG", quality=int(rng.integers(85, 96)))
    return dest


def project_copy(dest: Path) -> Path:
    """The tests' copy of the working tree (tracked files, no pipeline outputs, a fresh git repo), and the converted
    backbone."""
    from tests.helpers import copy_project  # run as `python -m benchmarks.scale_bench` from the project root

    copy_project(dest)
    if (ROOT / "models" / "backbones").is_dir():  # made once by the train stage (torch); not what is measured
        shutil.copytree(ROOT / "models" / "backbones", dest / "models" / "backbones")
    return dest


def fabricate_processed(project: Path, data: Path) -> None:
    """`--from-crops`: data/raw and data/processed as ingest and preprocess would leave them, with the crops cut
    without face detection (a centred square, same size, JPEG quality and manifest columns), so that the later
    stages can be measured at an N whose MTCNN pass would not fit the time at hand. processing.json is the real
    face chain's: evaluate's sweep still runs MTCNN."""
    import hashlib
    import pandas as pd
    import yaml
    from deepguard.images import load_image
    from deepguard.faces import chain_params, face_chain

    settings = yaml.safe_load((project / "params.yaml").read_text())["preprocess"]
    params = chain_params(
        {
            k: settings[k]
            for k in ("image_size", "margin", "jpeg_quality", "detect_max_side", "min_confidence", "grayscale")
        }
    )
    raw, processed = project / "data" / "raw", project / "data" / "processed"
    rows = []
    for file in sorted((data / "real_vs_fake" / "real-vs-fake").rglob("*.jpg")):
        split = {"train": "train", "valid": "val", "test": "test"}[file.parent.parent.name]
        label = file.parent.name
        generator = "stylegan" if label == "fake" else "ffhq"
        raw_rel = f"images/{label}/{generator}/{file.name}"
        (raw / raw_rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(file, raw / raw_rel)
        crop = face_chain(load_image(file), {**params, "detect_faces": False})
        rel = f"images/{split}/{label}/{file.stem}.jpg"
        (processed / rel).parent.mkdir(parents=True, exist_ok=True)
        (processed / rel).write_bytes(crop.jpeg)
        rows.append(
            dict(
                path=rel, label=label, y=int(label == "fake"), split=split, source=f"140k:{file.stem}",
                generator=generator, license="synthetic", raw_path=raw_rel,
                raw_sha256=hashlib.sha256(file.read_bytes()).hexdigest(), face_found=False, face_size=crop.native_size,
                framing=0.0,
            )
        )
    pd.DataFrame(rows).to_csv(processed / "manifest.csv", index=False)
    (processed / "processing.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    (processed / "quarantine.csv").write_text("path,reason,message\n")


def run_pipeline(project: Path, data: Path, log, on_stage=lambda stages: None, stages=STAGES) -> dict:
    "Each stage through `dvc repro -s`, measured; {stage: {seconds, peak_rss_mib}}; `on_stage` sees each result."
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"].update(dataset="140k", data_path=str(data), sample_size=0)
    params["train"].update(epochs=1, fine_tune_epochs=1)
    params["evaluate"].update(robustness_max_images=ROBUSTNESS_N)
    params["register"].update(min_auc=0.0, model_name="deepguard-detector-scale")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg",
        "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONHASHSEED": "0", "DVC_NO_ANALYTICS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }
    env.pop("DEEPGUARD_ROOT", None)
    out = {}
    for stage in stages:
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, "dvc", "repro", "-s", stage], cwd=project, env=env, stdout=subprocess.PIPE,
            stderr=log, text=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["rc"] != 0:
            sys.exit(f"stage {stage} failed; see {log.name}")
        out[stage] = dict(seconds=round(result["seconds"], 1), peak_rss_mib=round(result["peak_rss_kib"] / 1024))
        print(f"  {stage:<10} {out[stage]['seconds']:>8.1f} s  {out[stage]['peak_rss_mib']:>6} MiB", flush=True)
        on_stage(out)
    manifest = project / "data" / "processed" / "manifest.csv"
    import pandas as pd

    splits = pd.read_csv(manifest).split.value_counts().to_dict()
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    return dict(
        stages=out,
        processed_per_split={k: int(v) for k, v in splits.items()},
        robustness_n=metrics.get("robustness_n"),
        epochs_trained=json.loads((project / "models" / "detector.json").read_text())["epochs_trained"],
    )


def extrapolate(results: dict, gpu_speedup: float, n_target: int = 140_000) -> dict:
    """Linear extrapolation from the largest measured N to n_target: seconds per image per stage; train per epoch
    times 15 + 15 epochs (an upper bound). The GPU figure is an assumption, not a measurement."""
    largest = results[str(max(map(int, results)))]
    n = largest["n"]
    full = {s: v["seconds"] / n * n_target for s, v in largest["stages"].items()}
    full["train"] = largest["stages"]["train"]["seconds"] / max(largest["epochs_trained"], 1) * 30 * n_target / n
    gpu = {s: (v / gpu_speedup if s == "train" else v) for s, v in full.items()}
    return dict(
        n=n_target,
        from_n=n,
        hours_two_cores=round(sum(full.values()) / 3600, 1),
        hours_per_stage_two_cores={s: round(v / 3600, 2) for s, v in full.items()},
        hours_gpu_machine_assumed=round(sum(gpu.values()) / 3600, 1),
        gpu_assumption=f"train {gpu_speedup:g}x faster than these 2 cores; every other stage as here "
        "(MTCNN face chain, spectra, I/O run on the CPU, one process)",
        note="extrapolated linearly from the largest measured N, not measured; train assumes all 15 + 15 "
        "epochs (early stopping usually ends sooner); evaluate's fixed-size sweep is scaled too (an "
        "over-estimate)",
    )


def plot(results: dict, path: Path, from_crops: dict | None = None):
    "Full runs as filled points joined by lines; `--from-crops` runs (later stages only) as open points."
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(map(int, results))
    partial = sorted((from_crops or {}).values(), key=lambda r: r["n"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        (line,) = axes[0].plot(
            sizes, [results[str(n)]["stages"][stage]["seconds"] / n * 1000 for n in sizes], "o-", label=stage
        )
        axes[1].plot(sizes, [results[str(n)]["stages"][stage]["peak_rss_mib"] for n in sizes], "o-", label=stage)
        crops = [r for r in partial if stage in r["stages"]]
        for ax, value in (
            (axes[0], lambda r: r["stages"][stage]["seconds"] / r["n"] * 1000),
            (axes[1], lambda r: r["stages"][stage]["peak_rss_mib"]),
        ):
            ax.plot([r["n"] for r in crops], [value(r) for r in crops], "o", mfc="none", color=line.get_color())
    ticks = sorted(set(sizes) | {r["n"] for r in partial})
    axes[0].set_ylabel("ms per image")
    axes[1].set_ylabel("peak RSS (MiB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("images (N); open points: from crops, later stages only")
        ax.set_xticks(ticks, [f"{n // 1000}k" for n in ticks])
        ax.minorticks_off()
    axes[1].legend(fontsize=8)
    fig.suptitle("dvc repro on synthetic 140k-layout data, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[2000, 10000, 40000])
    parser.add_argument(
        "--workdir", default="/tmp/deepguard-scale", help="where the data and projects go (deleted after each N)"
    )
    parser.add_argument("--keep", action="store_true", help="keep each N's data and project")
    parser.add_argument(
        "--gpu-speedup",
        type=float,
        default=20.0,
        help="assumed training speed-up of a GPU machine over these 2 cores (for the extrapolation only)",
    )
    parser.add_argument(
        "--from-crops",
        action="store_true",
        help="skip ingest and preprocess: crops cut without face detection, then features to register",
    )
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "scale.json"))
    args = parser.parse_args()
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    results = report.get("results", {})
    incomplete = report.get("incomplete", {})
    partial = report.get("from_crops", {})

    def save_incomplete(n, stages):  # an N cut short still leaves the stages it measured, marked as such
        incomplete[str(n)] = dict(n=n, stages=dict(stages))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report, "incomplete": incomplete}, indent=2) + "\n")

    for n in args.sizes:
        work = Path(args.workdir) / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"N = {n}", flush=True)
        start = time.perf_counter()
        data = synthetic_140k(work / "data", n)
        print(f"  synthetic data: {time.perf_counter() - start:.0f} s (not part of the pipeline)", flush=True)
        project = project_copy(work / "project")
        stages, key = STAGES, str(n)
        if args.from_crops:
            start = time.perf_counter()
            fabricate_processed(project, data)
            print(
                f"  crops without face detection: {time.perf_counter() - start:.0f} s (not measured as a stage)",
                flush=True,
            )
            stages, key = STAGES[2:], f"{n}-from-crops"
        with open(work / "repro.log", "w") as log:
            record = run_pipeline(project, data, log, lambda done: save_incomplete(key, done), stages)
        incomplete.pop(key, None)
        if args.from_crops:
            partial[key] = dict(n=n, from_crops=True, **record)
            report["from_crops"] = partial
            out.write_text(json.dumps({**report, "incomplete": incomplete}, indent=2) + "\n")
            if results:
                plot(results, out.with_suffix(".png"), partial)
            if not args.keep:
                shutil.rmtree(work)
            continue
        results[key] = dict(n=n, **record)
        results[str(n)]["total_seconds"] = round(sum(s["seconds"] for s in results[str(n)]["stages"].values()), 1)
        if not args.keep:
            shutil.rmtree(work)
        sizes = sorted(map(int, results))
        ratios = {}
        if len(sizes) > 1:
            small, large = results[str(sizes[0])], results[str(sizes[-1])]
            ratios = {
                s: dict(
                    peak_rss=round(large["stages"][s]["peak_rss_mib"] / small["stages"][s]["peak_rss_mib"], 2),
                    time_per_image=round(
                        (large["stages"][s]["seconds"] / large["n"]) / (small["stages"][s]["seconds"] / small["n"]), 2
                    ),
                )
                for s in STAGES
            }
        report = dict(
            cpus=os.cpu_count(),
            machine=platform.machine(),
            python=platform.python_version(),
            params_changed={
                "ingest": {"dataset": "140k", "sample_size": 0}, "train": {"epochs": 1, "fine_tune_epochs": 1},
                "evaluate": {"robustness_max_images": ROBUSTNESS_N}, "register": {"min_auc": 0.0},
            },
            results=results, incomplete=incomplete, from_crops=partial, ratios_largest_over_smallest=ratios,
            extrapolation_140k=extrapolate(results, args.gpu_speedup),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        plot(results, out.with_suffix(".png"), partial)
    print(json.dumps(report.get("ratios_largest_over_smallest"), indent=1))
    print(json.dumps(report.get("extrapolation_140k"), indent=1))


if __name__ == "__main__":
    main()
