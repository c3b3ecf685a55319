"""The model server under load on this machine, against in-process `classify` on the same images in the same run.

    make pipeline                                   # a registered champion and the demo images
    apt-get install wrk                             # the load generator (Debian's package)
    python -m benchmarks.serving_bench              # writes reports/benchmarks/serving.json

What it does, all on loopback, bounded in time:
1. in-process: `classify` one image at a time (p50 over the test images) and one list of `--batch` images
   (images/s), with the model loaded once, as a library user would;
2. starts `deepguard serve` on free ports and times process start -> first 200 answer (cold start);
3. wrk (`-t1 -c N -d D --latency`, a Lua script cycling through one request body per test image, one image per
   request) at 1, 8 and 32 concurrent connections: requests/s, p50/p95/p99, errors (sockets, timeouts, non-2xx);
4. the same 32-client load against two variants (one process, where /invocations goes through the adaptive
   batcher: with one and with two inference threads), so the defaults are chosen by measurement;
5. `--adversarial` seconds (default 30) of a hostile mix on the default server: 8 good clients, and one client
   each sending back to back a 36 MP image (the heaviest the limits accept), 64 real photos in one request, 2,000
   tiny rows, a pixel bomb spread over two rows, JSON nested 5,000 deep and a V2 body declaring 60 MB: statuses
   by kind against the documented ones, and the peak RSS against the Kubernetes memory limit.
The goals (issue 15) are ratios within this one run: single-client p50 <= 2x in-process classify p50, 32-client
throughput >= 0.8x in-process batch throughput, zero errors, cold start <= 3 s. Figures, not assertions.
"""
import argparse
import base64
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np

from deepguard.core import REGISTRY_MODEL

LUA = r"""
local bodies = {}
local i = 0
init = function(args)
  local f = io.open(args[1], "r")
  for line in f:lines() do bodies[#bodies + 1] = line end
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "/invocations", nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, '
    .. '"max_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_images(limit: int) -> list[Path]:
    "The raw test-split images of the demo corpus (real and fake, as acquired), at most `limit`, interleaved."
    rows = list(csv.DictReader(open(ROOT / "data" / "raw" / "manifest.csv")))
    by_label = {lab: [ROOT / "data" / "raw" / r["path"] for r in rows if r["split"] == "test" and r["label"] == lab]
                for lab in ("real", "fake")}
    mixed = [p for pair in zip(by_label["real"], by_label["fake"]) for p in pair]
    if not mixed:
        sys.exit("No test images in data/raw/manifest.csv: run `make pipeline` first.")
    return mixed[:limit]


def post(url: str, body: bytes, timeout: float = 60) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


class Server:
    """`deepguard serve` on free loopback ports; ready = process start to readiness, cold start = to the first 200
    answer."""

    def __init__(self, model: str, body: bytes, log: Path, extra=()):
        self.port = free_port()
        cmd = [
            str(Path(sys.executable).parent / "deepguard"), "serve", "--model", model, "--port", str(self.port),
            "--metrics-port", str(free_port()), "--grpc-port", str(free_port()), *extra,
        ]
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{self.port}/invocations"
        self.ready_s = None
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited ({self.proc.returncode}); see {log}")
            if time.perf_counter() - start > 300:
                self.stop()
                sys.exit(f"the server did not answer within 300 s; see {log}")
            try:
                if self.ready_s is None:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=5):
                        self.ready_s = time.perf_counter() - start
                if post(url, body) == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.cold_start_s = time.perf_counter() - start

    def rss_mib(self) -> float:
        "Resident memory of the server and its worker processes (MiB): what a container's memory limit must hold."

        def tree(pid):
            try:
                rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except (OSError, IndexError):
                return 0
            return rss + sum(tree(int(c)) for c in children)

        return tree(self.proc.pid) / 2**20

    def stop(self):
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)


VARIANTS = {
    "one_worker": ["--workers", "1"], "one_worker_two_threads": ["--workers", "1", "--threads", "2"],
    "one_process": ["--workers", "0"], "one_process_two_threads": ["--workers", "0", "--threads", "2"],
}


def wrk(port: int, clients: int, seconds: int, bodies: Path, script: Path, server=None) -> dict:
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.wait(0.5):
            peak[0] = max(peak[0], server.rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    if server is not None:
        sampler.start()
    cmd = [
        "wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--timeout", "60s", "--latency", "-s", str(script),
        f"http://127.0.0.1:{port}/invocations", "--", str(bodies),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    finally:
        stop.set()
    raw = json.loads(next(line for line in out.splitlines() if line.startswith("WRK_JSON "))[len("WRK_JSON ") :])
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": raw["requests"],
        "requests_per_s": round(raw["requests"] / (raw["duration_us"] / 1e6), 2),
        "p50_ms": round(raw["p50_us"] / 1000, 1), "p95_ms": round(raw["p95_us"] / 1000, 1),
        "p99_ms": round(raw["p99_us"] / 1000, 1), "max_ms": round(raw["max_us"] / 1000, 1), "errors": errors,
        "errors_by_kind": {k: raw[k] for k in ("connect", "read", "write", "status", "timeout")},
        **({"peak_rss_mib": round(peak[0])} if server is not None else {}),
    }


def adversarial_bodies(files: list[Path]) -> dict:
    "One request body of each hostile kind, and good single images; what each should be answered."
    import io
    from PIL import Image

    def encoded(image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kw)
        return base64.b64encode(buffer.getvalue()).decode()

    ramp = np.linspace(0, 255, 6000, dtype=np.uint8)
    big = Image.fromarray(
        np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, :] // 2 + ramp[:, None] // 2), -1)
    )
    tiny = encoded(Image.new("RGB", (16, 16), (90, 80, 70)), "PNG")
    bomb = encoded(Image.new("RGB", (6000, 6000), (120, 100, 90)), "PNG")
    photo = [base64.b64encode(f.read_bytes()).decode() for f in files]
    inv = lambda rows: json.dumps({"inputs": {"image": rows}}).encode()
    return {
        "good": (200, [inv([p]) for p in photo]),
        "big_legit_36mp": (200, [inv([encoded(big, "JPEG", quality=90)])]),  # the heaviest image the limits accept
        "max_images_64": (200, [inv((photo * 64)[:64])]),  # a full request of real photos
        "many_rows_2000": (413, [inv([tiny] * 2000)]),
        "pixel_bomb_2x36mp": (413, [inv([bomb, bomb])]),
        "deep_json_5000": (400, [b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"]),
        "oversize_60mb_declared": (413, None),  # headers say 60 MB; see `declared`
    }


def declared(port: int, size: int) -> int:
    "A V2 POST declaring `size` bytes that sends only its first 64 KB: the status it gets."
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        raw.sendall(
            f"POST /v2/models/deepguard/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
            + b"{"
            + b" " * 65536
        )
        reply = raw.recv(4096)
    return int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/") else 0


def adversarial(server, seconds: int, files: list[Path]) -> dict:
    """Good clients and hostile ones at once for `seconds`: each kind on its own thread, back to back. Statuses by
    kind, the good answers' errors, and the server's peak RSS against the Kubernetes memory limit."""
    kinds = adversarial_bodies(files)
    url = f"http://127.0.0.1:{server.port}/invocations"
    counts = {k: {} for k in kinds}
    peak, stop = [server.rss_mib()], threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak[0] = max(peak[0], server.rss_mib())

    def client(kind, bodies, seed):
        i = seed
        while not stop.is_set():
            i += 1
            status = (
                declared(server.port, 60_000_000) if bodies is None else post(url, bodies[i % len(bodies)], timeout=120)
            )
            counts[kind][status] = counts[kind].get(status, 0) + 1

    threads = [threading.Thread(target=sample, daemon=True)]
    threads += [threading.Thread(target=client, args=("good", kinds["good"][1], k), daemon=True) for k in range(8)]
    threads += [
        threading.Thread(target=client, args=(k, b, 0), daemon=True) for k, (_, b) in kinds.items() if k != "good"
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    wrong = {k: {s: n for s, n in counts[k].items() if s != want} for k, (want, _) in kinds.items()}
    import yaml  # the limit the Deployment gives the server's container, in MiB

    manifests = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    deployment = next(m for m in manifests if m and m.get("kind") == "Deployment")
    limit = int(
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"].removesuffix("Mi")
    )
    return {
        "seconds": seconds,
        "expected_status": {k: want for k, (want, _) in kinds.items()},
        "statuses": {k: {str(s): n for s, n in v.items()} for k, v in counts.items()},
        "unexpected": {k: {str(s): n for s, n in v.items()} for k, v in wrong.items() if v},
        "peak_rss_mib": round(peak[0]),
        "k8s_memory_limit_mib": limit,
        "under_limit": peak[0] < limit,
    }


def in_process(model: str, files: list[Path], batch: int, rounds: int) -> dict:
    "classify as a library user calls it, model loaded once: single images (p50) and one list (images/s)."
    from deepguard.predict import classify, load_detector, resolve_model
    from deepguard.images import load_image

    detector = load_detector(resolve_model(model))
    data = [f.read_bytes() for f in files]
    for d in data[:5]:
        classify(d, model=model)
    single = []
    for _ in range(rounds):
        for d in data:
            t = time.perf_counter()
            classify(d, model=model)
            single.append(time.perf_counter() - t)
    images = [load_image(d) for d in (data * (batch // len(data) + 1))[:batch]]
    classify(images, model=model)
    batch_s = []
    for _ in range(3):
        t = time.perf_counter()
        classify(images, model=model)
        batch_s.append(time.perf_counter() - t)
    return {
        "model": f"{detector.name} {detector.version}",
        "single_image_p50_ms": round(float(np.median(single)) * 1000, 1),
        "single_image_p95_ms": round(float(np.percentile(single, 95)) * 1000, 1),
        "single_images_timed": len(single),
        "batch": batch,
        "batch_images_per_s": round(batch / float(np.median(batch_s)), 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=REGISTRY_MODEL)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=int, default=20, help="wrk duration per load level")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32, help="images in the in-process batch")
    parser.add_argument("--no-variants", action="store_true", help="skip the one-process variants")
    parser.add_argument("--adversarial", type=int, default=30, help="seconds of the hostile mix (0: skip)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "serving.json"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk (Debian's package), then run this again.")

    files = test_images(args.images)
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    bodies = tmp / "bodies.txt"
    bodies.write_text(
        "".join(json.dumps({"inputs": {"image": [base64.b64encode(f.read_bytes()).decode()]}}) + "\n" for f in files)
    )
    script = tmp / "post.lua"
    script.write_text(LUA)
    first_body = bodies.read_text().splitlines()[0].encode()

    local = in_process(args.model, files, args.batch, rounds=2)
    print("in-process:", json.dumps(local))

    def load_levels(server, levels):
        wrk(server.port, 2, 3, bodies, script)  # warm-up, not reported
        results = []
        for clients in levels:
            results.append(wrk(server.port, clients, args.seconds, bodies, script, server))
            print(json.dumps(results[-1]))
        return results

    server = Server(args.model, first_body, tmp / "serve.log")
    idle_rss = server.rss_mib()
    try:
        levels = load_levels(server, [int(c) for c in args.clients.split(",")])
        hostile = adversarial(server, args.adversarial, files) if args.adversarial else {}
        if hostile:
            print("adversarial:", json.dumps(hostile))
    finally:
        server.stop()
    variants = {}
    if not args.no_variants:
        for name, extra in VARIANTS.items():
            v = Server(args.model, first_body, tmp / f"serve-{name}.log", extra)
            try:
                variants[name] = {
                    "flags": " ".join(extra), "cold_start_s": round(v.cold_start_s, 2), "ready_s": round(v.ready_s, 2),
                    "rss_mib_after_first_answer": round(v.rss_mib()),
                    **load_levels(v, [max(int(c) for c in args.clients.split(","))])[0],
                }
            finally:
                v.stop()

    from deepguard.serving import SERVE_DEFAULTS

    one = next((r for r in levels if r["clients"] == 1), None)
    many = next((r for r in levels if r["clients"] == 32), None)
    folder = {}
    if args.model.startswith("models:/"):  # the image's and Kubernetes' case: the model baked in as a folder
        import mlflow
        from deepguard.core import mlflow_setup

        mlflow_setup()
        exported = mlflow.artifacts.download_artifacts(artifact_uri=args.model, dst_path=str(tmp / "model"))
        v = Server(exported, first_body, tmp / "serve-folder.log")
        folder = {
            "ready_s": round(v.ready_s, 2),
            "cold_start_s": round(v.cold_start_s, 2),
            "rss_mib_after_first_answer": round(v.rss_mib()),
        }
        v.stop()
    goals = {
        "single_client_p50_over_in_process_p50": {
            "value": round(one["p50_ms"] / local["single_image_p50_ms"], 2) if one else None,
            "goal": "<= 2",
        },
        "clients32_throughput_over_in_process_batch": {
            "value": round(many["requests_per_s"] / local["batch_images_per_s"], 2) if many else None,
            "goal": ">= 0.8",
        },
        "clients32_requests_per_s": {
            "value": many["requests_per_s"] if many else None,
            "goal": ">= 108 (4x the 26.9 of the TensorFlow face chain)",
        },
        "ready_s": {"value": round(server.ready_s, 2), "goal": "<= 3"},
        "peak_rss_mib": {"value": max(r["peak_rss_mib"] for r in levels), "goal": "<= 600 (MB)"},
        "errors": {"value": sum(r["errors"] for r in levels), "goal": "== 0"},
        "cold_start_s": {"value": round(server.cold_start_s, 2), "goal": "<= 3"},
        "adversarial_peak_rss_mib": {
            "value": hostile.get("peak_rss_mib"),
            "goal": f"< {hostile.get('k8s_memory_limit_mib')} (the Kubernetes memory limit)",
        },
        "adversarial_unexpected_statuses": {"value": hostile.get("unexpected"), "goal": "none"},
    }
    met = {
        "single_client_p50_over_in_process_p50": lambda v: v is not None and v <= 2,
        "clients32_throughput_over_in_process_batch": lambda v: v is not None and v >= 0.8,
        "errors": lambda v: v == 0, "cold_start_s": lambda v: v <= 3, "ready_s": lambda v: v <= 3,
        "clients32_requests_per_s": lambda v: v is not None and v >= 108,
        "peak_rss_mib": lambda v: v <= 600 * 1e6 / 2**20,
        "adversarial_peak_rss_mib": lambda v: v is not None and v < hostile["k8s_memory_limit_mib"],
        "adversarial_unexpected_statuses": lambda v: v == {},
    }
    for key, goal in goals.items():
        goal["met"] = met[key](goal["value"])
    import mlserver
    from importlib.metadata import version

    result = {
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "openvino": version("openvino"),
            "mlserver": mlserver.__version__,
            "load_generator": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0][:40],
        },
        "model": args.model,
        "images": len(files),
        "image_bytes_median": int(np.median([f.stat().st_size for f in files])),
        "server_defaults": {
            k: SERVE_DEFAULTS[k] for k in ("workers", "inference_threads", "max_batch_size", "max_batch_time")
        },
        "in_process": local, "server": levels, "cold_start_s": round(server.cold_start_s, 2),
        "ready_s": round(server.ready_s, 2), "model_folder": folder,
        "server_rss_mib": {"after_first_answer": round(idle_rss), "peak": max(r["peak_rss_mib"] for r in levels)},
        "variants_at_max_clients": variants,
        "adversarial": hostile,
        "goals": goals,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
