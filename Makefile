# Quick start: `make demo` (set up and run the demo), `make test` (set up and run the tests).
# TORCH pins the CPU build found on this project's machines; override it elsewhere, e.g. TORCH=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo test bench lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m gradguard demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]"
	$(PY) benchmarks/overhead.py

lint: setup
	$(PY) -m pip install -q --disable-pip-version-check ruff mypy
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy src

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
