# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
# `make sweep` runs notebook 3's fronts at equal compute on the embedded default (notebooks/params/rho_front.yaml:
# LORE over ρ, FARE-reg over λ, FARE over ε, 3 seeds) and copies its figures and table to docs/results/front;
# `make sweep DEVICES=0,1,2,3` one point per GPU.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export LOREKIT_CACHE ?= $(CURDIR)/.cache
# The venv's kernelspec, not a same-named one elsewhere, runs the notebooks.
export JUPYTER_PATH := $(CURDIR)/$(VENV)/share/jupyter

.PHONY: setup demo test sweep

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[notebooks,test,cluster]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m lorekit demo

# The suite, then the training notebook in JupyterLab in a real Chromium (scripts/browser_check.py), which
# needs Debian's chromium: .ci/run installs it; elsewhere `apt-get install chromium` (without it, it says so).
test: setup
	$(BIN)/python -m pytest
	@if command -v chromium >/dev/null; then $(BIN)/python scripts/browser_check.py; \
	else echo "browser check not run: no chromium (Debian: apt-get install chromium)"; fi

# DEVICES=0,1,2,3 (or auto) runs the points one per GPU: passed as notebook 3's `devices` parameter (a string).
sweep: setup
	$(BIN)/papermill notebooks/03_rho_sweep.ipynb $(CURDIR)/papermill_runs/rho_front.ipynb --cwd notebooks \
		-f notebooks/params/rho_front.yaml $(if $(DEVICES),-r devices $(DEVICES))
