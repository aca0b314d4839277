# Two commands on a fresh machine: `make demo` and `make test`. Setup is idempotent and cached:
# the venv is rebuilt only when pyproject.toml or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PIP_DISABLE_PIP_VERSION_CHECK = 1

DEMO_RECIPES ?= w8a16-rtn w4a16-rtn w4a16-rtn-g64 w4a16-rtn-g64-asym w4a16-rtn-lsq-g64

.PHONY: setup demo test test-fast bench-peers bench-llmc bench-compare-stores clean-venv chromium postgres

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so later installs never pull a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/quantmill quantize --model demo $(addprefix --recipe ,$(DEMO_RECIPES)) --register smollm2-135m --plot docs/demo_size_vs_ppl.png

# The browser test drives Debian's chromium (tests/test_ui_browser.py); Playwright never downloads one.
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# The team-stack test (tests/test_team_stack.py) starts Debian's Postgres itself, as an unprivileged
# user on a free loopback port. Debian keeps the programs in /usr/lib/postgresql/N/bin, off PATH.
postgres:
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql)

test: setup chromium postgres
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not stack"

# Every built-in recipe on the tiny model with the code of REV and with this checkout: the same
# store keys and byte-identical quantized tensors, or exit 1 (a refactor's proof of no change).
REV ?= acb07f7
bench-compare-stores: setup
	nice -n 10 $(PY) bench/compare_stores.py --rev $(REV)

# The peer tools (torchao, bitsandbytes) for bench/peers.py, outside quantmill's own venv: a second
# venv that sees the first through a .pth file and adds only the peers (--no-deps: torch, numpy and
# transformers come from the first).
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): $(STAMP) bench/peers-requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$$($(PEERS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/quantmill-venv.pth"
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps -r bench/peers-requirements.txt
	touch $@

bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python bench/peers.py

# llm-compressor for bench/vs_llmcompressor.py, in a venv of its own: it brings transformers 5.17 and
# compressed-tensors 0.19, so it cannot share quantmill's venv (and never imports it: the bench
# passes token ids and checkpoints through files and runs the peer in a subprocess). The
# constraints file keeps torch at the 2.13.0 CPU wheel.
LLMC_VENV ?= .venv-llmc
LLMC_STAMP := $(LLMC_VENV)/.installed

$(LLMC_STAMP): constraints.txt
	test -x $(LLMC_VENV)/bin/python || $(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(LLMC_VENV)/bin/python -m pip install -q -c constraints.txt llmcompressor==0.14.0.1
	touch $@

bench-llmc: setup $(LLMC_STAMP)
	nice -n 10 $(PY) bench/vs_llmcompressor.py --peer-python $(LLMC_VENV)/bin/python $(BENCH_LLMC_ARGS)

clean-venv:
	rm -rf $(VENV) $(PEERS_VENV) $(LLMC_VENV)
