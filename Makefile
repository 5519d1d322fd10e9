# Two commands on a fresh clone with only Python and make:
#   make run    the main job (python -m jobs.run_all) on the built-in data set; ARGS="..." adds options
#   make test   exactly the test command CI runs (.ci/run calls this)
# Each creates .venv when it is missing and (re)installs the project when pyproject.toml is
# newer than the last install with those extras. GPU nodes: make run EXTRA=gpu (never cpu and
# gpu in one .venv: the two extras pull different TensorFlow builds).
PYTHON ?= python3
EXTRA ?= cpu
ARGS ?=
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test

run: $(VENV)/.installed-$(EXTRA)
	$(BIN)/python -m jobs.run_all $(ARGS)

test: $(VENV)/.installed-$(EXTRA),test
	$(BIN)/python -m pytest -q

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$*]"
	touch $@
