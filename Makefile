# The README's two commands. Each sets up what it needs on a fresh machine (a virtual environment in .venv,
# detectron2, this package with its compiled operator) and is quick when that is already done.
#   make quickstart   train a small model on the built-in synthetic dataset on CPU, evaluate it, draw detections
#   make test         run the test suite
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

.PHONY: setup quickstart test
setup: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m salience_detr.tools.install_detectron2
	touch $@

$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

quickstart: setup
	$(PY) -m salience_detr.tools.quickstart

test: setup
	$(PY) -m pytest tests -q -ra --durations=20 $(PYTEST_ARGS)
