# The two set-up commands of README.md: `make demo` and `make test`.
# Each creates (or reuses) .venv and installs the project from pyproject.toml:
# `make demo` only what the demo needs (`pip install -e .`), `make test` also the
# test extras (`.[test]`: pytest, torch and transformers for the weight-import checks).
# `make test-fast`: the tests not marked slow (no end-to-end training; every tl_jax module is reached,
# tests/test_fast_tier.py checks that), a few minutes on 2 cores; `make test` runs everything (CI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tl_jax-installed
DEMO_STAMP := $(VENV)/.tl_jax-demo-installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# weight-import parity references (see pyproject's test extras for why --no-deps)
REFERENCE_LIBS := timm==1.0.31 open_clip_torch==3.3.0

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(REFERENCE_LIBS)
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(PY) experiments/mnist_to_digits.py --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf .jax_cache .pytest_cache
