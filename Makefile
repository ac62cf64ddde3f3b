# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export LOREKIT_CACHE ?= $(CURDIR)/.cache

.PHONY: setup demo test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[notebooks,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m lorekit demo

test: setup
	$(BIN)/python -m pytest
