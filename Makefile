# Two set-up commands: `make demo` and `make test`. Both install into .venv when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python ships only as source: build it once per machine and reuse the wheel.
# The default build is native (AVX-512 where the CPU has it: +40% prompt tokens/s measured
# here); the wheel dir is keyed by the CPU's flags so a wheel never meets a CPU it wasn't
# built for. LLAMA_BUILD=portable gives a build that runs on any x86-64 with AVX2.
LLAMA_BUILD ?= native
LLAMA_CPP_VERSION := 0.3.36
CPU_ID := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-8)
# ggml's AMX kernels are left out: on a Xeon with AMX (a KVM guest) the native build that used
# them crashed in the first llama_decode (SIGSEGV); without them it runs.
ifeq ($(LLAMA_BUILD),native)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
WHEELS ?= $(HOME)/.cache/gecko/wheels/native-noamx-$(CPU_ID)
else
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
WHEELS ?= $(HOME)/.cache/gecko/wheels/portable
endif
PIP := $(BIN)/pip install --quiet --disable-pip-version-check --find-links $(WHEELS)

.PHONY: demo test test-full bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(WHEELS)/.llama-cpp-python-$(LLAMA_CPP_VERSION): | $(BIN)/python
	mkdir -p $(WHEELS)
	@if ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "reusing built llama-cpp-python wheel in $(WHEELS)"; \
	else \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) from source (4-6 min, once per machine)"; \
		tmp=$$(mktemp -d) && CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-cache-dir --no-deps \
			llama-cpp-python==$(LLAMA_CPP_VERSION) -w $$tmp && mv $$tmp/*.whl $(WHEELS)/ && rm -rf $$tmp; \
	fi
	touch $@

$(VENV)/.installed-core: pyproject.toml $(WHEELS)/.llama-cpp-python-$(LLAMA_CPP_VERSION)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-core
	$(PIP) -e '.[test]'
	touch $@

demo: $(VENV)/.installed-core
	$(BIN)/gecko demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

test-full: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m full

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/llm.py

clean-venv:
	rm -rf $(VENV)
