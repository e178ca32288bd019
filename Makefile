# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv from nothing: torch 2.13.0 (CPU wheel) first, then the project, with pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhf demo --output_dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests
