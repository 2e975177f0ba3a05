# The two commands: `make demo` and `make test`. Each creates .venv when it is missing, installs
# torch==2.13.0 first (a CPU wheel here; a bare `torch` would pull a multi-GB CUDA build), then
# the rest, and skips every install step whose inputs did not change since the last run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION := 2.13.0
STAMPS := $(VENV)/.stamps
# llama-cpp-python (extra llm-local) builds from source: portable flags, both cores; pip caches
# the wheel, so only the first install pays the few minutes.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
DEMO_ARGS ?=

.PHONY: demo test lint install install-dev clean

demo: $(STAMPS)/core $(STAMPS)/kernels
	$(VENV)/bin/lwm demo $(DEMO_ARGS)

test: $(STAMPS)/dev $(STAMPS)/kernels
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMPS)/dev
	$(VENV)/bin/ruff check .

install: $(STAMPS)/core
install-dev: $(STAMPS)/dev

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/torch: | $(PY)
	@mkdir -p $(STAMPS)
	$(PIP) install torch==$(TORCH_VERSION)
	@touch $@

$(STAMPS)/core: pyproject.toml Makefile $(STAMPS)/torch
	$(PIP) install -e ".[llm-local]"
	@touch $@

# lwm's native CPU kernels, built once into torch's extension cache (rebuilt when the source
# changes); without them imagination runs the slower pure-PyTorch path.
$(STAMPS)/kernels: lwm/models/native.cpp $(STAMPS)/core
	$(VENV)/bin/lwm kernels || echo "lwm: native kernels not built; planning runs the PyTorch path"
	@touch $@

$(STAMPS)/dev: pyproject.toml Makefile $(STAMPS)/core
	$(PIP) install -e ".[llm-local,dev]"
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info
