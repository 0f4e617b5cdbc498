# The README's two commands. Each sets up what it needs on a fresh machine (a virtual environment in .venv,
# detectron2, this package with its compiled operator) and is quick when that is already done.
#   make quickstart   train a small model on the built-in synthetic dataset on CPU, evaluate it, draw detections
#   make test         make lint, then run the test suite
#   make lint         ruff check, ruff format --check, clang-format --dry-run over csrc/
# Variables: PYTHON (interpreter that creates the venv), VENV, and the build switches of setup.py
# (FORCE_CUDA, TORCH_CUDA_ARCH_LIST, NVCC_FLAGS, MAX_JOBS).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Build the CUDA kernels whenever nvcc exists, GPU or not, for one architecture unless told otherwise.
ifneq ($(shell command -v nvcc 2>/dev/null),)
export FORCE_CUDA ?= 1
export TORCH_CUDA_ARCH_LIST ?= 9.0
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
endif
export MAX_JOBS ?= 2

BUILD_INPUTS := setup.py $(shell find csrc -type f 2>/dev/null)
CSRC_SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: setup quickstart test lint
setup: $(VENV)/.built $(VENV)/.detectron2

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# detectron2 0.6 fixed for current libraries. Reruns when the installer changes; the installer then replaces an
# older install of its own (it reads the version mark) and leaves a detectron2 built from source alone.
$(VENV)/.detectron2: $(VENV)/.deps salience_detr/tools/install_detectron2.py
	$(PY) salience_detr/tools/install_detectron2.py
	touch $@

$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

quickstart: setup
	$(PY) -m salience_detr.tools.quickstart

# ruff (lint and format, settings in pyproject.toml) and clang-format (.clang-format) over csrc/; CI runs it first.
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CSRC_SOURCES)

test: lint setup
	$(PY) -m pytest tests -q -ra --durations=20 $(PYTEST_ARGS)

# The GPU check (salience_detr/tools/gpu_check.py; README "Checking on a GPU"). On the GPU machine the plain
# python3 there runs it (no venv); here `make gpu-check GPU_CHECK_ARGS=--dry-run`. `make gpu-bundle` downloads, on
# a machine with PyPI, the offline wheels it installs there (.gpu_bundle/, git-ignored).
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
.PHONY: gpu-check gpu-bundle
gpu-check:
	$(GPU_CHECK_PYTHON) -m salience_detr.tools.gpu_check $(GPU_CHECK_ARGS)

gpu-bundle: setup
	$(PY) -m salience_detr.tools.prepare_gpu_bundle
