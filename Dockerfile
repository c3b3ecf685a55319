# DeepGuard images. The default (last) target is the model server, `deepguard serve` (MLServer + DeepGuard's
# runtime) with a registered model baked in; the `dashboard` target is the Voila dashboard.
#
#   make pipeline && make image           # here: podman, from a Debian base made by debootstrap (no Docker Hub)
#   docker build -t deepguard-server .    # with Docker: BASE_IMAGE defaults to the official Python slim image
#   docker run --rm -p 8080:8080 -p 8082:8082 deepguard-server
#   docker build --target dashboard -t deepguard-dashboard . && docker run --rm -p 8866:8866 deepguard-dashboard
#
# `make image` first exports the registry's champion into build/image/model (an MLflow model folder); to serve
# from the registry instead, run the image with `serve --model models:/...@champion` and MLFLOW_TRACKING_URI.
ARG BASE_IMAGE=python:3.11.7-slim-bookworm

# ---- a virtual environment with the pinned serving dependencies: no TensorFlow, Keras or torch (the detector and the
# face detector answer from OpenVINO IR; mtcnn is installed for its weight files only, and needs just joblib and lz4).
# MLflow as `mlflow-skinny` (the client: a `models:/` URI from a tracking server over HTTP; a baked-in model folder
# needs no MLflow at all), not `mlflow`, whose server-side dependencies (pyarrow, scipy, scikit-learn, matplotlib,
# SQLAlchemy, Flask...) were 0.45 GB of the image and are never imported by `deepguard serve`.
# All wheels, so no compiler anywhere. The runtime stages below build on this one rather than `COPY --from` it: a
# copy of the venv would be a second layer of the same size.
# pip's settings are build arguments, not ENV, so that none of them stays in the images.
FROM ${BASE_IMAGE} AS venv
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG PIP_DISABLE_PIP_VERSION_CHECK=1
ARG PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY constraints.txt settings.ini setup.py pyproject.toml MANIFEST.in README.md ./
COPY deepguard/ deepguard/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-compile -c constraints.txt \
      "mlflow-skinny==3.17.2" "mlserver==1.7.1" "openvino==2026.4.1" "mtcnn==1.0.0" \
      joblib lz4 pillow numpy pandas pyyaml prometheus-client tqdm \
 && /opt/venv/bin/pip install --no-compile --no-deps . \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('tensorflow', 'keras', 'torch', 'pyarrow', 'scipy', 'sklearn')))"

# ---- the dashboard's environment: the serving one plus Voila, the dashboard's plotting libraries, and TensorFlow
# with Keras for its Grad-CAM view (answers still come from OpenVINO)
FROM venv AS dashboard-venv
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG PIP_DISABLE_PIP_VERSION_CHECK=1
ARG PIP_NO_CACHE_DIR=1
RUN /opt/venv/bin/pip install --no-compile -c constraints.txt "voila==0.5.13" ipywidgets ipykernel matplotlib scikit-image \
      "tensorflow-cpu==2.21.0" "keras==3.15.1"

# ---- the dashboard (Voila on 8866), with the pipeline's detector and demo images
FROM dashboard-venv AS dashboard
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg \
    DEEPGUARD_ROOT=/app
RUN groupadd --gid 10001 deepguard && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin deepguard
WORKDIR /app
COPY dvc.yaml params.yaml ./
COPY app/ app/
COPY models/detector.keras models/detector.json models/threshold.json models/detector.xml models/detector.bin models/
COPY reports/metrics.json reports/
COPY data/features/mean_spectra.npz data/features/
COPY data/raw/ data/raw/
USER 10001:10001
EXPOSE 8866
# A static file: proves the server answers without starting a kernel (a GET of the page would start one).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8866/voila/static/voila.js', timeout=4)"]
CMD ["voila", "app/dashboard.ipynb", "--Voila.config_file_paths=app", "--Voila.ip=0.0.0.0", "--port=8866", "--no-browser"]

# ---- the model server (default target): REST 8080, gRPC 8081, Prometheus 8082
FROM venv AS server
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --gid 10001 deepguard && useradd --no-create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin deepguard
WORKDIR /app
COPY build/image/model/ /app/model/
USER 10001:10001
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=4)"]
ENTRYPOINT ["deepguard"]
CMD ["serve", "--host", "0.0.0.0", "--model", "/app/model"]
