# Two commands on a fresh machine: `make demo` and `make test`. Setup is idempotent and cached:
# the venv is rebuilt only when pyproject.toml or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PIP_DISABLE_PIP_VERSION_CHECK = 1

DEMO_RECIPES ?= w8a16-rtn w4a16-rtn w4a16-rtn-g64 w4a16-rtn-g64-asym

.PHONY: setup demo test test-fast clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so later installs never pull a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/quantmill quantize --model demo $(addprefix --recipe ,$(DEMO_RECIPES)) --register smollm2-135m --plot docs/demo_size_vs_ppl.png

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
