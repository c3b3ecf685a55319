# The DeepGuard dashboard (Voila) in a container. It serves a model, it does not train one: build it after
# `make pipeline`, which writes the detector, its test metrics and the demo images the image carries.
#   make pipeline
#   docker build -t deepguard-dashboard .
#   docker run --rm -p 8866:8866 deepguard-dashboard          # then open http://localhost:8866
# To serve another detector, mount it and point DEEPGUARD_MODEL at it:
#   docker run --rm -p 8866:8866 -v "$PWD/models:/models:ro" -e DEEPGUARD_MODEL=/models/detector.keras deepguard-dashboard
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg \
    DEEPGUARD_ROOT=/app

RUN groupadd --gid 10001 deepguard && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin deepguard
WORKDIR /app

# Dependencies: a layer that changes only with the pins. torch (used by the ingest stage, not by the dashboard,
# but a package requirement) comes from PyTorch's CPU index: PyPI's Linux wheel pulls several GB of CUDA
# libraries. Everything else is pinned exactly by constraints.txt, the same file `make` installs from.
COPY constraints.txt settings.ini setup.py pyproject.toml MANIFEST.in README.md ./
COPY deepguard/ deepguard/
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && pip install -c constraints.txt . "voila==0.5.13"

# The project files the dashboard reads: the detector and its threshold, the test metrics for the header,
# the class-mean spectra for the spectrum plot, and the demo images for the example buttons.
COPY dvc.yaml params.yaml ./
COPY app/ app/
COPY models/detector.keras models/detector.json models/threshold.json models/
COPY reports/metrics.json reports/
COPY data/features/mean_spectra.npz data/features/
COPY data/raw/ data/raw/

USER 10001:10001
EXPOSE 8866
# A static file: proves the server answers without starting a kernel (a GET of the page would start one).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8866/voila/static/voila.js', timeout=4)"]
CMD ["voila", "app/dashboard.ipynb", "--Voila.config_file_paths=app", "--Voila.ip=0.0.0.0", "--port=8866", "--no-browser"]
